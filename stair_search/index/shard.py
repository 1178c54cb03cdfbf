"""One shard behind a narrow interface: what a shard is asked, and what it answers.

Why an interface: everything above a shard (the reader's fan-out and merge, the query plan, fusion, reranking,
hit descriptions) talks to shards only through :class:`Shard`, by row numbers and plain values (numpy arrays,
dicts, lists of ``(row, score)``), so a shard can live in this process (:class:`LocalShard`) or in another
process or machine without the plan or the fusion knowing. A shard applies a query's filter itself, before it
ranks (so a filter that keeps 1% of the documents still gets k hits), and never answers a deleted row.

:class:`LocalShard` opens its parts on first use (once, under a lock) and checks each against the manifest: the
JVM starts only on the first sparse search, FAISS only on the first dense one, and two requests arriving
together open one Lucene searcher, not two.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from stair_search.index.dense import DenseShard, DenseSpec
from stair_search.index.files import DamagedIndexError, FileChangedError, FileIdentity, identities
from stair_search.index.layout import DENSE_FILE, SPARSE_DIR, read_tombstone
from stair_search.index.manifest import Manifest, ShardInfo
from stair_search.index.sparse import SparseShard
from stair_search.index.store import FeatureStore, array_paths, store_files, store_path
from stair_search.index.text import TEXT_DIR, TextShard
from stair_search.query.filters import Filter
from stair_search.vocabulary import Vocabulary

ROUTES = ("sparse", "dense", "text")
# A filtered dense search scores up to this many allowed rows of a shard exactly (their vectors read back);
# beyond it, the shard's FAISS search over-fetches until k allowed rows are found.
EXACT_FILTERED_ROWS = 50_000
# A shard with deleted rows first asks its parts for k + min(deleted, this * k) rows (``_fetch_depth``).
MAX_EXTRA_DEPTH = 1
FILTERS_REMEMBERED = 8  # per shard: one request asks its shards up to three times with the same filter
RowHits = list[tuple[int, float]]  # (row, score), best first
Answer = dict[str, RowHits]  # route -> its hits
Features = tuple[np.ndarray, np.ndarray, np.ndarray]  # (N, D) embeddings, (N, m, D) local features, (N, m, 2)
# A hit's description: stored fields (None: deleted), matched word-pieces, matched text words (None: not asked)
Described = tuple[dict | None, dict[str, tuple[float, float]] | None, dict[str, int] | None]


class ShardUnavailable(RuntimeError):
    """A shard that cannot answer now (every copy of it is down); the message names it."""

    def __init__(self, shard: str, why: str):
        super().__init__(f"shard {shard} has no ready copy ({why})")
        self.shard = shard


class Pending(Protocol):
    """A first-stage answer on its way (a shard in another process answers while the others search)."""

    def result(self) -> Answer: ...


@dataclass(frozen=True)
class Done:
    """An answer already there (a shard in this process searches at once)."""

    answer: Answer

    def result(self) -> Answer:
        return self.answer


@dataclass(frozen=True)
class ShardQuery:
    """One first-stage query, the same for every shard: each route's query (None: that route is not run),
    how many candidates per route, and the filter every candidate must pass."""

    k: int
    sparse: Mapping[str, float] | None = None  # {word-piece: weight}
    dense: np.ndarray | None = None  # (D,) unit float32
    text: str | None = None  # the text route's (BM25) query
    filter: Filter | None = None

    def routes(self) -> tuple[str, ...]:
        return tuple(route for route in ROUTES if getattr(self, route) is not None)


class Shard(Protocol):
    """What the reader (and so every caller above it) may ask of one shard; rows are the shard's own."""

    info: ShardInfo

    def submit(self, query: ShardQuery) -> Pending:
        """Each asked route's best ``query.k`` live rows that pass the filter, best first; equal scores in row
        order (``Pending.result``; raises ShardUnavailable)."""

    def ready(self) -> bool:
        """Whether the shard can answer now."""

    def find(self, doc_id: str) -> int | None:
        """The live row holding ``doc_id``, or None."""

    def documents(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> list[dict | None]:
        """Stored fields of each row, in order; None for a deleted row."""

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """(N, D) stored dense embeddings (read back from FAISS)."""

    def sparse_vectors(self, rows: Sequence[int]) -> list[dict[str, float]]: ...

    def features(self, rows: Sequence[int]) -> Features:
        """What the rerankers read of each row, in one call: (N, D) stored embeddings, (N, m, D) local features
        and (N, m, 2) positions (float16)."""

    def describe(self, rows: Sequence[int], columns: Sequence[str], sparse: Mapping[str, float] | None,
                 text: str | None) -> list[Described]:
        """What a hit shows, in one call: each row's stored ``columns`` (None for a deleted row), with ``sparse``
        its matched word-pieces {token: (query weight, document weight)}, with ``text`` its analyzed words that
        the text query holds {word: count}."""

    def metadata_fields(self) -> frozenset[str]: ...

    def live_rows(self) -> list[int]: ...

    def ids(self) -> list[str]:
        """Ids of the live rows, in row order."""

    def term_statistics(self) -> tuple[np.ndarray, int]:
        """(per vocabulary token, how many stored rows hold it; stored rows), deleted rows included."""

    def nonzeros(self) -> np.ndarray:
        """Stored sparse non-zeros of every row (deleted rows included)."""

    def warm(self) -> None: ...

    def close(self) -> None: ...


class _Metadata(list):
    """A shard's rows' metadata, in row order, and every field any of them has (what a filter may name)."""

    def __init__(self, rows: Iterable[dict]):
        super().__init__(rows)
        self.fields = frozenset(name for metadata in self for name in metadata)


class LocalShard:
    """A shard read from its folder in this process: sparse (Lucene / Seismic), dense (FAISS), the feature
    store and the text route."""

    def __init__(self, index_dir: Path, info: ShardInfo, vocabulary: Vocabulary, scale: float):
        self.dir, self.info, self.vocabulary, self.scale = info.path(index_dir), info, vocabulary, scale
        required = [self.dir / DENSE_FILE, *store_files(store_path(self.dir)),  # features.arrow or an old .parquet
                    *SparseShard.required_files(self.dir / SPARSE_DIR),
                    *([self.dir / TEXT_DIR] if info.text else [])]
        missing = [str(p) for p in required if not p.exists()]
        if missing:
            raise FileNotFoundError(f"Index shard {info.name} is incomplete, missing {missing}. Restore the files "
                                    f"or rebuild the index; searching it would silently lose documents.")
        self.deleted = frozenset(read_tombstone(self.dir, info.deleted, info.name).tolist())
        self._parts: dict[str, Any] = {}
        self._files: dict[str, list[FileIdentity]] = {}  # part -> its mapped files as they were opened
        self._lock = threading.RLock()  # re-entrant: one part may open another (metadata reads the store)
        self._filter_rows: dict[Filter, np.ndarray] = {}  # the last few filters' rows (``_filtered``)
        self._searched: tuple[DenseShard, bool] | None = None  # this view's dense searcher (``_dense_searcher``)

    @classmethod
    def open(cls, index_dir: Path, manifest: Manifest, info: ShardInfo, vocabulary: Vocabulary) -> LocalShard:
        """The ``reader.ShardOpener`` of shards read in this process."""
        return cls(index_dir, info, vocabulary, manifest.scale)

    def with_deletes(self, info: ShardInfo, tombstones: Path | None = None) -> LocalShard:
        """This shard as ``info`` says after a delete: its tombstone file (read from ``tombstones``, the shard's
        folder by default) applied to the same parts, which both share (nothing is opened again)."""
        if (info.name, info.count) != (self.info.name, self.info.count):
            raise ValueError(f"{info.name} ({info.count} rows) is another shard than {self.info.name} "
                             f"({self.info.count} rows)")
        view = object.__new__(LocalShard)
        view.dir, view.info, view.vocabulary, view.scale = self.dir, info, self.vocabulary, self.scale
        view.deleted = frozenset(read_tombstone(tombstones or self.dir, info.deleted, info.name).tolist())
        view._parts, view._files, view._lock, view._filter_rows = self._parts, self._files, self._lock, {}
        view._searched = None  # its own deleted rows: its own copy without them
        return view

    # ---------------------------------------------------------------------------------------------- searching

    def submit(self, query: ShardQuery) -> Done:
        return Done(self.search(query))

    def ready(self) -> bool:
        return True

    def search(self, query: ShardQuery) -> Answer:
        """Each asked route's best ``query.k`` live rows that pass the filter (see :class:`Shard`)."""
        rows = self._filtered(query.filter) if query.filter is not None else None
        found: dict[str, RowHits] = {}
        if query.sparse is not None:
            found["sparse"] = self._sparse(query.sparse, query.k, rows)
        if query.dense is not None:
            found["dense"] = self._dense(np.asarray(query.dense, np.float32), query.k, rows)
        if query.text is not None:
            found["text"] = self._text(query.text, query.k, rows)
        return {route: _best(hits, query.k) for route, hits in found.items()}

    def _sparse(self, query: Mapping[str, float], k: int, rows: np.ndarray | None) -> RowHits:
        if rows is not None:
            return [(h.row, h.score) for h in self.sparse.search_rows(query, rows, k)] if len(rows) else []
        return self._live(lambda n: [(h.row, h.score) for h in self.sparse.batch_search([query], n, 1)[0]], k)

    def _dense(self, query: np.ndarray, k: int, rows: np.ndarray | None) -> RowHits:
        if rows is not None:
            return self._dense_among(query, rows, k) if len(rows) else []
        dense, live_only = self._dense_searcher()

        def search(n: int) -> RowHits:
            scores, found = dense.search(query[None, :], n)
            return [(int(r), float(sc)) for sc, r in zip(scores[0], found[0], strict=True) if r >= 0]

        return search(k) if live_only else self._live(search, k)

    def _dense_searcher(self) -> tuple[DenseShard, bool]:
        """The dense index this view's searches read, and whether it leaves the deleted rows out already. With
        deleted rows, flat and IVF-PQ are read through a copy in memory without them (``DenseShard.without``,
        made once per view from the file: the shard's own index is then not held), so a query scans the live
        rows only, as in the compacted shard; HNSW (no removal from its graph) skips them as filters do."""
        if not self.deleted:
            return self.dense, True
        with self._lock:
            if self._searched is None:
                self._searched = self._without_deleted()
            return self._searched

    def _without_deleted(self) -> tuple[DenseShard, bool]:
        if self.info.dense.get("kind") == "hnsw":
            return self.dense, False
        full = self._parts.get("dense") or self._checked(
            DenseShard.load(self.dir / DENSE_FILE, DenseSpec.from_dict(self.info.dense)))
        live = full.without(np.fromiter(sorted(self.deleted), dtype=np.int64, count=len(self.deleted)))
        return (live, True) if live is not None else (self.dense, False)

    def _stored_vectors(self, rows: Sequence[int] | np.ndarray, live: bool = False) -> np.ndarray:
        """Stored vectors of ``rows``: from this view's copy when it holds them all (live rows; ``live``: known
        to be), else the shard's own index (opened then)."""
        dense, live_only = self._dense_searcher()
        if live_only and (live or not any(row in self.deleted for row in rows)):
            return dense.reconstruct(np.asarray(rows, dtype=np.int64))
        return self.dense.reconstruct(np.asarray(rows, dtype=np.int64))

    def _text(self, text: str, k: int, rows: np.ndarray | None) -> RowHits:
        if self.text is None or (rows is not None and not len(rows)):
            return []
        search = self.text.search
        if rows is not None:
            return self._among(lambda n: search(text, n), rows, k)
        return self._live(lambda n: search(text, n), k)

    def _fetch_depth(self, k: int) -> int:
        """How many rows to ask a part for first: k, and as many more as the shard has deleted rows, but never
        more than MAX_EXTRA_DEPTH times k (a shard with 300,000 deleted rows asks for about k, not k + 300,000:
        the rare query whose best hits are mostly deleted asks again, four times deeper, ``_live``)."""
        return k + min(len(self.deleted), MAX_EXTRA_DEPTH * k)

    def _live(self, search: Callable[[int], RowHits], k: int) -> RowHits:
        """The best k live rows from a search over the whole shard (``search(n)``: its best n), asked for
        ``_fetch_depth(k)`` first and four times more each round until k live ones are found or nothing more can
        come: deletes are dropped as filters are (``_among``), so they no longer make every query deeper."""
        if not self.deleted:
            return search(k)
        fetch = self._fetch_depth(k)
        while True:
            asked = min(fetch, self.info.count)
            hits = search(asked)
            kept = [(row, score) for row, score in hits if row not in self.deleted]
            if len(kept) >= k or len(hits) < asked or asked >= self.info.count:
                return kept[:k]
            fetch *= 4

    def _filtered(self, flt: Filter) -> np.ndarray:
        """Rows that are not deleted and whose metadata the filter keeps, ascending: worked out once for the
        first-stage routes, the early sparse route and feedback's second dense search of one request (the last
        FILTERS_REMEMBERED filters are kept)."""
        with self._lock:
            rows = self._filter_rows.get(flt)
        if rows is None:
            rows = np.asarray([row for row, metadata in enumerate(self.metadata)
                               if row not in self.deleted and flt.matches(metadata)], dtype=np.int64)
            with self._lock:
                while len(self._filter_rows) >= FILTERS_REMEMBERED:
                    self._filter_rows.pop(next(iter(self._filter_rows)))
                self._filter_rows[flt] = rows
        return rows

    def _dense_among(self, query: np.ndarray, rows: np.ndarray, k: int) -> RowHits:
        """The top k of ``rows`` (live) for one query: exact over their stored vectors when there are few of
        them, else the index's own search asked for more and more until k of them are found."""
        if len(rows) <= EXACT_FILTERED_ROWS:
            scores = self._stored_vectors(rows, live=True) @ query
            top = np.argsort(-scores, kind="stable")[:k]
            return [(int(rows[i]), float(scores[i])) for i in top]
        dense = self._dense_searcher()[0]

        def search(n: int) -> RowHits:
            scores, found = dense.search(query[None, :], n)
            return [(int(r), float(sc)) for sc, r in zip(scores[0], found[0], strict=True) if r >= 0]

        return self._among(search, rows, k)

    def _among(self, search: Callable[[int], RowHits], rows: np.ndarray, k: int) -> RowHits:
        """The top k of ``rows`` from a search over the whole shard (``search(n)``: its best n as (row, score)),
        asked for four times more each round until k of them are found or nothing more can come."""
        allowed, fetch = set(np.asarray(rows).tolist()), self._fetch_depth(k)
        while True:
            asked = min(fetch, self.info.count)
            hits = search(asked)
            kept = [(row, score) for row, score in hits if row in allowed]
            if len(kept) >= k or len(hits) < asked or asked >= self.info.count:
                return kept[:k]
            fetch *= 4

    # ---------------------------------------------------------------------------------------------- documents

    def find(self, doc_id: str) -> int | None:
        row = self.store.row_of(doc_id)
        return row if row is not None and row not in self.deleted else None

    def documents(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> list[dict | None]:
        live = [row for row in rows if row not in self.deleted]
        found = iter(self.store.rows(live, columns) if live else [])
        return [None if row in self.deleted else next(found) for row in rows]

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        return self._stored_vectors(list(rows))

    def sparse_vectors(self, rows: Sequence[int]) -> list[dict[str, float]]:
        return [self.sparse.document_vector(row) for row in rows]

    def features(self, rows: Sequence[int]) -> Features:
        return (self.vectors(rows), *self.store.local_features(list(rows)))

    def describe(self, rows: Sequence[int], columns: Sequence[str], sparse: Mapping[str, float] | None,
                 text: str | None) -> list[Described]:
        docs = self.documents(rows, columns)
        matched = [self.sparse.explain(row, sparse) for row in rows] if sparse is not None else [None] * len(rows)
        words = ([self.text.matched(row, text) if self.text is not None else {} for row in rows]
                 if text is not None else [None] * len(rows))
        return list(zip(docs, matched, words, strict=True))

    def metadata_fields(self) -> frozenset[str]:
        return self.metadata.fields

    def live_rows(self) -> list[int]:
        return [row for row in range(self.info.count) if row not in self.deleted]

    def ids(self) -> list[str]:
        return [doc_id for row, doc_id in enumerate(self.store.ids) if row not in self.deleted]

    def term_statistics(self) -> tuple[np.ndarray, int]:
        counts = np.bincount(np.asarray(self.sparse.indices), minlength=len(self.vocabulary.tokens))
        return counts, len(self.sparse)

    def nonzeros(self) -> np.ndarray:
        return np.diff(self.sparse.indptr)

    # ---------------------------------------------------------------------------------------------- parts

    @property
    def store(self) -> FeatureStore:
        return self._part("store", lambda: FeatureStore.open(store_path(self.dir)))

    @property
    def dense(self) -> DenseShard:
        return self._part("dense", lambda: DenseShard.load(self.dir / DENSE_FILE, DenseSpec.from_dict(self.info.dense)))

    @property
    def sparse(self) -> SparseShard:
        return self._part("sparse", lambda: SparseShard(self.dir / SPARSE_DIR, self.vocabulary, self.scale))

    @property
    def text(self) -> TextShard | None:
        """The shard's text-route index, or None when none of its documents has text."""
        return self._part("text", lambda: TextShard(self.dir / TEXT_DIR, self.info.count)) if self.info.text else None

    @property
    def metadata(self) -> _Metadata:
        """Every row's metadata and the fields they use, read once, on the first filtered search."""
        return self._part("metadata", lambda: _Metadata(row["metadata"] or {} for row in
                                                        self.store.rows(range(self.info.count), ["metadata"])))

    def _part(self, name: str, opener: Callable[[], Any]) -> Any:
        """The part, opened on first use; its memory-mapped files checked unchanged before every use (a file
        truncated in place would make the read a SIGBUS that kills the process: ``files.py``)."""
        part = self._parts.get(name)
        if part is None:
            with self._lock:
                part = self._parts.get(name)
                if part is None:
                    files = identities(self._mapped_files(name))
                    part = self._checked(opener())
                    self._files[name], self._parts[name] = files, part
        try:
            for identity in self._files.get(name, ()):
                identity.check(f"index shard {self.info.name}")
        except FileChangedError:
            with self._lock:  # let go of the part (its maps end with their last reader): opened again once
                if self._parts.get(name) is part:  # the file is whole again (restored, or the index republished)
                    del self._parts[name], self._files[name]
            raise
        return part

    def _mapped_files(self, name: str) -> list[Path]:
        """The files a part memory-maps (its identities are taken before it opens them)."""
        if name == "store":
            path = store_path(self.dir)
            return [*store_files(path), *array_paths(path).values()]
        if name == "sparse":
            folder = self.dir / SPARSE_DIR
            return [*SparseShard.required_files(folder), *sorted(folder.glob("accelerated/*.npy"))]
        return []

    def _checked(self, part: Any) -> Any:
        size = part.ntotal if isinstance(part, DenseShard) else len(part)
        if size != self.info.count:
            raise DamagedIndexError(f"Index shard {self.info.name}: {type(part).__name__} holds {size} documents, the "
                             f"manifest says {self.info.count}. The shard is damaged: rebuild the index.")
        return part

    def warm(self) -> None:
        """Open every part now (the feature store, FAISS, the sparse searcher that will answer: the in-process
        Seismic one, else Lucene; and the text route's searcher), so that the first request pays nothing."""
        _ = self.store, self._dense_searcher()
        if self.sparse.seismic() is None:
            self.sparse.open_searcher()
        if self.text is not None:
            self.text.open()

    def close(self) -> None:
        with self._lock:
            parts = dict(self._parts)
            self._parts.clear()  # in place: the views made by with_deletes share them
            self._files.clear()
            self._searched = None
        for part in parts.values():
            if hasattr(part, "close"):
                part.close()


def _best(hits: RowHits, k: int) -> RowHits:
    """A shard's k best, ordered as the reader's merge orders them (equal scores: lower row first), so that
    cutting here never changes the merged answer."""
    return heapq.nlargest(k, hits, key=lambda hit: (hit[1], -hit[0]))
