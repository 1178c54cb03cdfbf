"""SearchRequest: one search, whoever asks: the CLI, the HTTP API (one request or a batch), the evaluation, Python.

Why one typed request: every caller used to build its own loose options and choose again between a text or
image query, a stored document (``like``) and given vectors; now each builds this one object and the router
answers it (:meth:`QueryRouter.search`). The request holds what was asked, nothing decided: the plan
(``retrieve/plan.py``) turns it into routes, fusion and rerankers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from stair_search.retrieve.fusion import RRF_K

MODES = ("auto", "sparse", "dense", "hybrid", "text")
FUSIONS = ("rrf", "convex")
KINDS = ("encoded", "like", "vectors")


@dataclass(frozen=True)
class SearchRequest:
    """A text and/or an image (encoded by the model), a stored document's id (``like``: its own vectors are the
    query, itself left out), or given vectors (``dense`` and/or ``sparse``: nothing is encoded).

    ``filters`` (``query/filters.py``) keep only matching documents before ranking; ``offset`` skips that many
    hits (paging: the order is the same across pages while ``offset + k`` <= ``depth``); ``rerank``: rerankers
    over the top ``depth`` fused candidates; ``feedback``: top fused hits whose embeddings refine the dense query
    (None: ``auto``'s choice, else none); ``use_text=False`` keeps ``auto`` from adding the text route. The
    rerankers, feedback, depth and the text route apply to text and image queries only. ``partial``: a shard that
    cannot answer (served elsewhere, every copy of it down) is left out and named in the response
    (``SearchResponse.missing_shards``) instead of failing the search."""

    text: str | None = None
    image: Image.Image | None = None
    like: str | None = None
    dense: Sequence[float] | np.ndarray | None = None
    sparse: Mapping[str, float] | None = None
    mode: str = "auto"
    k: int = 10
    offset: int = 0
    filters: Mapping[str, Any] | None = None
    rerank: Sequence[str] = ()
    feedback: int | None = None
    explain: bool = False
    fusion: str = "rrf"
    alpha: float = 0.5
    rrf_k: int = RRF_K
    depth: int | None = None
    use_text: bool = True
    partial: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rerank", tuple(self.rerank))
        if self.filters is not None and not self.filters:
            object.__setattr__(self, "filters", None)

    @property
    def kind(self) -> str:
        """"encoded" (text and/or image), "like" or "vectors"; a request of several kinds is a ValueError."""
        given = [kind for kind, present in (("encoded", self.text is not None or self.image is not None),
                                            ("like", self.like is not None),
                                            ("vectors", self.dense is not None or self.sparse is not None))
                 if present]
        if len(given) > 1:
            raise ValueError(f"give one kind of query: a text and/or an image, 'like' (a document id), or "
                             f"vectors (dense and/or sparse); got {' and '.join(given)}")
        return given[0] if given else "encoded"
