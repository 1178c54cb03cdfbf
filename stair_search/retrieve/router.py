"""QueryRouter: encode the query, run the chosen routes over the index, fuse, rerank the top candidates, and
describe each hit.

The query path: decide the routes (``mode``, or ``auto``: ``query.route.decide``) -> embed (dense only, cached
per router) every phrase the rerankers need, and encode the query -> sparse (optionally S^3-expanded) and/or
dense search, ``depth`` candidates each -> fusion (RRF or convex) -> rerankers over the top ``depth`` fused
candidates, using the vectors stored in the index (never the image files) -> the top k, each hit with its
per-route and per-reranker score parts.

Pseudo-relevance feedback (``feedback``; under ``auto`` the model's ``StairConfig.feedback_docs``): after the
first fusion, the dense query moves to ``query + FEEDBACK_WEIGHT x mean(top hits' embeddings)`` (Rocchio, 1971,
on the dense side only), the dense route runs again with it and the lists are fused again. The sparse route's
exact words pick hits the dense query alone ranks low, and their embeddings then pull in the images the sparse
head missed: stair-lite-4's ``auto`` tag nDCG@10 on the emoji test split +1.3 / +0.6 / +0.5, but fewer photos
first in a collection of mostly drawings, so it is on per model (docs/models.md). Rerankers still compare
candidates with the query as typed.

Reranked order: every requested reranker scores the same candidates (its score lands in ``hit.parts[name]``);
the final score is RRF over the first-stage order and each reranker's order. A reranker is a refined image-text
similarity that knows nothing of the sparse route, so letting it alone decide would throw the keyword evidence
away (measured: it cost every reranker quality on both benchmark sets); fusing keeps both, needs no score
calibration between rerankers, and lets several rerankers vote. Candidates below ``depth`` (when k > depth)
follow, in fused order.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from PIL import Image

from stair_search.encode import EncodedBatch, Encoder
from stair_search.index.reader import Allowed, Candidate, Index
from stair_search.query.route import Decision, decide, without_sparse
from stair_search.query.weights import QUERY_WEIGHTS, idf_table, lookup_query
from stair_search.rerank import check_names, make_reranker
from stair_search.rerank.base import RerankInput, candidate_vectors
from stair_search.retrieve.fusion import RRF_K, Fused, convex, rrf

MODES = ("auto", "sparse", "dense", "hybrid", "text")
FUSIONS = ("rrf", "convex")
PHRASE_CACHE_SIZE = 10_000
_ROUTES_OF = {"sparse": ("sparse",), "dense": ("dense",), "hybrid": ("dense", "sparse")}
# Routes whose lists hold only matching documents: one shorter than asked for holds every match, the rest score 0.
_MATCHING_ROUTES = ("sparse", "text")
FIRST_STAGE = "first-stage"  # the fused order, one of the lists the reranked order is fused from
FEEDBACK_WEIGHT = 1.0  # the top hits' mean embedding against the unit query (chosen on the emoji val split)


@dataclass
class SearchHit:
    rank: int
    id: str
    score: float
    source: str
    caption: str
    metadata: dict[str, Any]
    parts: dict[str, float] = field(default_factory=dict)  # route or reranker name -> its score
    matched: dict[str, tuple[float, float]] | None = None  # token -> (query weight, document weight)
    text_matched: dict[str, int] | None = None  # text route: the query's analyzed words in the hit's text -> count
    # matched token -> the longer query word it was searched for (``SearchResponse.query_words``)
    matched_words: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = {name: value for name, value in self.__dict__.items() if name != "matched_words"}
        if self.matched is not None:
            data["matched"] = {t: {"query": q, "document": d} | ({"of": self.matched_words[t]}
                                                                  if t in self.matched_words else {})
                               for t, (q, d) in self.matched.items()}
        return data


@dataclass
class SearchResponse:
    mode: str
    fusion: str | None
    hits: list[SearchHit]
    query_tokens: dict[str, float] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)  # {"mode", "rerank", "reason"} (+ "expanded" for S^3)
    # query token -> the longer query word it was searched for ("ham" -> "hamster": the vocabulary splits it)
    query_words: dict[str, str] = field(default_factory=dict)


class QueryRouter:
    def __init__(self, index: Index, encoder: Encoder, depth: int = 100,
                 reranker_knobs: dict[str, dict[str, Any]] | None = None, query_weights: str = "auto"):
        """``depth``: candidates per route and how many fused candidates are reranked (the issue's N).
        ``reranker_knobs``: name -> keyword arguments of that reranker (see ``stair_search.rerank``).
        ``query_weights``: "model" (the text tower weighs a query's word-pieces) or "idf": a text query on the
        sparse route alone, without rerankers, is weighted by the index's idf and never runs the text tower
        (inference-free, ``query/weights.py``; for grounded models, whose queries hold only their own pieces;
        as good as the tower's weights on the emoji test split, 50x faster: benchmarks/query_weights.py).
        "auto": "idf" for a grounded model, else "model"."""
        index.manifest.check_encoder(encoder)
        if query_weights not in QUERY_WEIGHTS:
            raise ValueError(f"query_weights must be one of {QUERY_WEIGHTS}, got '{query_weights}'")
        grounded = bool(encoder.model.config.ground_text)
        if query_weights == "auto":
            query_weights = "idf" if grounded else "model"
        if query_weights == "idf" and not grounded:
            raise ValueError(f"query_weights 'idf' needs a grounded model (a query's sparse vector holding only "
                             f"its own words); {encoder.name} is not: use 'model'")
        self.index, self.encoder, self.depth, self.query_weights = index, encoder, depth, query_weights
        self._idf: np.ndarray | None = None
        # idf weights: the sparse route of a text query runs on this pool while the tower embeds the query
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sparse-route")
        with torch.no_grad():  # BSAP's temperature: read once, outside autograd
            self.logit_scale = float(encoder.model.logit_scale)
        self.rerankers = {name: make_reranker(name, **(reranker_knobs or {}).get(name, {}))
                          for name in ("bsap", "ssp", "comclip", "s3")}
        self._phrases: dict[str, np.ndarray] = {}  # phrase -> unit embedding; auxiliary prompts stay cached
        self._lock = threading.Lock()

    def encode_query(self, text: str | None = None, image: Image.Image | None = None) -> EncodedBatch:
        """Text, image, or both (their vectors added: a text-refined image query). With idf query weights a
        text's sparse vector is the lookup and the tower computes its dense embedding only (no sparse head)."""
        if text is None and image is None:
            raise ValueError("A query needs a text, an image, or both.")
        parts = []
        if text and self.query_weights == "idf":
            parts.append(EncodedBatch(dense=self.encoder.embed_texts([text]), sparse=[self._lookup(text)]))
        elif text:
            parts.append(self.encoder.encode_texts([text]))
        if image is not None:
            parts.append(self.encoder.encode_images([image]))
        sparse: dict[str, float] = {}
        for p in parts:
            for token, weight in p.sparse[0].items():
                sparse[token] = sparse.get(token, 0.0) + weight
        summed = np.sum([p.dense[0] for p in parts], axis=0)
        return EncodedBatch(dense=(summed / np.linalg.norm(summed))[None].astype(np.float32), sparse=[sparse])

    def _embed_phrases(self, phrases: Sequence[str]) -> dict[str, np.ndarray]:
        """phrase -> unit embedding for the rerankers' phrases; those not cached yet are embedded in one call,
        dense only (``Encoder.embed_texts``: they are never searched sparsely, and the sparse head is most of a
        text encode)."""
        with self._lock:
            known = {p: self._phrases[p] for p in phrases if p in self._phrases}
        todo = [p for p in dict.fromkeys(phrases) if p not in known]
        if todo:
            fresh = dict(zip(todo, self.encoder.embed_texts(todo), strict=True))
            self._remember(fresh)
            known.update(fresh)
        return known

    def search(self, text: str | None = None, image: Image.Image | None = None, mode: str = "auto",
               k: int = 10, fusion: str = "rrf", alpha: float = 0.5, rrf_k: int = RRF_K,
               explain: bool = False, rerank: Sequence[str] = (), depth: int | None = None,
               filters: Mapping[str, Any] | None = None, offset: int = 0, use_text: bool = True,
               feedback: int | None = None) -> SearchResponse:
        """``filters`` (``query/filters.py``) keep only matching documents before ranking; ``offset`` skips
        that many hits (paging: the order is the same across pages while ``offset + k`` <= ``depth``);
        ``use_text=False`` keeps ``auto`` from adding the text route (BM25 over captions); ``feedback``: top
        fused hits whose embeddings refine the dense query (pseudo-relevance feedback; None: ``auto``'s choice,
        else none; it needs the dense route)."""
        if offset < 0:
            raise ValueError(f"offset must be 0 or more, got {offset}")
        if feedback is not None and feedback < 0:
            raise ValueError(f"feedback must be 0 or more top hits, got {feedback}")
        if mode == "text" and not text:
            raise ValueError("mode 'text' needs a text query")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got '{fusion}'")
        if depth is not None and depth < 1:
            raise ValueError(f"depth must be a positive number of candidates, got {depth}")
        names = check_names(rerank)
        if mode == "auto":
            config = self.encoder.model.config
            decision = decide(text, image, config.keyword_alpha, config.feedback_docs)
            names = list(dict.fromkeys([*names, *decision.rerank]))
            decision = replace(decision, rerank=tuple(names))
            fusion, alpha = decision.fusion or fusion, decision.alpha if decision.alpha is not None else alpha
        else:
            decision = Decision(mode, tuple(names), "requested")
        if feedback is not None:
            if feedback and "dense" not in _ROUTES_OF.get(decision.mode, ()):
                raise ValueError(f"feedback refines the dense query: use mode dense, hybrid or auto, not "
                                 f"'{decision.mode}'")
            decision = replace(decision, feedback=feedback)
        depth = depth or self.depth
        phrases = self._embed_phrases([p for name in names for p in self.rerankers[name].phrases(text)])
        allowed = self.index.filter_rows(filters) if filters else None
        # The text route: asked for, or added by auto to a text query when the index has text to search.
        wanted = decision.mode == "text" or (mode == "auto" and use_text)
        text_query = text if text and wanted and self.index.has_text else None
        routes = (_ROUTES_OF[decision.mode] if decision.mode != "text" else ()) + (("text",) if text_query else ())
        if text_query and len(routes) > 1:
            fusion = "rrf"  # BM25 scores share no scale with the other routes': fuse by rank
            if decision.fusion not in (None, "rrf"):  # auto's own weighting does not apply: the decision says so
                decision = replace(decision, fusion="rrf", alpha=None,
                                   reason=f"{decision.reason}; with the captions' text route: fused by rank (RRF)")
        need_dense = "dense" in routes or bool(names)
        early = None  # idf weights: a text query's sparse route runs while the tower embeds it (no wait for it)
        if self.query_weights == "idf" and text and image is None:  # the lookup first; the tower for dense only
            query_sparse, expanded = self._expand(self._lookup(text), text, decision.mode, names)
            if "sparse" in routes and query_sparse and need_dense:
                early = self._pool.submit(self._route_lists, None, query_sparse, ("sparse",), k + offset, depth,
                                          True, allowed)
            dense = self.encoder.embed_texts([text]) if need_dense else np.zeros((1, 0), np.float32)
        else:
            query = self.encode_query(text, image)
            dense = query.dense
            query_sparse, expanded = self._expand(query.sparse[0], text, decision.mode, names)
        if text and not query_sparse and decision.mode in ("sparse", "hybrid"):
            decision = without_sparse(decision, chosen_by_auto=mode == "auto")
            routes = tuple(r for r in routes if r != "sparse") if mode == "auto" else routes
        deep = len(routes) > 1 or bool(names)
        lists = self._route_lists(dense, query_sparse, tuple(r for r in routes if not (early and r == "sparse")),
                                  k + offset, depth, deep, allowed, text_query)
        if early is not None:
            lists = early.result() | lists
        fetched = _fetch(k + offset, depth, deep)
        fused = self._fuse(lists, fusion, alpha, rrf_k, fetched)
        if decision.feedback and "dense" in lists and fused:
            lists["dense"] = self._feedback_list(dense[0], fused[:decision.feedback], fetched, allowed)
            fused = self._fuse(lists, fusion, alpha, rrf_k, fetched)
        if names:
            fused = self._rerank(fused, depth, names, dense[0], text, phrases)
        info = decision.to_dict() | ({"expanded": expanded} if expanded else {})
        if text_query:
            info["text"] = True
        elif decision.mode == "text":
            info["note"] = "this index has no text route (built before it, or its documents have no captions)"
        stood_for = self.index.vocabulary.piece_words(text) if text and query_sparse else {}
        query_words = {t: w for t, w in stood_for.items() if t in query_sparse}
        hits = self._describe(fused[offset : offset + k], query_sparse, explain, first_rank=offset + 1,
                              text=text_query, query_words=query_words)
        label = f"{decision.mode}+text" if text_query and decision.mode != "text" else decision.mode
        return SearchResponse(mode=label, fusion=fusion if len(routes) > 1 else None, hits=hits,
                              query_tokens=query_sparse, decision=info, query_words=query_words)

    def close(self) -> None:
        """Release the index's readers and this router's sparse-route threads (both reopen if used again)."""
        self._pool.shutdown(wait=False)
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sparse-route")
        self.index.close()

    def _lookup(self, text: str) -> dict[str, float]:
        """The inference-free sparse query vector (the index's idf table, computed once per router)."""
        if self._idf is None:
            self._idf = idf_table(*self.index.document_frequencies())
        return lookup_query(self.index.vocabulary, text, self._idf)

    def _expand(self, query_sparse: dict[str, float], text: str | None, mode: str, names: list[str]
                ) -> tuple[dict[str, float], dict[str, str]]:
        """S^3 query expansion on the sparse route (synonym tokens, down-weighted), when S^3 is enabled."""
        s3 = self.rerankers["s3"]
        if "s3" not in names or not text or mode not in ("sparse", "hybrid") or not s3.expansion:
            return query_sparse, {}
        from stair_search.query.expand import expand_sparse

        return expand_sparse(query_sparse, text, self.index.vocabulary, s3.expansion, source=s3.source)

    def search_vectors(self, dense: Sequence[float] | np.ndarray | None = None,
                       sparse: Mapping[str, float] | None = None, mode: str = "auto", k: int = 10,
                       fusion: str = "rrf", alpha: float = 0.5, explain: bool = False,
                       filters: Mapping[str, Any] | None = None, offset: int = 0,
                       exclude: Sequence[str] = ()) -> SearchResponse:
        """Search with a given dense embedding and/or a ``{word-piece: weight}`` sparse query (nothing is
        encoded), each checked against the index: the embedding's width, the tokens in its vocabulary. ``auto``
        uses every route it was given; ``exclude``: ids left out of the hits (more like this)."""
        dense_vector = self._checked_dense(dense) if dense is not None else None
        sparse_query = self._checked_sparse(sparse) if sparse is not None else {}
        given = [route for route, present in (("dense", dense_vector is not None), ("sparse", bool(sparse_query)))
                 if present]
        if not given:
            raise ValueError("give a dense vector, a non-empty sparse query, or both")
        if mode == "auto":
            mode = "hybrid" if len(given) == 2 else given[0]
        if mode not in ("sparse", "dense", "hybrid") or any(r not in given for r in _ROUTES_OF[mode]):
            raise ValueError(f"mode '{mode}' needs {' and '.join(_ROUTES_OF.get(mode, ('a known mode',)))}; "
                             f"this query gives {' and '.join(given)}")
        allowed = self.index.filter_rows(filters) if filters else None
        wanted = k + offset + len(exclude)
        fused = self._retrieve(dense_vector[None] if dense_vector is not None else None, sparse_query,
                               _ROUTES_OF[mode], wanted, self.depth, fusion, alpha, RRF_K, False, allowed)
        if exclude:
            hidden = {self.index.find(doc_id) for doc_id in exclude} - {None}
            fused = [f for f in fused if Candidate(*f.key, 0.0) not in hidden]
        hits = self._describe(fused[offset : offset + k], sparse_query, explain, first_rank=offset + 1)
        return SearchResponse(mode=mode, fusion=fusion if mode == "hybrid" else None, hits=hits,
                              query_tokens=sparse_query, decision={"mode": mode, "rerank": [], "reason": "vectors"})

    def more_like(self, doc_id: str, **options: Any) -> SearchResponse:
        """Documents like a stored one: its own dense and sparse vectors as the query, itself left out. Takes
        :meth:`search_vectors`' options."""
        found = self.index.find(doc_id)
        if found is None:
            raise KeyError(f"no document with id '{doc_id[:200]}' in {self.index.dir}")
        dense, sparse = self.index.vectors([found])[0], self.index.sparse_vectors([found])[0]
        return self.search_vectors(dense=dense, sparse=sparse or None, exclude=[doc_id], **options)

    def _checked_dense(self, dense: Sequence[float] | np.ndarray) -> np.ndarray:
        vector = np.asarray(dense, dtype=np.float32).reshape(-1)
        width = self.index.manifest.embed_dim
        if vector.shape != (width,) or not np.isfinite(vector).all() or not np.any(vector):
            raise ValueError(f"the dense vector must be {width} finite numbers, not all zero (this index's "
                             f"embedding width); got {vector.size}")
        return vector / np.linalg.norm(vector)

    def _checked_sparse(self, sparse: Mapping[str, float]) -> dict[str, float]:
        vocabulary = self.index.vocabulary.index
        unknown = [token for token in sparse if token not in vocabulary]
        if unknown:
            raise ValueError(f"sparse query tokens not in the index's vocabulary: {unknown[:10]} (tokens are "
                             f"word-pieces such as 'dog' or '##s')")
        bad = [token for token, weight in sparse.items() if not (np.isfinite(weight) and weight >= 0)]
        if bad:
            raise ValueError(f"sparse query weights must be finite and >= 0: {bad[:10]}")
        return {token: float(weight) for token, weight in sparse.items() if weight > 0}

    def _retrieve(self, dense: np.ndarray | None, query_sparse: dict[str, float], routes: Sequence[str], k: int,
                  depth: int, fusion: str, alpha: float, rrf_k: int, reranking: bool, allowed: Allowed | None,
                  text: str | None = None) -> list[Fused]:
        deep = len(routes) > 1 or reranking
        lists = self._route_lists(dense, query_sparse, routes, k, depth, deep, allowed, text)
        return self._fuse(lists, fusion, alpha, rrf_k, _fetch(k, depth, deep))

    def _route_lists(self, dense: np.ndarray | None, query_sparse: dict[str, float], routes: Sequence[str], k: int,
                     depth: int, deep: bool, allowed: Allowed | None, text: str | None = None
                     ) -> dict[str, list[Candidate]]:
        """Each route's candidates: ``max(k, depth)`` of them when ``deep`` (fused or reranked), else ``k``."""
        fetch = _fetch(k, depth, deep)
        lists: dict[str, list[Candidate]] = {}
        if "sparse" in routes:
            lists["sparse"] = self.index.search_sparse([query_sparse], fetch, rows=allowed)[0]
        if "dense" in routes:
            lists["dense"] = self.index.search_dense(dense, fetch, rows=allowed)[0]
        if "text" in routes and text:
            lists["text"] = self.index.search_text([text], fetch, rows=allowed)[0]
        return lists

    def _feedback_list(self, query: np.ndarray, top: Sequence[Fused], count: int, allowed: Allowed | None
                       ) -> list[Candidate]:
        """The dense route again, its query moved toward the mean stored embedding of the ``top`` fused hits."""
        vectors = candidate_vectors(self.index, _candidates(top))
        moved = np.asarray(query, np.float32) + FEEDBACK_WEIGHT * vectors.mean(axis=0)
        return self.index.search_dense((moved / np.linalg.norm(moved))[None], count, rows=allowed)[0]

    @staticmethod
    def _fuse(lists: Mapping[str, list[Candidate]], fusion: str, alpha: float, rrf_k: int, fetched: int
              ) -> list[Fused]:
        """``fetched``: how many candidates each route was asked for (a shorter matching list is complete)."""
        keyed = {route: [((c.shard, c.row), c.score) for c in cands] for route, cands in lists.items()}
        if len(keyed) == 1:  # one route: keep its own scores
            (route, ranked), = keyed.items()
            return [Fused(key, score, {route: score}) for key, score in ranked]
        if not keyed:
            return []
        if fusion == "convex":
            floors = {route: 0.0 for route in _MATCHING_ROUTES if route in lists and len(lists[route]) < fetched}
            return convex(keyed, alpha, floors)
        return rrf(keyed, rrf_k)

    def _rerank(self, fused: list[Fused], depth: int, names: list[str], query: np.ndarray, text: str | None,
                phrases: dict[str, np.ndarray]) -> list[Fused]:
        """Score the top ``depth`` candidates with each reranker; order them by RRF over first stage + rerankers."""
        head, tail = fused[:depth], fused[depth:]
        if not head:
            return fused
        candidates = _candidates(head)
        local, positions = self.index.local_features(candidates)
        inputs = RerankInput(query=np.asarray(query, np.float32), vectors=candidate_vectors(self.index, candidates),
                             local=local.astype(np.float32), positions=positions.astype(np.float32),
                             logit_scale=self.logit_scale, text=text, phrases=phrases)
        orders = {FIRST_STAGE: [(f.key, f.score) for f in head]}
        for name in names:
            scores = self.rerankers[name].score(inputs)
            for f, score in zip(head, scores, strict=True):
                f.parts[name] = float(score)
            orders[name] = sorted(((f.key, f.parts[name]) for f in head), key=lambda pair: -pair[1])
        by_key = {f.key: f for f in head}
        reranked = rrf(orders, RRF_K)  # best first; ties keep the first-stage order
        for f in reranked:
            by_key[f.key].score = f.score
        return [by_key[f.key] for f in reranked] + tail

    def _remember(self, fresh: dict[str, np.ndarray]) -> None:
        """Cache phrase embeddings (bounded: emptied when full; the auxiliary prompts come back at once)."""
        with self._lock:
            if len(self._phrases) + len(fresh) > PHRASE_CACHE_SIZE:
                self._phrases.clear()
            self._phrases.update(fresh)

    def _describe(self, fused: list[Fused], query_sparse: dict[str, float], explain: bool,
                  first_rank: int = 1, text: str | None = None, query_words: Mapping[str, str] | None = None
                  ) -> list[SearchHit]:
        """The hits of ``fused`` with their stored fields and, with ``explain``, what they matched (each token a
        piece of a longer query word says which: ``query_words``)."""
        candidates = _candidates(fused)
        docs = self.index.documents(candidates, ["id", "source", "caption", "metadata"])
        hits = []
        for rank, (f, cand, doc) in enumerate(zip(fused, candidates, docs, strict=True), start=first_rank):
            matched = self.index.explain(cand, query_sparse) if explain else None
            hits.append(SearchHit(rank=rank, id=doc["id"], score=f.score, source=doc["source"],
                                  caption=doc.get("caption", ""), metadata=doc.get("metadata", {}),
                                  parts=f.parts, matched=matched,
                                  text_matched=self.index.text_matches(cand, text) if explain and text else None,
                                  matched_words={t: w for t, w in (query_words or {}).items() if t in (matched or {})}))
        return hits


def _fetch(k: int, depth: int, deep: bool) -> int:
    """Candidates each route is asked for: ``max(k, depth)`` when fused or reranked (``deep``), else ``k``."""
    return max(k, depth) if deep else k


def _candidates(fused: Sequence[Fused]) -> list[Candidate]:
    """The index candidates behind fused hits (their keys are (shard, row)), with the fused scores."""
    return [Candidate(shard, row, f.score) for f in fused for shard, row in [f.key]]
