"""Index: the read side of an index directory. Fans each search out over the shards and merges the lists.

Opening checks that every file the manifest promises is there (a deleted file is a clear error, never a
silently smaller answer), but loads parts lazily: the JVM starts only on the first sparse search, FAISS
only on the first dense one.

Deleted documents (tombstones, see ``writer.delete_documents``) stay in the shard files: each shard
over-fetches by its number of deleted rows and drops them, so a search still returns k live documents.
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from stair_search.index.dense import DenseIndex, DenseSpec
from stair_search.index.manifest import Manifest, ShardInfo
from stair_search.index.sparse import SparseShard
from stair_search.index.store import FeatureStore
from stair_search.index.writer import DENSE_FILE, FEATURES_FILE, SPARSE_DIR, delete_documents, read_tombstone
from stair_search.models.vocab import Vocabulary


@dataclass(frozen=True)
class Candidate:
    shard: int
    row: int
    score: float


class _Shard:
    def __init__(self, index_dir: Path, info: ShardInfo, vocabulary: Vocabulary, scale: float):
        self.dir, self.info, self.vocabulary, self.scale = info.path(index_dir), info, vocabulary, scale
        required = [self.dir / DENSE_FILE, self.dir / FEATURES_FILE, *SparseShard.required_files(self.dir / SPARSE_DIR)]
        missing = [str(p) for p in required if not p.exists()]
        if missing:
            raise FileNotFoundError(f"Index shard {info.name} is incomplete, missing {missing}. Restore the files "
                                    f"or rebuild the index; searching it would silently lose documents.")
        self.deleted = frozenset(read_tombstone(index_dir, info).tolist())  # loaded now: a later delete replaces it
        self._lock = threading.Lock()

    def fetch_depth(self, k: int) -> int:
        """How many rows to ask this shard for so that k live ones remain after dropping deleted rows."""
        return k + len(self.deleted)

    @cached_property
    def store(self) -> FeatureStore:
        return self._checked(FeatureStore.open(self.dir / FEATURES_FILE))

    @cached_property
    def dense(self) -> DenseIndex:
        return self._checked(DenseIndex.load(self.dir / DENSE_FILE, DenseSpec.from_dict(self.info.dense)))

    @cached_property
    def sparse(self) -> SparseShard:
        with self._lock:  # one Lucene searcher per shard, even if two requests arrive together
            return self._checked(SparseShard(self.dir / SPARSE_DIR, self.vocabulary, self.scale))

    def _checked(self, part):
        size = len(part) if not isinstance(part, DenseIndex) else part.ntotal
        if size != self.info.count:
            raise ValueError(f"Index shard {self.info.name}: {type(part).__name__} holds {size} documents, the "
                             f"manifest says {self.info.count}. The shard is damaged: rebuild the index.")
        return part


class Index:
    def __init__(self, index_dir: str | Path):
        self.dir = Path(index_dir)
        self._load()

    def _load(self) -> None:
        self.manifest = Manifest.load(self.dir)
        self.vocabulary = Vocabulary.load(self.manifest.vocabulary)
        if self.vocabulary.sha256 != self.manifest.vocabulary_sha256:
            raise ValueError(f"{self.dir} was built with another vocabulary than {self.vocabulary.folder}.")
        self.shards = [_Shard(self.dir, s, self.vocabulary, self.manifest.scale) for s in self.manifest.shards]

    def __len__(self) -> int:
        return self.manifest.count

    def search_sparse(self, queries: Sequence[Mapping[str, float]], k: int, threads: int = 1) -> list[list[Candidate]]:
        per_shard = [shard.sparse.batch_search(queries, shard.fetch_depth(k), threads) for shard in self.shards]
        return [_merge([[Candidate(s, h.row, h.score) for h in per_shard[s][q] if h.row not in self.shards[s].deleted]
                        for s in range(len(self.shards))], k)
                for q in range(len(queries))]

    def search_dense(self, vectors: np.ndarray, k: int) -> list[list[Candidate]]:
        vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
        per_shard = [shard.dense.search(vectors, shard.fetch_depth(k)) for shard in self.shards]
        return [_merge([[Candidate(s, int(r), float(sc)) for sc, r in zip(scores[q], rows[q], strict=True)
                         if r >= 0 and int(r) not in self.shards[s].deleted]
                        for s, (scores, rows) in enumerate(per_shard)], k)
                for q in range(len(vectors))]

    def documents(self, candidates: Sequence[Candidate], columns: Sequence[str] | None = None) -> list[dict | None]:
        """Stored fields of each candidate, in order (grouped by shard so each parquet is read once).

        A deleted document is never returned: its place holds None (searches never yield deleted rows).
        """
        out: list[dict | None] = [None] * len(candidates)
        for shard, positions in _by_shard(candidates).items():
            live = [i for i in positions if candidates[i].row not in self.shards[shard].deleted]
            rows = self.shards[shard].store.rows([candidates[i].row for i in live], columns) if live else []
            for i, row in zip(live, rows, strict=True):
                out[i] = row
        return out

    def ids(self) -> list[str]:
        """Ids of every live document, shard by shard in row order."""
        return [doc_id for shard in self.shards
                for row, doc_id in enumerate(shard.store.ids) if row not in shard.deleted]

    def delete(self, ids: Sequence[str]) -> int:
        """Delete documents by id (no rebuild); returns how many were deleted. Unknown ids are ignored:
        ``writer.delete_documents`` also says which they were. This Index sees the change at once."""
        result = delete_documents(self.dir, ids)
        self._load()  # re-read the manifest and tombstones
        return len(result.deleted)

    def local_features(self, candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        """(N, m, D) local features and (N, m, 2) positions of the candidates, in order."""
        m, dim = self.manifest.num_local, self.manifest.embed_dim
        feats, pos = np.zeros((len(candidates), m, dim), np.float16), np.zeros((len(candidates), m, 2), np.float16)
        for shard, positions in _by_shard(candidates).items():
            f, p = self.shards[shard].store.local_features([candidates[i].row for i in positions])
            feats[positions], pos[positions] = f, p
        return feats, pos

    def explain(self, candidate: Candidate, query: Mapping[str, float]) -> dict[str, tuple[float, float]]:
        return self.shards[candidate.shard].sparse.explain(candidate.row, query)


def _merge(lists: Sequence[Sequence[Candidate]], k: int) -> list[Candidate]:
    return heapq.nlargest(k, (c for lst in lists for c in lst), key=lambda c: c.score)


def _by_shard(candidates: Sequence[Candidate]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(c.shard, []).append(i)
    return groups
