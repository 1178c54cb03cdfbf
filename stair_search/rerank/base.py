"""What every reranker gets: the query, the candidates' stored vectors, and the embedded phrases it asked for.

The candidates' global embeddings come back out of FAISS (``reconstruct``; approximate for IVF-PQ, then
re-normalised) and their local patch features out of the feature store, so reranking never reopens an image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class RerankInput:
    query: np.ndarray  # (D,) unit float32: the query's dense embedding
    vectors: np.ndarray  # (N, D) unit float32: the candidates' global embeddings
    local: np.ndarray  # (N, m, D) float32: each candidate's stored local (patch) features, unit or zero rows
    positions: np.ndarray  # (N, m, 2) float32: patch centres (x, y) in [0, 1]
    logit_scale: float  # the model's CLIP temperature 1/τ
    text: str | None = None  # the query text, when there is one
    phrases: Mapping[str, np.ndarray] = field(default_factory=dict)  # phrase -> (D,) unit embedding

    @property
    def raw(self) -> np.ndarray:
        """(N,) the plain cosine similarity of each candidate to the query."""
        return self.vectors @ self.query

    def embed(self, phrases: Sequence[str]) -> np.ndarray:
        """(len, D) embeddings of phrases the reranker asked for; a missing one is a programming error."""
        missing = [p for p in phrases if p not in self.phrases]
        if missing:
            raise KeyError(f"phrases {missing} were not embedded: list them in the reranker's phrases()")
        dim = self.query.shape[0]
        return np.stack([self.phrases[p] for p in phrases]) if phrases else np.zeros((0, dim), np.float32)


class Reranker(Protocol):
    name: str

    def phrases(self, text: str | None) -> list[str]:
        """Texts this reranker needs embedded for a query (auxiliary prompts, entities, synonyms)."""

    def score(self, inputs: RerankInput) -> np.ndarray:
        """(N,) new scores, higher is better."""
