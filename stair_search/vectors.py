"""Encoded vectors as numpy, and small helpers on them that several layers share (the encoder, the index writer,
the rerankers, the concept bank): torch-free, so the storage layer can take them without a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x`` scaled to unit length along ``axis``; zero vectors stay zero (no NaN)."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


@dataclass
class EncodedBatch:
    dense: np.ndarray  # (B, D) float32, L2-normalised
    sparse: list[dict[str, float]]  # per item: word-piece token -> weight > 0
    local: np.ndarray | None = None  # (B, m, D) float16, L2-normalised patch features (images only)
    local_positions: np.ndarray | None = None  # (B, m, 2) float16 patch centres (x, y) in [0, 1]

    def __len__(self) -> int:
        return len(self.sparse)

    def rows(self, start: int, stop: int) -> EncodedBatch:
        """Items ``start:stop`` (one caller's share of a batch that several callers' items were encoded in)."""
        def part(array: np.ndarray | None) -> np.ndarray | None:
            return None if array is None else array[start:stop]

        return EncodedBatch(dense=self.dense[start:stop], sparse=self.sparse[start:stop], local=part(self.local),
                            local_positions=part(self.local_positions))
