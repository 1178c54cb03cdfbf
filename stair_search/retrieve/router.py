"""QueryRouter: encode the query, run the chosen routes over the index, fuse, and describe each hit."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from stair_search.encode import EncodedBatch, Encoder
from stair_search.index.reader import Candidate, Index
from stair_search.retrieve.fusion import RRF_K, Fused, convex, rrf

MODES = ("sparse", "dense", "hybrid")
FUSIONS = ("rrf", "convex")


@dataclass
class SearchHit:
    rank: int
    id: str
    score: float
    source: str
    caption: str
    metadata: dict[str, Any]
    parts: dict[str, float] = field(default_factory=dict)
    matched: dict[str, tuple[float, float]] | None = None  # token -> (query weight, document weight)

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        if self.matched is not None:
            data["matched"] = {t: {"query": q, "document": d} for t, (q, d) in self.matched.items()}
        return data


@dataclass
class SearchResponse:
    mode: str
    fusion: str | None
    hits: list[SearchHit]
    query_tokens: dict[str, float] = field(default_factory=dict)


class QueryRouter:
    def __init__(self, index: Index, encoder: Encoder, depth: int = 100):
        index.manifest.check_encoder(encoder)
        self.index, self.encoder, self.depth = index, encoder, depth

    def encode_query(self, text: str | None = None, image: Image.Image | None = None) -> EncodedBatch:
        """Text, image, or both (their vectors added: a text-refined image query)."""
        parts = []
        if text:
            parts.append(self.encoder.encode_texts([text]))
        if image is not None:
            parts.append(self.encoder.encode_images([image]))
        if not parts:
            raise ValueError("A query needs a text, an image, or both.")
        dense = np.sum([p.dense[0] for p in parts], axis=0)
        sparse: dict[str, float] = {}
        for p in parts:
            for token, weight in p.sparse[0].items():
                sparse[token] = sparse.get(token, 0.0) + weight
        return EncodedBatch(dense=(dense / np.linalg.norm(dense))[None].astype(np.float32), sparse=[sparse])

    def search(self, text: str | None = None, image: Image.Image | None = None, mode: str = "hybrid",
               k: int = 10, fusion: str = "rrf", alpha: float = 0.5, rrf_k: int = RRF_K,
               explain: bool = False) -> SearchResponse:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got '{fusion}'")
        query = self.encode_query(text, image)
        depth = max(k, self.depth) if mode == "hybrid" else k
        lists: dict[str, list[Candidate]] = {}
        if mode in ("sparse", "hybrid"):
            lists["sparse"] = self.index.search_sparse(query.sparse, depth)[0]
        if mode in ("dense", "hybrid"):
            lists["dense"] = self.index.search_dense(query.dense, depth)[0]
        keyed = {route: [((c.shard, c.row), c.score) for c in cands] for route, cands in lists.items()}
        used_fusion = fusion if mode == "hybrid" else None
        if used_fusion is None:  # one route: keep its own scores
            (route, ranked), = keyed.items()
            fused = [Fused(key, score, {route: score}) for key, score in ranked]
        elif fusion == "convex":
            fused = convex(keyed, alpha)
        else:
            fused = rrf(keyed, rrf_k)
        hits = self._describe(fused[:k], query.sparse[0], explain)
        return SearchResponse(mode=mode, fusion=used_fusion, hits=hits, query_tokens=query.sparse[0])

    def _describe(self, fused: list[Fused], query_sparse: dict[str, float], explain: bool) -> list[SearchHit]:
        candidates = [Candidate(shard, row, f.score) for f in fused for shard, row in [f.key]]
        docs = self.index.documents(candidates, ["id", "source", "caption", "metadata"])
        hits = []
        for rank, (f, cand, doc) in enumerate(zip(fused, candidates, docs, strict=True), start=1):
            matched = self.index.explain(cand, query_sparse) if explain else None
            hits.append(SearchHit(rank=rank, id=doc["id"], score=f.score, source=doc["source"],
                                  caption=doc.get("caption", ""), metadata=doc.get("metadata", {}),
                                  parts=f.parts, matched=matched))
        return hits
