"""Sparse shard: a Lucene impact index (written and searched through Pyserini) + the same vectors as numpy CSR.

Lucene impacts are integers, so weights are quantised: ``impact = max(1, round(weight * scale))`` — a weight
that was non-zero never becomes 0 (Pyserini's own path truncates with ``asInt()``). Queries are quantised with
the same scale, and scores are reported de-quantised (``lucene_score / scale**2``) so they stay comparable to
the float dot product.

Each Lucene document's id is its row in the shard; the CSR copy (``indptr``/``indices``/``values`` .npy files,
memory-mapped) gives every hit's matched tokens without storing raw JSON in Lucene, is what tests compare
Lucene against, and is the source for rebuilding a shard.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stair_search.index.jvm import import_pyserini, java_class
from stair_search.models.vocab import Vocabulary, spell

DEFAULT_SCALE = 100.0
MAX_IMPACT = np.iinfo(np.uint16).max
LUCENE_DIR = "lucene"
CSR_FILES = ("indptr", "indices", "values")
CSR = tuple[np.ndarray, np.ndarray, np.ndarray]  # (indptr, indices, values) of a shard's integer impacts


@dataclass
class SparseHit:
    row: int
    score: float


def quantise(weights: np.ndarray, scale: float) -> np.ndarray:
    """Float weights > 0 -> integer impacts >= 1 (uint16)."""
    return np.clip(np.rint(np.asarray(weights, dtype=np.float64) * scale), 1, MAX_IMPACT).astype(np.uint16)


def to_csr(vectors: Sequence[Mapping[str, float]], vocabulary: Vocabulary, scale: float) -> CSR:
    """Token dicts -> (indptr int64, token ids sorted per row, uint16 impacts)."""
    index = vocabulary.index
    indptr = np.zeros(len(vectors) + 1, dtype=np.int64)
    indices, values = [], []
    for row, vector in enumerate(vectors):
        unknown = [t for t in vector if t not in index]
        if unknown:
            raise ValueError(f"Row {row}: tokens {unknown[:5]} are not in the vocabulary {vocabulary.folder}.")
        items = sorted((index[t], w) for t, w in vector.items() if w > 0)
        indices.extend(i for i, _ in items)
        values.extend(w for _, w in items)
        indptr[row + 1] = len(indices)
    return indptr, np.asarray(indices, dtype=index_dtype(len(vocabulary))), quantise(np.asarray(values), scale)


def index_dtype(vocabulary_size: int) -> type[np.unsignedinteger]:
    """Token ids fit uint16 for word-piece vocabularies (30,522): 4 instead of 6 bytes per stored weight."""
    return np.uint16 if vocabulary_size <= 1 << 16 else np.uint32


def concat_csr(parts: Sequence[CSR]) -> CSR:
    """Stack per-batch CSR triples row-wise (batches are converted as they come, so a filling shard never
    holds Python dicts for more than one batch)."""
    offsets = np.cumsum([0] + [int(p[0][-1]) for p in parts])
    indptr = np.concatenate([np.zeros(1, np.int64)] + [p[0][1:] + off for p, off in zip(parts, offsets, strict=False)])
    return indptr, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def write_sparse_shard(shard_dir: Path, csr: CSR, vocabulary: Vocabulary,
                       threads: int | None = None) -> None:
    """Write the CSR files and build the Lucene impact index for one shard."""
    shard_dir = Path(shard_dir)
    shard_dir.mkdir(parents=True, exist_ok=True)
    for name, array in zip(CSR_FILES, csr, strict=True):
        np.save(shard_dir / f"{name}.npy", array)
    build_lucene(shard_dir / LUCENE_DIR, *csr, vocabulary=vocabulary, threads=threads)


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def build_lucene(index_dir: Path, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                 vocabulary: Vocabulary, threads: int | None = None) -> None:
    """Anserini ``IndexCollection -impact -pretokenized`` over a JsonVectorCollection written from the CSR.

    Anserini spells each term out ``impact`` times (~6,000 words per image at the default scale), about 1 ms
    per document and thread; it runs one thread per collection file, so the rows are split into ``threads``
    files (default: one per available core). Rows without a token (an image whose sparse vector is all
    zeros) are left out: Anserini drops empty documents anyway, and such a row can never match a sparse
    query. Lucene ids stay the CSR row numbers, whatever order the threads add them in."""
    terms = [spell(t) for t in vocabulary.tokens]
    rows = len(indptr) - 1
    threads = max(1, min(threads or available_cores(), rows))
    with tempfile.TemporaryDirectory(prefix="stair-collection-") as tmp:
        for part, block in enumerate(np.array_split(np.arange(rows), threads)):
            with open(Path(tmp) / f"part-{part}.jsonl", "w", encoding="utf-8") as out:
                for row in block.tolist():
                    lo, hi = indptr[row], indptr[row + 1]
                    if lo == hi:
                        continue
                    pairs = zip(indices[lo:hi].tolist(), values[lo:hi].tolist(), strict=True)
                    vector = {terms[i]: int(v) for i, v in pairs}
                    out.write(json.dumps({"id": str(row), "contents": "", "vector": vector}) + "\n")
        if index_dir.exists():
            shutil.rmtree(index_dir)
        java_class("io.anserini.index.IndexCollection").main([
            "-collection", "JsonVectorCollection", "-input", tmp, "-index", str(index_dir),
            "-generator", "DefaultLuceneDocumentGenerator", "-threads", str(threads),
            "-impact", "-pretokenized", "-quiet",
        ])
    if not any(index_dir.glob("segments_*")):
        raise RuntimeError(f"Anserini wrote no Lucene index at {index_dir}; see the Java log above.")


class _PreEncoded:
    """Pyserini query 'encoder' for queries that are already {term: impact} maps."""

    def encode(self, query: dict[str, int]) -> dict[str, int]:
        return query


class SparseShard:
    """Read side of one shard: Lucene impact search through Pyserini + CSR for explanations.

    The CSR files open at once (memory-mapped); the Lucene searcher, and with it the JVM and the slow Pyserini
    import, only on the first search (``open_searcher``), so explaining a hit or a dense-only search never
    starts Java."""

    def __init__(self, shard_dir: Path, vocabulary: Vocabulary, scale: float):
        self.dir = shard_dir = Path(shard_dir)
        missing = [str(p) for p in self.required_files(shard_dir) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"Sparse shard {shard_dir} is incomplete, missing: {missing}. "
                                    f"Rebuild the index (stair-search index ...) or restore the files.")
        self.vocabulary, self.scale = vocabulary, scale
        self.indptr, self.indices, self.values = (_load_csr_part(shard_dir / f"{n}.npy") for n in CSR_FILES)
        self._terms = [spell(t) for t in vocabulary.tokens]
        self._with_tokens = int(np.count_nonzero(np.diff(self.indptr)))
        self._searcher = None
        self._csr = None
        self._lock = threading.Lock()

    def open_searcher(self):
        """The Lucene searcher (opened once, thread-safely); None for a shard none of whose documents has a token
        (there are no terms for Pyserini to open)."""
        if self._searcher is None and self._with_tokens:
            with self._lock:
                if self._searcher is None:
                    lucene = import_pyserini("pyserini.search.lucene")
                    # min_idf=-1: Pyserini drops query terms with idf <= min_idf, and a term present in every
                    # document has idf 0, so the default (0) would silently ignore it.
                    searcher = lucene.LuceneImpactSearcher(str(self.dir / LUCENE_DIR), _PreEncoded(), min_idf=-1)
                    if searcher.num_docs != self._with_tokens:
                        raise ValueError(f"Sparse shard {self.dir}: Lucene has {searcher.num_docs} documents but "
                                         f"the vector files have {self._with_tokens} with tokens; the shard is "
                                         f"damaged, rebuild it.")
                    self._searcher = searcher
        return self._searcher

    @staticmethod
    def required_files(shard_dir: Path) -> list[Path]:
        return [shard_dir / f"{n}.npy" for n in CSR_FILES] + [shard_dir / LUCENE_DIR]

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def encode_query(self, query: Mapping[str, float]) -> dict[str, int]:
        """Token weights -> {Lucene term: impact}; tokens outside the vocabulary are ignored."""
        index = self.vocabulary.index
        ids = [index[t] for t in query if t in index and query[t] > 0]
        impacts = quantise(np.asarray([query[self.vocabulary.tokens[i]] for i in ids]), self.scale)
        return {self._terms[i]: int(v) for i, v in zip(ids, impacts.tolist(), strict=True)}

    def search_rows(self, query: Mapping[str, float], rows: np.ndarray, k: int = 10) -> list[SparseHit]:
        """Top-k of ``rows`` only, scored exactly from the stored CSR vectors: the quantised query impacts times
        the documents' impacts, as Lucene scores them (rows sharing no token with the query are left out)."""
        index = self.vocabulary.index
        ids = np.asarray([index[t] for t in query if t in index and query[t] > 0], dtype=np.int64)
        if not len(ids) or not len(rows):
            return []
        impacts = quantise(np.asarray([query[self.vocabulary.tokens[i]] for i in ids]), self.scale)
        dense_query = np.zeros(len(self.vocabulary.tokens), np.float64)
        dense_query[ids] = impacts
        matrix = self._matrix()[np.asarray(rows, dtype=np.int64)]
        scores = matrix @ dense_query
        hit = np.flatnonzero(matrix[:, ids].getnnz(axis=1))
        top = hit[np.argsort(-scores[hit], kind="stable")[:k]]
        norm = self.scale * self.scale
        return [SparseHit(int(rows[i]), float(scores[i]) / norm) for i in top]

    def _matrix(self):
        """The shard's documents x vocabulary CSR matrix (scipy, over the memory-mapped arrays)."""
        if self._csr is None:
            from scipy.sparse import csr_matrix

            self._csr = csr_matrix((self.values, self.indices, self.indptr),
                                   shape=(len(self), len(self.vocabulary.tokens)))
        return self._csr

    def search(self, query: Mapping[str, float], k: int = 10) -> list[SparseHit]:
        return self.batch_search([query], k, threads=1)[0]

    def batch_search(self, queries: Sequence[Mapping[str, float]], k: int = 10,
                     threads: int = 1) -> list[list[SparseHit]]:
        """Top-k per query; Lucene runs the queries on ``threads`` Java threads."""
        encoded = [self.encode_query(q) for q in queries]
        searcher = self.open_searcher() if any(encoded) else None
        if searcher is None:
            return [[] for _ in encoded]
        if len(encoded) == 1:
            results = {"0": searcher.search(encoded[0], k) if encoded[0] else []}
        else:
            live = {str(i): q for i, q in enumerate(encoded) if q}
            results = searcher.batch_search(list(live.values()), list(live), k, threads) if live else {}
        norm = self.scale * self.scale
        return [[SparseHit(int(h.docid), float(h.score) / norm) for h in results.get(str(i), [])]
                for i in range(len(encoded))]

    def document_vector(self, row: int) -> dict[str, float]:
        """The stored (de-quantised) sparse vector of a row."""
        lo, hi = self.indptr[row], self.indptr[row + 1]
        return {self.vocabulary.tokens[i]: v / self.scale
                for i, v in zip(self.indices[lo:hi].tolist(), self.values[lo:hi].tolist(), strict=True)}

    def explain(self, row: int, query: Mapping[str, float]) -> dict[str, tuple[float, float]]:
        """Matched tokens of a hit: token -> (query weight, document weight), largest contribution first."""
        doc = self.document_vector(row)
        matched = {t: (float(w), doc[t]) for t, w in query.items() if t in doc and w > 0}
        return dict(sorted(matched.items(), key=lambda kv: -kv[1][0] * kv[1][1]))

    def close(self) -> None:
        with self._lock:
            searcher, self._searcher = self._searcher, None
        if searcher is not None:
            searcher.close()


def _load_csr_part(path: Path) -> np.ndarray:
    """One CSR file, memory-mapped; a file that is not a plain numpy array is an error naming it."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"Sparse shard file {path} is unreadable ({exc}): restore it or rebuild the index.") from exc
