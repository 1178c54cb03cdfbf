"""QueryRouter: answer a :class:`SearchRequest`: plan it, encode the query once, run the first stage over the
shards, fuse, rerank the top candidates, and describe each hit.

The query path: the plan (``retrieve/plan.py``: validate, decide the routes; ``auto``: its rule) ->
embed (dense only, cached per router) every phrase the rerankers need, and encode the query -> one first-stage
query to every shard (``index.ShardQuery``: sparse, optionally S^3-expanded, and/or dense and/or the text route,
``depth`` candidates each, filtered in the shard) -> fusion (RRF or convex) -> rerankers over the top ``depth``
fused candidates, using the vectors stored in the index (never the image files) -> the top k, each hit with its
per-route and per-reranker score parts. A stored document (``like``) or given vectors skip the encoder.

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
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stair_search.encode import Encoder
from stair_search.index import Candidate, IndexReader, ShardQuery
from stair_search.query.filters import Filter
from stair_search.query.weights import QUERY_WEIGHTS, idf_table, lookup_query
from stair_search.rerank import RERANKERS, check_local_features, make_reranker
from stair_search.rerank.base import RerankInput
from stair_search.retrieve.fusion import RRF_K, Fused, convex, rrf
from stair_search.retrieve.plan import NO_WORDS, NOT_EMITTED, Plan, not_indexed, plan_query, plan_vectors
from stair_search.retrieve.request import SearchRequest
from stair_search.vectors import EncodedBatch, unit

PHRASE_CACHE_SIZE = 10_000
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
    missing_shards: list[str] = field(default_factory=list)  # left out of a partial answer (``request.partial``)


@dataclass
class _Query:
    """A text or image query once encoded: the dense query, the sparse one (after any expansion)."""

    dense: np.ndarray  # (1, D), or (1, 0) when no dense route or reranker needs it
    sparse: dict[str, float]
    expanded: dict[str, str] = field(default_factory=dict)
    early: dict[str, tuple[Future, int]] = field(default_factory=dict)  # route -> (its list, running; its fetch)


def open_router(index_dir: str | Path, model: str | None = None, depth: int = 100,
                query_weights: str = "auto") -> QueryRouter:
    """An index and the encoder it was built with (or ``model``, which must match it); ``query_weights``: see
    :class:`QueryRouter`."""
    index = IndexReader(index_dir)
    recorded = index.manifest.model
    encoder = Encoder(model or recorded["spec"], pretrained=None if model else recorded.get("pretrained"))
    return QueryRouter(index, encoder, depth=depth, query_weights=query_weights)


class QueryRouter:
    def __init__(self, index: IndexReader, encoder: Encoder, depth: int = 100,
                 reranker_knobs: dict[str, dict[str, Any]] | None = None, query_weights: str = "auto"):
        """``depth``: candidates per route and how many fused candidates are reranked (the issue's N).
        ``reranker_knobs``: name -> keyword arguments of that reranker (see ``stair_search.rerank``).
        ``query_weights``: "model" (the text tower weighs a query's word-pieces) or "idf": a text query on the
        sparse route alone, without rerankers, is weighted by the index's idf and never runs the text tower
        (inference-free, ``query/weights.py``; for grounded models, whose queries hold only their own pieces;
        as good as the tower's weights on the emoji test split, 50x faster: benchmarks/query_weights.py).
        "auto": "idf" for a grounded model, else "model"."""
        index.manifest.check_model(encoder.record)
        if query_weights not in QUERY_WEIGHTS:
            raise ValueError(f"query_weights must be one of {QUERY_WEIGHTS}, got '{query_weights}'")
        grounded = bool(encoder.config.ground_text)
        if query_weights == "auto":
            query_weights = "idf" if grounded else "model"
        if query_weights == "idf" and not grounded:
            raise ValueError(f"query_weights 'idf' needs a grounded model (a query's sparse vector holding only "
                             f"its own words); {encoder.name} is not: use 'model'")
        self.index, self.encoder, self.depth, self.query_weights = index, encoder, depth, query_weights
        self._idf: np.ndarray | None = None
        self._emitted: np.ndarray | None = None  # (V,) bool: the word-pieces the model's heads may emit
        # idf weights: the sparse route of a text query runs on this pool while the tower embeds the query
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sparse-route")
        self.logit_scale = encoder.logit_scale  # BSAP's temperature, read once
        self.rerankers = _Rerankers(reranker_knobs or {})
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

    def search(self, request: SearchRequest) -> SearchResponse:
        """Answer one request (see :class:`SearchRequest`)."""
        kind = request.kind
        if kind == "like":
            return self._more_like(request)
        if kind == "vectors":
            dense = self._checked_dense(request.dense) if request.dense is not None else None
            sparse = self._checked_sparse(request.sparse) if request.sparse is not None else {}
            return self._search_vectors(request, dense, sparse)
        return self._search_encoded(request)

    def _search_encoded(self, request: SearchRequest) -> SearchResponse:
        config = self.encoder.config
        plan = plan_query(request, has_text=self.index.has_text, default_depth=self.depth,
                          keyword_alpha=config.keyword_alpha, feedback_docs=config.feedback_docs)
        check_local_features(request.rerank, getattr(getattr(self.index, "manifest", None), "calibration", None))
        text, k, offset = request.text, request.k, request.offset
        phrases = self._embed_phrases([p for name in plan.rerank for p in self.rerankers[name].phrases(text)])
        flt = self.index.check_filter(request.filters) if request.filters else None
        missing: list[str] | None = [] if request.partial else None
        early = self._early_text(plan, flt, k + offset, missing)
        query = self._encode(plan, flt, missing)
        if text and not query.sparse:
            plan = plan.without_sparse(self._no_sparse_cause(text))
        fetched = plan.fetch(k + offset)
        lists = self._first_stage(plan, query, flt, fetched, missing, early)
        fused = self._fuse(lists, plan, fetched)
        feedback = plan.decision.feedback
        if feedback and "dense" in lists and fused:
            lists["dense"] = self._feedback_list(query.dense[0], fused[:feedback], fetched, flt, missing)
            fused = self._fuse(lists, plan, fetched)
        if plan.rerank:
            fused = self._rerank(fused, plan.depth, list(plan.rerank), query.dense[0], text, phrases)
        info = self._decision(plan, query, lists, flt)
        stood_for = self.index.vocabulary.piece_words(text) if text and query.sparse else {}
        query_words = {t: w for t, w in stood_for.items() if t in query.sparse}
        hits = self._describe(fused[offset : offset + k], query.sparse, request.explain, first_rank=offset + 1,
                              text=plan.text_query, query_words=query_words)
        return SearchResponse(mode=plan.label, fusion=plan.fused_by, hits=hits, query_tokens=query.sparse,
                              decision=info, query_words=query_words, missing_shards=sorted(set(missing or ())))

    def _decision(self, plan: Plan, query: _Query, lists: Mapping[str, list[Candidate]],
                  flt: Filter | None) -> dict[str, Any]:
        """What the response says of the plan that ran: its decision, S^3's expansion, the text route, and a note
        when a route could not answer (no text route; a sparse query no indexed document matches)."""
        info = plan.decision.to_dict() | ({"expanded": query.expanded} if query.expanded else {})
        if plan.text_query:
            info["text"] = True
        elif plan.decision.mode == "text":
            info["note"] = "this index has no text route (built before it, or its documents have no captions)"
        grounded = self.encoder.config.ground_text  # its sparse query holds the query's own words only
        if grounded and "sparse" in lists and not lists["sparse"] and query.sparse and "note" not in info:
            info["note"] = f"{not_indexed(list(query.sparse), filtered=flt is not None)}, so the sparse route " \
                           f"matched nothing"
        return info

    def _no_sparse_cause(self, text: str) -> str:
        """Why ``text``'s sparse vector came out empty: it has no word to search by, the model emits none of its
        word-pieces, the model gives them no weight, or (idf weights) no indexed document carries them."""
        vocabulary = self.index.vocabulary
        idf = self.query_weights == "idf"
        pieces = vocabulary.first_word_pieces(text) if idf else vocabulary.token_ids(text)
        if not pieces:
            return NO_WORDS
        if self._emitted is None:
            self._emitted = np.zeros(len(vocabulary), bool)
            self._emitted[vocabulary.emit_ids(self.encoder.config.emit_tokens)] = True
        emitted = [vocabulary.tokens[p] for p in dict.fromkeys(pieces) if self._emitted[p]]
        if not emitted:
            return NOT_EMITTED
        return not_indexed(emitted) if idf else "the model gives none of the query's word-pieces any weight"

    def _early_text(self, plan: Plan, flt: Filter | None, wanted: int, missing: list[str] | None
                    ) -> dict[str, tuple[Future, int]]:
        """The text route (BM25 over the captions) started on this router's pool before the query is encoded: it
        needs no vectors, and its first call may start the JVM, which then overlaps the encode."""
        if "text" not in plan.routes:
            return {}
        fetch = plan.fetch(wanted)
        return {"text": (self._pool.submit(self.index.search, ShardQuery(fetch, text=plan.text_query, filter=flt),
                                           missing), fetch)}

    def _encode(self, plan: Plan, flt: Filter | None, missing: list[str] | None) -> _Query:
        """Encode the query once. With idf query weights, a text query's sparse vector is the index's lookup and
        its sparse route starts at once on this router's pool, while the tower embeds the query (dense only)."""
        request = plan.request
        text, mode = request.text, plan.decision.mode
        need_dense = "dense" in plan.routes or bool(plan.rerank)
        if self.query_weights == "idf" and text and request.image is None:  # the lookup first; the tower for dense
            sparse, expanded = self._expand(self._lookup(text), text, mode, plan.rerank)
            early = {}
            if "sparse" in plan.routes and sparse and need_dense:
                fetch = plan.fetch(request.k + request.offset)
                early["sparse"] = (self._pool.submit(self.index.search, ShardQuery(fetch, sparse=sparse, filter=flt),
                                                     missing), fetch)
            dense = self.encoder.embed_texts([text]) if need_dense else np.zeros((1, 0), np.float32)
            return _Query(dense, sparse, expanded, early)
        encoded = self.encode_query(text, request.image)
        sparse, expanded = self._expand(encoded.sparse[0], text, mode, plan.rerank)
        return _Query(encoded.dense, sparse, expanded)

    def _first_stage(self, plan: Plan, query: _Query, flt: Filter | None, fetch: int, missing: list[str] | None,
                     early_text: Mapping[str, tuple[Future, int]]) -> dict[str, list[Candidate]]:
        """Each route's candidates, from one query to every shard (the sparse and text routes' may be running
        already), in the shards' route order (fusion reads it: ties keep the first list's order, convex weighs the
        first route by alpha)."""
        early = {route: future for route, (future, asked) in (query.early | dict(early_text)).items()
                 if route in plan.routes and asked == fetch}
        routes = tuple(r for r in plan.routes if r not in early)
        full = ShardQuery(fetch, sparse=query.sparse if "sparse" in plan.routes else None,
                          dense=query.dense[0] if "dense" in plan.routes else None,
                          text=plan.text_query if "text" in plan.routes else None, filter=flt)
        asked = replace(full, **{route: None for route in ("sparse", "dense", "text") if route not in routes})
        lists = self.index.search(asked, missing) if asked.routes() else {}
        for future in early.values():
            lists |= future.result()
        return {route: lists[route] for route in full.routes() if route in lists}

    def _more_like(self, request: SearchRequest) -> SearchResponse:
        """Documents like a stored one: its own dense and sparse vectors as the query, itself left out."""
        doc_id = request.like
        found = self.index.find(doc_id)
        if found is None:
            raise KeyError(f"no document with id '{doc_id[:200]}' in {self.index.dir}")
        dense, sparse = self.index.vectors([found])[0], self.index.sparse_vectors([found])[0]
        return self._search_vectors(request, self._checked_dense(dense),
                                    self._checked_sparse(sparse) if sparse else {}, exclude=(doc_id,))

    def _search_vectors(self, request: SearchRequest, dense: np.ndarray | None, sparse: dict[str, float],
                        exclude: Sequence[str] = ()) -> SearchResponse:
        """Search with a dense embedding and/or a ``{word-piece: weight}`` sparse query, both checked against the
        index (nothing is encoded); ``exclude``: ids left out of the hits."""
        given = tuple(route for route, present in (("dense", dense is not None), ("sparse", bool(sparse)))
                      if present)
        plan = plan_vectors(request, given, self.depth)
        flt = self.index.check_filter(request.filters) if request.filters else None
        fetched = plan.fetch(request.k + request.offset + len(exclude))
        asked = ShardQuery(fetched, sparse=sparse if "sparse" in plan.routes else None,
                           dense=dense if "dense" in plan.routes else None, filter=flt)
        missing: list[str] | None = [] if request.partial else None
        fused = self._fuse(self.index.search(asked, missing), plan, fetched)
        if exclude:
            hidden = {self.index.find(doc_id) for doc_id in exclude} - {None}
            fused = [f for f in fused if Candidate(*f.key, 0.0) not in hidden]
        offset = request.offset
        hits = self._describe(fused[offset : offset + request.k], sparse, request.explain, first_rank=offset + 1)
        return SearchResponse(mode=plan.decision.mode, fusion=plan.fused_by, hits=hits, query_tokens=sparse,
                              decision=plan.decision.to_dict(), missing_shards=sorted(set(missing or ())))

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

    def _expand(self, query_sparse: dict[str, float], text: str | None, mode: str, names: Sequence[str]
                ) -> tuple[dict[str, float], dict[str, str]]:
        """S^3 query expansion on the sparse route (synonym tokens, down-weighted), when S^3 is enabled."""
        if "s3" not in names or not text or mode not in ("sparse", "hybrid") or not self.rerankers["s3"].expansion:
            return query_sparse, {}
        s3 = self.rerankers["s3"]
        from stair_search.query.expand import expand_sparse

        return expand_sparse(query_sparse, text, self.index.vocabulary, s3.expansion, source=s3.source)

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

    def _feedback_list(self, query: np.ndarray, top: Sequence[Fused], count: int, flt: Filter | None,
                       missing: list[str] | None) -> list[Candidate]:
        """The dense route again, its query moved toward the mean stored embedding of the ``top`` fused hits."""
        vectors = unit(self.index.vectors(_candidates(top)))
        moved = np.asarray(query, np.float32) + FEEDBACK_WEIGHT * vectors.mean(axis=0)
        return self.index.search(ShardQuery(count, dense=moved / np.linalg.norm(moved), filter=flt), missing)["dense"]

    @staticmethod
    def _fuse(lists: Mapping[str, list[Candidate]], plan: Plan, fetched: int) -> list[Fused]:
        """``fetched``: how many candidates each route was asked for (a shorter matching list is complete)."""
        keyed = {route: [((c.shard, c.row), c.score) for c in cands] for route, cands in lists.items()}
        if len(keyed) == 1:  # one route: keep its own scores
            (route, ranked), = keyed.items()
            return [Fused(key, score, {route: score}) for key, score in ranked]
        if not keyed:
            return []
        if plan.fusion == "convex":
            floors = {route: 0.0 for route in _MATCHING_ROUTES if route in lists and len(lists[route]) < fetched}
            return convex(keyed, plan.alpha, floors)
        return rrf(keyed, plan.request.rrf_k)

    def _rerank(self, fused: list[Fused], depth: int, names: list[str], query: np.ndarray, text: str | None,
                phrases: dict[str, np.ndarray]) -> list[Fused]:
        """Score the top ``depth`` candidates with each reranker; order them by RRF over first stage + rerankers."""
        head, tail = fused[:depth], fused[depth:]
        if not head:
            return fused
        candidates = _candidates(head)
        vectors, local, positions = self.index.features(candidates)
        inputs = RerankInput(query=np.asarray(query, np.float32), vectors=unit(vectors),
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
        described = self.index.describe(candidates, ["id", "source", "caption", "metadata"],
                                        query_sparse if explain else None, text if explain and text else None)
        hits = []
        for rank, (f, (doc, matched, text_matched)) in enumerate(zip(fused, described, strict=True),
                                                                 start=first_rank):
            hits.append(SearchHit(rank=rank, id=doc["id"], score=f.score, source=doc["source"],
                                  caption=doc.get("caption", ""), metadata=doc.get("metadata", {}),
                                  parts=f.parts, matched=matched, text_matched=text_matched,
                                  matched_words={t: w for t, w in (query_words or {}).items() if t in (matched or {})}))
        return hits


class _Rerankers(Mapping[str, Any]):
    """The rerankers by name, each built on first use with its knobs: a search that reranks nothing imports none
    of their modules (S^3's brings scipy's graph routines: ~0.3 s of a CLI search)."""

    def __init__(self, knobs: Mapping[str, Mapping[str, Any]]):
        self._knobs, self._built = knobs, {}
        self._lock = threading.Lock()

    def __getitem__(self, name: str) -> Any:
        with self._lock:
            if name not in self._built:
                if name not in RERANKERS:
                    raise KeyError(name)
                self._built[name] = make_reranker(name, **self._knobs.get(name, {}))
            return self._built[name]

    def __iter__(self) -> Iterator[str]:
        return iter(RERANKERS)

    def __len__(self) -> int:
        return len(RERANKERS)


def _candidates(fused: Sequence[Fused]) -> list[Candidate]:
    """The index candidates behind fused hits (their keys are (shard, row)), with the fused scores."""
    return [Candidate(shard, row, f.score) for f in fused for shard, row in [f.key]]
