"""Index: the read side of an index directory, behind public methods only.

It fans each search out over the shards and merges the lists, and answers everything else a caller needs about
documents (``find``, ``documents``, ``vectors``, ``local_features``, ``explain``, ``ids``), so that the router,
the rerankers, the server and the registry never touch a shard's parts. Opening checks that every file the
manifest promises is there (a deleted file is a clear error, never a silently smaller answer), but loads parts
lazily and thread-safely: the JVM starts only on the first sparse search, FAISS only on the first dense one,
and two requests arriving together open one Lucene searcher, not two (``warm`` opens everything now; ``close``
releases what was opened).

Deleted documents (tombstones, written by ``writer.IndexWriter.delete``) stay in the shard files: each shard
over-fetches by its number of deleted rows and drops them, so a search still returns k live documents.
"""

from __future__ import annotations

import functools
import heapq
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stair_search.index.dense import DenseIndex, DenseSpec
from stair_search.index.layout import DENSE_FILE, SPARSE_DIR, read_tombstone
from stair_search.index.manifest import Manifest, ShardInfo
from stair_search.index.sparse import SparseShard
from stair_search.index.store import FeatureStore, store_files, store_path
from stair_search.index.text import TEXT_DIR, TextShard
from stair_search.models.vocab import Vocabulary
from stair_search.query.filters import Filter, check_fields, parse_filter

STORED_FIELDS = ("id", "source", "width", "height", "caption", "metadata")
# A filtered dense search scores up to this many allowed rows of a shard exactly (their vectors read back);
# beyond it, the shard's FAISS search over-fetches until k allowed rows are found.
EXACT_FILTERED_ROWS = 50_000
Allowed = Mapping[int, np.ndarray]  # shard position -> the live rows a filter keeps (Index.filter_rows)


@dataclass(frozen=True)
class Candidate:
    shard: int
    row: int
    score: float


class _Metadata(list):
    """A shard's rows' metadata, in row order, and every field any of them has (what a filter may name)."""

    def __init__(self, rows: Iterable[dict]):
        super().__init__(rows)
        self.fields = frozenset(name for metadata in self for name in metadata)


