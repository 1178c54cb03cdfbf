"""IndexReader: the read side of an index directory, behind public methods only.

It fans each first-stage query out to the shards (``shard.Shard``, the one narrow interface a shard answers)
and merges their lists, and answers everything else a caller needs about documents (``find``, ``documents``,
``vectors``, ``features``, ``describe``, ``ids``) by asking the shards that hold them, all at once (one call
per shard, the shards in parallel: a shard in another process costs a round trip per call), so that the router,
the rerankers, the server and the registry never touch a shard's parts. Opening checks that every file the
manifest promises is there (a deleted file is a clear error, never a silently smaller answer), but each shard
loads its parts lazily and thread-safely (``warm`` opens everything now; ``close`` releases what was opened).

Deleted documents (tombstones, written by ``writer.IndexWriter.delete``) stay in the shard files: each shard
drops them from its parts' answers, asking again deeper only when too few live rows remain (``shard._live``), and
searches a flat or IVF-PQ dense index through a copy in memory without them (``DenseShard.without``: those scan
every row they hold), so a search still returns k live documents without every query paying for the deleted
rows; compaction and the merge policy (``merge.py``) drop them from the files.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stair_search.index.manifest import Manifest, ShardInfo
from stair_search.index.shard import Described, Features, LocalShard, Shard, ShardQuery, ShardUnavailable
from stair_search.query.filters import Filter, check_fields, parse_filter
from stair_search.vocabulary import Vocabulary

MAX_SHARD_THREADS = 16  # per reader: shard calls of one request in flight at once
STORED_FIELDS = ("id", "source", "width", "height", "caption", "metadata")
# How a reader reaches one shard: (index directory, its manifest, the shard's entry, vocabulary) -> Shard.
ShardOpener = Callable[[Path, Manifest, ShardInfo, Vocabulary], Shard]


@dataclass(frozen=True)
class Candidate:
    shard: int
    row: int
    score: float


class IndexReader:
    def __init__(self, index_dir: str | Path, open_shard: ShardOpener = LocalShard.open):
        """``open_shard``: how each shard is reached (default: read from its folder in this process; the cluster
        serves shards from other processes: ``server/cluster.py``)."""
        self.dir, self.open_shard = Path(index_dir), open_shard
        self._pool: ThreadPoolExecutor | None = None  # per-shard calls in parallel; made on first need
        self._pool_lock = threading.Lock()
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
        self._shards: list[Shard] = [self.open_shard(self.dir, self.manifest, s, self.vocabulary)
                                     for s in self.manifest.shards]

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

    def check_filter(self, flt: Mapping[str, Any] | Filter) -> Filter:
        """The parsed filter (``query/filters.py``), its fields checked against the documents' metadata: a field
        that no document has is a FilterError naming it."""
        flt = parse_filter(flt)
        check_fields(flt, sorted(set().union(*(shard.metadata_fields() for shard in self._shards))))
        return flt

    def search(self, query: ShardQuery, missing: list[str] | None = None) -> dict[str, list[Candidate]]:
        """Each asked route's top ``query.k`` over every shard (filtered in the shards, before ranking; every shard
        asked at once). A shard that cannot answer raises ShardUnavailable, or with ``missing`` (a list) is left
        out and named there: a partial answer that says so, never a silently smaller one."""
        pending = [shard.submit(query) for shard in self._shards]
        answers = []
        for shard, waiting in zip(self._shards, pending, strict=True):
            try:
                answers.append(waiting.result())
            except ShardUnavailable:
                if missing is None:
                    raise
                missing.append(shard.info.name)
                answers.append({})
        return {route: _merge([[Candidate(s, row, score) for row, score in answer.get(route, ())]
                               for s, answer in enumerate(answers)], query.k)
                for route in query.routes()}

    def unready(self) -> list[str]:
        """Names of the shards that cannot answer now (none for shards read in this process)."""
        return [shard.info.name for shard in self._shards if not shard.ready()]

    # ---------------------------------------------------------------------------------------------- documents

    def find(self, doc_id: str) -> Candidate | None:
        """The live document with this id (score 0), or None."""
        for position, shard in enumerate(self._shards):
            row = shard.find(doc_id)
            if row is not None:
                return Candidate(position, row, 0.0)
        return None

    def documents(self, candidates: Sequence[Candidate], columns: Sequence[str] | None = None) -> list[dict | None]:
        """Stored fields of each candidate, in order (grouped by shard so each store is read once).

        A deleted document is never returned: its place holds None (searches never yield deleted rows).
        """
        return self._in_order(candidates, lambda shard, rows: shard.documents(rows, columns), None)

    def vectors(self, candidates: Sequence[Candidate]) -> np.ndarray:
        """(N, D) float32 stored dense embeddings of the candidates, in order (read back from FAISS)."""
        out = np.zeros((len(candidates), self.manifest.embed_dim), np.float32)
        for positions, answer in self._per_shard(candidates, lambda shard, rows: shard.vectors(rows)):
            out[positions] = answer
        return out

    def sparse_vectors(self, candidates: Sequence[Candidate]) -> list[dict[str, float]]:
        """Stored (de-quantised) sparse vectors of the candidates, in order."""
        return self._in_order(candidates, lambda shard, rows: shard.sparse_vectors(rows), {})

    def features(self, candidates: Sequence[Candidate]) -> Features:
        """What the rerankers read, in order: (N, D) float32 embeddings, (N, m, D) local features and (N, m, 2)
        positions (float16)."""
        m, dim, n = self.manifest.num_local, self.manifest.embed_dim, len(candidates)
        vectors = np.zeros((n, dim), np.float32)
        local, where = np.zeros((n, m, dim), np.float16), np.zeros((n, m, 2), np.float16)
        for positions, (v, f, p) in self._per_shard(candidates, lambda shard, rows: shard.features(rows)):
            vectors[positions] = v
            if f.shape[1:] == local.shape[1:]:  # a shard without local features (built from embeddings): zeros
                local[positions], where[positions] = f, p
        return vectors, local, where

    def describe(self, candidates: Sequence[Candidate], columns: Sequence[str],
                 sparse: Mapping[str, float] | None = None, text: str | None = None) -> list[Described]:
        """Each candidate's stored ``columns`` and, when asked, its matched word-pieces for the ``sparse`` query
        ({token: (query weight, document weight)}) and its analyzed words the ``text`` query holds."""
        return self._in_order(candidates, lambda shard, rows: shard.describe(rows, columns, sparse, text),
                              (None, None, None))

    def _in_order(self, candidates: Sequence[Candidate], ask: Callable[[Shard, list[int]], list], empty: Any
                  ) -> list:
        """``ask(shard, rows)``'s answers back in the candidates' order."""
        out = [empty] * len(candidates)
        for positions, answer in self._per_shard(candidates, ask):
            for i, value in zip(positions, answer, strict=True):
                out[i] = value
        return out

    def _per_shard(self, candidates: Sequence[Candidate], ask: Callable[[Shard, list[int]], Any]
                   ) -> list[tuple[list[int], Any]]:
        """``ask(shard, rows)`` once per shard that holds candidates, the shards in parallel when several do:
        (the candidates' positions, the answer) per shard."""
        groups = list(_by_shard(candidates).items())
        calls = [(lambda s=shard, p=positions: ask(self._shards[s], [candidates[i].row for i in p]))
                 for shard, positions in groups]
        if len(calls) == 1:
            return [(groups[0][1], calls[0]())]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=min(len(self._shards), MAX_SHARD_THREADS),
                                                thread_name_prefix="shard-call")
            futures = [self._pool.submit(call) for call in calls]
        return [(positions, future.result()) for (_, positions), future in zip(groups, futures, strict=True)]

    def live(self, batch_size: int = 4096) -> Iterator[list[Candidate]]:
        """Every live document as candidates (score 0), shard by shard in row order, ``batch_size`` at a time:
        what an export or a full scan walks without holding the whole index."""
        for position, shard in enumerate(self._shards):
            rows = shard.live_rows()
            for start in range(0, len(rows), batch_size):
                yield [Candidate(position, row, 0.0) for row in rows[start : start + batch_size]]

    def ids(self) -> list[str]:
        """Ids of every live document, shard by shard in row order."""
        return [doc_id for shard in self._shards for doc_id in shard.ids()]

    def document_frequencies(self) -> tuple[np.ndarray, int]:
        """(per vocabulary token, how many documents' sparse vectors hold it; the number of documents), over
        every stored row (deleted rows included, as Lucene's own statistics until a rebuild)."""
        counts = np.zeros(len(self.vocabulary.tokens), np.int64)
        documents = 0
        for shard in self._shards:
            shard_counts, shard_documents = shard.term_statistics()
            counts += shard_counts
            documents += shard_documents
        return counts, documents

    def nonzeros_per_document(self) -> float:
        """Mean stored sparse non-zeros per document (deleted rows included): the index's sparsity."""
        counts = [shard.nonzeros() for shard in self._shards]
        return float(np.concatenate(counts).mean()) if counts else 0.0

    # ---------------------------------------------------------------------------------------------- lifecycle

    def delete(self, ids: Sequence[str], wait: bool = False) -> int:
        """Delete documents by id (no rebuild; the index's one writer does it under its lock); returns how many
        were deleted, unknown ids are ignored (``writer.delete_documents`` also says which). This reader sees the
        change at once."""
        from stair_search.index.writer import delete_documents

        result = delete_documents(self.dir, ids, wait=wait)
        self.close()
        self._load()
        return len(result.deleted)

    def warm(self) -> None:
        """Open every part of every shard now, so that the first request pays nothing."""
        for shard in self._shards:
            shard.warm()

    def close(self) -> None:
        """Release the Lucene readers, FAISS indexes and store maps opened so far (reopened if used again)."""
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        for shard in self._shards:
            shard.close()

    def __enter__(self) -> IndexReader:
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
