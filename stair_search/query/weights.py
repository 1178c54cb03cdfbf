"""Inference-free sparse query vectors: a query's own word-pieces weighted by a lookup, no text tower.

Why: for a grounded model (``ground_text``: a query's sparse vector holds only its own word-pieces) the text
tower is still run to compute those few weights, and it is most of a sparse-route query's time. OpenSearch's
doc-only neural sparse mode shows the way: the documents keep their learned vectors, and a query's weights come
from a lookup over its tokens. The lookup here is the index's own inverse document frequency (a word that few
images emit counts more; BM25's idf form, always positive), so a sparse-route query runs only the tokenizer.

Pure functions over numpy arrays, chosen by name (``QUERY_WEIGHTS``); the router holds the index's table.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

QUERY_WEIGHTS = ("auto", "model", "idf")  # auto: idf for a grounded model, else the text tower's weights


class WordPieces(Protocol):
    """What the lookup needs of a vocabulary (``models.vocab.Vocabulary`` has it; query/ stays below models/)."""

    tokens: Sequence[str]

    def first_word_pieces(self, text: str) -> list[int]: ...


def idf_table(document_frequency: np.ndarray, documents: int) -> np.ndarray:
    """Per-token idf, ``log(1 + (N - df + 0.5) / (df + 0.5))`` (BM25's, positive even for a token every
    document holds); 0 for a token no document holds, which can match nothing (so a query of only such words
    is empty, and ``auto`` goes dense for it, as for a model's empty query vector)."""
    df = np.asarray(document_frequency, np.float64)
    return np.where(df > 0, np.log1p((documents - df + 0.5) / (df + 0.5)), 0.0).astype(np.float32)


def lookup_query(vocabulary: WordPieces, text: str, table: np.ndarray) -> dict[str, float]:
    """The query's own words (function words aside) as their first whole-word piece -- the piece an image
    vector can hold, as the model's own query floor picks -- each weighted by ``table`` (0: left out)."""
    query: dict[str, float] = {}
    for i in vocabulary.first_word_pieces(text):
        if table[i] > 0:
            query[vocabulary.tokens[i]] = float(table[i])
    return query