class _Shard:
    """One shard's three parts, each opened on first use (once, under a lock) and checked against the manifest."""

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
        self._lock = threading.RLock()  # re-entrant: one part may open another (metadata reads the store)

    def fetch_depth(self, k: int) -> int:
        """How many rows to ask this shard for so that k live ones remain after dropping deleted rows."""
        return k + len(self.deleted)

    @property
    def store(self) -> FeatureStore:
        return self._part("store", lambda: FeatureStore.open(store_path(self.dir)))

    @property
    def dense(self) -> DenseIndex:
        return self._part("dense", lambda: DenseIndex.load(self.dir / DENSE_FILE, DenseSpec.from_dict(self.info.dense)))

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

    def live_rows(self, keep: Callable[[dict], bool]) -> np.ndarray:
        """Rows that are not deleted and whose metadata ``keep`` accepts, ascending."""
        return np.asarray([row for row, metadata in enumerate(self.metadata)
                           if row not in self.deleted and keep(metadata)], dtype=np.int64)

    def dense_among(self, query: np.ndarray, rows: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The top k of ``rows`` (live) for one query: exact over their stored vectors when there are few of
        them, else the index's own search asked for more and more until k of them are found."""
        if len(rows) <= EXACT_FILTERED_ROWS:
            scores = self.dense.reconstruct(rows) @ query
            top = np.argsort(-scores, kind="stable")[:k]
            return [(int(rows[i]), float(scores[i])) for i in top]

        def search(n: int) -> list[tuple[int, float]]:
            scores, found = self.dense.search(query[None, :], n)
            return [(int(r), float(sc)) for sc, r in zip(scores[0], found[0], strict=True) if r >= 0]

        return self.among(search, rows, k)

    def among(self, search: Callable[[int], list[tuple[int, float]]], rows: np.ndarray,
              k: int) -> list[tuple[int, float]]:
        """The top k of ``rows`` from a search over the whole shard (``search(n)``: its best n as (row, score)),
        asked for four times more each round until k of them are found or nothing more can come."""
        allowed, fetch = set(np.asarray(rows).tolist()), k + len(self.deleted)
        while True:
            asked = min(fetch, self.info.count)
            hits = search(asked)
            kept = [(row, score) for row, score in hits if row in allowed]
            if len(kept) >= k or len(hits) < asked or asked >= self.info.count:
                return kept[:k]
            fetch *= 4

    def _part(self, name: str, opener: Callable[[], Any]) -> Any:
        part = self._parts.get(name)
        if part is None:
            with self._lock:
                part = self._parts.get(name)
                if part is None:
                    part = self._parts[name] = self._checked(opener())
        return part

    def _checked(self, part: Any) -> Any:
        size = part.ntotal if isinstance(part, DenseIndex) else len(part)
        if size != self.info.count:
            raise ValueError(f"Index shard {self.info.name}: {type(part).__name__} holds {size} documents, the "
                             f"manifest says {self.info.count}. The shard is damaged: rebuild the index.")
        return part

    def close(self) -> None:
        with self._lock:
            parts, self._parts = self._parts, {}
        for part in parts.values():
            if hasattr(part, "close"):
                part.close()


class Index:
    def __init__(self, index_dir: str | Path):
        self.dir = Path(index_dir)
        self._load()

    def _load(self) -> None:
        for attempt in range(3):
            self.manifest = Manifest.load(self.dir)
            try:
                self._open_shards()
                return
            except FileNotFoundError:
                # A delete committed between reading the manifest and its tombstones: read the new manifest.
                if attempt == 2 or Manifest.load(self.dir).to_dict() == self.manifest.to_dict():
                    raise

    def _open_shards(self) -> None:
        self.vocabulary = Vocabulary.load(self.manifest.vocabulary)
        if self.vocabulary.sha256 != self.manifest.vocabulary_sha256:
            raise ValueError(f"{self.dir} was built with another vocabulary than {self.vocabulary.folder}.")
        self._shards = [_Shard(self.dir, s, self.vocabulary, self.manifest.scale) for s in self.manifest.shards]

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    # ---------------------------------------------------------------------------------------------- searching

    @property
    def has_text(self) -> bool:
        """Whether the text route (BM25 over captions / chosen metadata) has anything to search here."""
        return any(shard.info.text for shard in self._shards)

    def search_text(self, texts: Sequence[str], k: int, rows: Allowed | None = None) -> list[list[Candidate]]:
        """Top-k per query by BM25 over the shards' text (an empty list where no shard has text)."""
        out = []
        for text in texts:
            lists = []
            for s, shard in enumerate(self._shards):
                if shard.text is None or (rows is not None and not len(rows.get(s, ()))):
                    continue
                search = functools.partial(shard.text.search, text)  # search(n): its best n hits
                hits = shard.among(search, rows[s], k) if rows is not None \
                    else [h for h in search(shard.fetch_depth(k)) if h[0] not in shard.deleted]
                lists.append([Candidate(s, row, score) for row, score in hits])
            out.append(_merge(lists, k))
        return out

    def text_matches(self, candidate: Candidate, text: str) -> dict[str, int]:
        """The query's (analyzed) words that the candidate's text holds, with their counts."""
        shard = self._shards[candidate.shard]
        return shard.text.matched(candidate.row, text) if shard.text is not None else {}

    def filter_rows(self, flt: Mapping[str, Any] | Filter) -> dict[int, np.ndarray]:
        """The live rows of each shard whose metadata matches the filter (``query/filters.py``): what a filtered
        search ranks, so that a filter keeping 1% of the documents still gets k hits. A field that no document
        has is a FilterError naming it."""
        flt = parse_filter(flt)
        known = sorted(set().union(*(shard.metadata.fields for shard in self._shards)))
        check_fields(flt, known)
        return {position: shard.live_rows(flt.matches) for position, shard in enumerate(self._shards)}

    def search_sparse(self, queries: Sequence[Mapping[str, float]], k: int, threads: int = 1,
                      rows: Allowed | None = None) -> list[list[Candidate]]:
        """Top-k per query over every live document, or only over ``rows`` (scored exactly from the stored
        vectors, with the scores Lucene gives)."""
        if rows is not None:
            return [_merge([[Candidate(s, h.row, h.score) for h in shard.sparse.search_rows(q, rows[s], k)]
                            for s, shard in enumerate(self._shards) if len(rows.get(s, ()))], k)
                    for q in queries]
        per_shard = [shard.sparse.batch_search(queries, shard.fetch_depth(k), threads) for shard in self._shards]
        return [_merge([[Candidate(s, h.row, h.score) for h in per_shard[s][q] if h.row not in shard.deleted]
                        for s, shard in enumerate(self._shards)], k)
                for q in range(len(queries))]

    def search_dense(self, vectors: np.ndarray, k: int, rows: Allowed | None = None) -> list[list[Candidate]]:
        """Top-k per query over every live document, or only over ``rows``."""
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        if rows is not None:
            return [_merge([[Candidate(s, r, sc) for r, sc in shard.dense_among(v, rows[s], k)]
                            for s, shard in enumerate(self._shards) if len(rows.get(s, ()))], k)
                    for v in vectors]
        per_shard = [shard.dense.search(vectors, shard.fetch_depth(k)) for shard in self._shards]
        return [_merge([[Candidate(s, int(r), float(sc)) for sc, r in zip(scores[q], rows[q], strict=True)
                         if r >= 0 and int(r) not in self._shards[s].deleted]
                        for s, (scores, rows) in enumerate(per_shard)], k)
                for q in range(len(vectors))]

    # ---------------------------------------------------------------------------------------------- documents

    def find(self, doc_id: str) -> Candidate | None:
        """The live document with this id (score 0), or None."""
        for position, shard in enumerate(self._shards):
            row = shard.store.row_of(doc_id)
            if row is not None and row not in shard.deleted:
                return Candidate(position, row, 0.0)
        return None

    def documents(self, candidates: Sequence[Candidate], columns: Sequence[str] | None = None) -> list[dict | None]:
        """Stored fields of each candidate, in order (grouped by shard so each parquet is read once).

        A deleted document is never returned: its place holds None (searches never yield deleted rows).
        """
        out: list[dict | None] = [None] * len(candidates)
        for shard, positions in _by_shard(candidates).items():
            live = [i for i in positions if candidates[i].row not in self._shards[shard].deleted]
            rows = self._shards[shard].store.rows([candidates[i].row for i in live], columns) if live else []
            for i, row in zip(live, rows, strict=True):
                out[i] = row
        return out

    def vectors(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """(N, D) float32 stored dense embeddings of the candidates, in order (read back from FAISS)."""
        out = np.zeros((len(candidates), self.manifest.embed_dim), np.float32)
        for shard, positions in _by_shard(candidates).items():
            out[positions] = self._shards[shard].dense.reconstruct([candidates[i].row for i in positions])
        return out

    def sparse_vectors(self, candidates: Sequence[Candidate]) -> list[dict[str, float]]:
        """Stored (de-quantised) sparse vectors of the candidates, in order."""
        return [self._shards[c.shard].sparse.document_vector(c.row) for c in candidates]

    def local_features(self, candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        """(N, m, D) local features and (N, m, 2) positions of the candidates, in order."""
        m, dim = self.manifest.num_local, self.manifest.embed_dim
        feats, pos = np.zeros((len(candidates), m, dim), np.float16), np.zeros((len(candidates), m, 2), np.float16)
        for shard, positions in _by_shard(candidates).items():
            f, p = self._shards[shard].store.local_features([candidates[i].row for i in positions])
            feats[positions], pos[positions] = f, p
        return feats, pos

    def explain(self, candidate: Candidate, query: Mapping[str, float]) -> dict[str, tuple[float, float]]:
        return self._shards[candidate.shard].sparse.explain(candidate.row, query)

    def live(self, batch_size: int = 4096) -> Iterator[list[Candidate]]:
        """Every live document as candidates (score 0), shard by shard in row order, ``batch_size`` at a time:
        what an export or a full scan walks without holding the whole index."""
        for position, shard in enumerate(self._shards):
            rows = [row for row in range(shard.info.count) if row not in shard.deleted]
            for start in range(0, len(rows), batch_size):
                yield [Candidate(position, row, 0.0) for row in rows[start : start + batch_size]]

    def ids(self) -> list[str]:
        """Ids of every live document, shard by shard in row order."""
        return [doc_id for shard in self._shards
                for row, doc_id in enumerate(shard.store.ids) if row not in shard.deleted]

    def document_frequencies(self) -> tuple[np.ndarray, int]:
        """(per vocabulary token, how many documents' sparse vectors hold it; the number of documents), over
        every stored row (deleted rows included, as Lucene's own statistics until a rebuild)."""
        counts = np.zeros(len(self.vocabulary.tokens), np.int64)
        documents = 0
        for shard in self._shards:
            counts += np.bincount(np.asarray(shard.sparse.indices), minlength=len(counts))
            documents += len(shard.sparse)
        return counts, documents

    def nonzeros_per_document(self) -> float:
        """Mean stored sparse non-zeros per document (deleted rows included): the index's sparsity."""
        counts = [np.diff(shard.sparse.indptr) for shard in self._shards]
        return float(np.concatenate(counts).mean()) if counts else 0.0

    # ---------------------------------------------------------------------------------------------- lifecycle

    def delete(self, ids: Sequence[str], wait: bool = False) -> int:
        """Delete documents by id (no rebuild; the index's one writer does it under its lock); returns how many
        were deleted, unknown ids are ignored (``writer.delete_documents`` also says which). This Index sees the
        change at once."""
        from stair_search.index.writer import delete_documents

        result = delete_documents(self.dir, ids, wait=wait)
        self.close()
        self._load()
        return len(result.deleted)

    def warm(self) -> None:
        """Open every part now (the feature store, FAISS, and the sparse searcher that will answer: the in-process
        accelerated one, else Lucene), so that the first request pays nothing."""
        for shard in self._shards:
            _ = shard.store, shard.dense
            if shard.sparse.accelerated() is None:
                shard.sparse.open_searcher()

    def close(self) -> None:
        """Release the Lucene readers, FAISS indexes and parquet handles opened so far (reopened if used again)."""
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _merge(lists: Sequence[Sequence[Candidate]], k: int) -> list[Candidate]:
    """The k best over the shards; equal scores in (shard, row) order, so every call (and page) agrees."""
    return heapq.nlargest(k, (c for lst in lists for c in lst), key=lambda c: (c.score, -c.shard, -c.row))


def _by_shard(candidates: Sequence[Candidate]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(c.shard, []).append(i)
    return groups
