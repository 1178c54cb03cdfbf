"""Small numpy helpers on embedding vectors that several layers share (the rerankers, the concept bank)."""

from __future__ import annotations

import numpy as np


def unit(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """``x`` scaled to unit length along ``axis``; zero vectors stay zero (no NaN)."""
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)
