"""In-process sparse search over a shard's CSR vectors: Seismic plus exact postings (Lucene stays the index of record).

Two parts, both built from the shard's integer impacts and saved in ``sparse/accelerated/``:

* **Postings** (``postings_*.npy``, memory-mapped): the CSR transposed, each token's rows sorted by impact
  (highest first, ties by row). Queries of up to :data:`SHORT_QUERY` tokens are answered *exactly* from them
  with a threshold walk: read each token's list to a depth, score the rows seen exactly, and stop once the k-th
  score beats the best an unseen row could reach. A 1-token top-k is simply the first k postings.
* **Seismic** (``seismic.index.seismic``, pyseismic-lsr): a learned-sparse ANN index (pruned posting lists cut
  into blocks with summaries) for longer queries. Its block summaries keep ``SUMMARY_ENERGY`` of each
  block's mass; with summaries that drop tokens a 1-token query loses recall, which is why short queries take
  the exact path.

Every returned row is re-scored exactly from the CSR (query impacts times document impacts, the numbers Lucene
adds up), results are sorted by (score desc, row asc), so hits, explanations and Lucene agree and repeated
searches are deterministic. Scores are on Lucene's integer-impact scale (the caller divides by ``scale**2``).

:meth:`SeismicSearcher.open` returns None for a shard without the files, with files that do not match its CSR
or cannot be read, or when ``seismic`` is not importable: the caller then searches Lucene.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from stair_search.atomic import atomic_dir, fsync

ACCELERATED_DIR = "accelerated"
SEISMIC_STEM = "seismic"  # Seismic appends ``.index.seismic``
SEISMIC_FILE = f"{SEISMIC_STEM}.index.seismic"
META_FILE = "accelerated.json"
POSTING_FILES = ("postings_ptr", "postings_rows", "postings_values")
FORMAT = 1

SHORT_QUERY = 2  # queries of at most this many tokens are scored exactly from the postings
MAX_K = 100  # deeper requests go to Lucene (Seismic's pruned posting lists keep the top postings only)
# Longer queries (an image's or a stored document's 64-token vector: more like this) go to Lucene, which is
# exact. Text queries fit: a grounded query holds its own words, a heads model's its text_top_k (24 for the test
# configs). Seismic's recall@10 on 3,000 random rows: 1.000 at 16 tokens, 0.999 at 24, 0.995 at 32.
MAX_QUERY_TOKENS = 32
# Seismic settings (see benchmarks/search_latency.py for the recall/latency/bytes measurements behind them).
SUMMARY_ENERGY = 0.6
N_POSTINGS = 3500
QUERY_CUT = 10
HEAP_FACTOR = 0.9
CANDIDATE_MARGIN = 10  # extra Seismic candidates re-scored exactly, so re-ranking cannot lose a top-k row


def seismic_module():
    """The ``seismic`` package, or None when it is not installed (or its extension does not load)."""
    try:
        import seismic
    except ImportError:
        return None
    return seismic


def build_seismic(sparse_dir: Path, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                      vocabulary_size: int, threads: int | None = None) -> bool:
    """Write ``sparse_dir/accelerated`` from a shard's CSR; False (nothing written) without ``seismic``.

    The folder is filled under a temporary name and swapped in whole (``atomic.atomic_dir``), its metadata file
    last: a reader finds the previous folder or the new one (or none, and then Lucene answers), and a kill or a
    full disk leaves only a ``.accelerated.<random>.tmp`` folder, which the next sweep removes."""
    seismic = seismic_module()
    if seismic is None:
        return False
    indptr = np.asarray(indptr, dtype=np.int64)
    with atomic_dir(Path(sparse_dir) / ACCELERATED_DIR) as tmp:
        for name, array in zip(POSTING_FILES, postings(indptr, indices, values, vocabulary_size), strict=True):
            np.save(tmp / f"{name}.npy", array)
        with_tokens = int(np.count_nonzero(np.diff(indptr)))
        if with_tokens:
            _build_seismic_index(seismic, tmp, indptr, indices, values, vocabulary_size, threads)
        meta = {"format": FORMAT, "rows": len(indptr) - 1, "nnz": int(indptr[-1]), "with_tokens": with_tokens,
                "vocabulary_size": vocabulary_size, "seismic": bool(with_tokens),
                "settings": {"summary_energy": SUMMARY_ENERGY, "n_postings": N_POSTINGS}}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for path in tmp.iterdir():
            fsync(path)
    return True


def _build_seismic_index(seismic, folder: Path, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
                         vocabulary_size: int, threads: int | None) -> None:
    """Seismic's own index of the rows that hold tokens, saved as ``folder/seismic.index.seismic``."""
    dataset = seismic.SeismicDataset(dim=vocabulary_size)
    dataset.add_documents_by_id([str(r) for r in range(len(indptr) - 1)], np.asarray(indices, dtype=np.int64),
                                np.asarray(values, dtype=np.float32), indptr)
    with _stdout_silenced():  # Seismic prints its build progress and configuration on stdout
        index = seismic.SeismicIndex.build_from_dataset(
            dataset, n_postings=N_POSTINGS, summary_energy=SUMMARY_ENERGY, num_threads=threads or 0)
        index.save(str(folder / SEISMIC_STEM))


@contextmanager
def _stdout_silenced():
    """File descriptor 1 to /dev/null for the block (a native library's prints bypass ``sys.stdout``)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def postings(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray,
             vocabulary_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The CSR transposed: per token, its rows by impact desc (ties by row asc): (ptr int64, rows, impacts)."""
    indptr = np.asarray(indptr, dtype=np.int64)
    row_of = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))
    tokens = np.asarray(indices, dtype=np.int64)
    order = np.lexsort((row_of, -np.asarray(values, dtype=np.int64), tokens))
    ptr = np.zeros(vocabulary_size + 1, dtype=np.int64)
    np.cumsum(np.bincount(tokens, minlength=vocabulary_size), out=ptr[1:])
    return ptr, row_of[order].astype(np.int32), np.asarray(values)[order]


class SeismicSearcher:
    """Exact short queries from impact-ordered postings, Seismic for longer ones; see the module docstring."""

    def __init__(self, folder: Path, csr: tuple[np.ndarray, np.ndarray, np.ndarray], seismic_index):
        self.dir = folder
        self.indptr, self.indices, self.values = csr
        self.ptr, self.rows, self.impacts = (np.load(folder / f"{n}.npy", mmap_mode="r", allow_pickle=False)
                                             for n in POSTING_FILES)
        self.seismic = seismic_index

    @classmethod
    def open(cls, sparse_dir: Path, csr: tuple[np.ndarray, np.ndarray, np.ndarray],
             vocabulary_size: int) -> SeismicSearcher | None:
        """The shard's Seismic searcher, or None (no files, files that do not match the CSR, no seismic)."""
        folder = Path(sparse_dir) / ACCELERATED_DIR
        seismic = seismic_module()
        if seismic is None or not (folder / META_FILE).is_file():
            return None
        indptr = csr[0]
        try:
            meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
            with_tokens = int(np.count_nonzero(np.diff(indptr)))
            if (meta.get("format") != FORMAT or meta.get("rows") != len(indptr) - 1
                    or meta.get("nnz") != int(indptr[-1]) or meta.get("with_tokens") != with_tokens
                    or meta.get("vocabulary_size") != vocabulary_size):
                return None
            index = None
            if meta.get("seismic"):
                index = seismic.SeismicIndex.load(str(folder / SEISMIC_FILE))
                if index.len != with_tokens or index.nnz != int(indptr[-1]):
                    return None
            searcher = cls(folder, csr, index)
            if len(searcher.ptr) != vocabulary_size + 1 or len(searcher.rows) != int(indptr[-1]) \
                    or len(searcher.impacts) != int(indptr[-1]):
                return None
            return searcher
        except Exception:  # a damaged or foreign file: Lucene answers instead
            return None

    def bytes_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())

    def search(self, query_ids: np.ndarray, query_impacts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows and their exact integer-impact scores (float64), by score desc then row asc; rows that
        share no token with the query are never returned. ``query_ids``: distinct token ids."""
        ids = np.asarray(query_ids, dtype=np.int64)
        weights = np.asarray(query_impacts, dtype=np.float64)
        if not len(ids) or k < 1:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        if len(ids) == 1:
            lo, hi = int(self.ptr[ids[0]]), int(self.ptr[ids[0] + 1])
            hi = min(hi, lo + k)
            return np.asarray(self.rows[lo:hi], dtype=np.int64), np.asarray(self.impacts[lo:hi]) * weights[0]
        if len(ids) <= SHORT_QUERY or self.seismic is None:
            return self._threshold_walk(ids, weights, k)
        return self._seismic(ids, weights, k)

    def _threshold_walk(self, ids: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k: the rows in the first ``depth`` postings of each token, scored exactly; done once the
        k-th score is above what a row outside every prefix can reach (or every list is read)."""
        starts, ends = self.ptr[ids].astype(np.int64), self.ptr[ids + 1].astype(np.int64)
        depth = max(k, 16)
        while True:
            cut = np.minimum(starts + depth, ends)
            seen = np.unique(np.concatenate([self.rows[lo:hi] for lo, hi in zip(starts, cut, strict=True)]))
            rows, scores = self._top(seen.astype(np.int64), ids, weights, k)
            exhausted = cut >= ends
            if exhausted.all():
                return rows, scores
            nxt = np.where(exhausted, 0, np.asarray(self.impacts[np.minimum(cut, ends - 1)], dtype=np.float64))
            bound = float(np.dot(nxt, weights))
            if len(rows) == k and scores[-1] > bound:
                return rows, scores
            depth *= 4

    def _seismic(self, ids: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        from seismic import get_seismic_string

        components = ids.astype(str).astype(get_seismic_string())
        found = self.seismic.search("q", components, weights.astype(np.float32), k + CANDIDATE_MARGIN,
                                    QUERY_CUT, HEAP_FACTOR)
        candidates = np.fromiter((int(hit[2]) for hit in found), dtype=np.int64, count=len(found))
        return self._top(candidates, ids, weights, k)

    def _top(self, candidates: np.ndarray, ids: np.ndarray, weights: np.ndarray,
             k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores of ``candidates`` from the CSR; the top-k with a positive score, (score desc, row asc)."""
        scores = self.exact_scores(candidates, ids, weights)
        keep = scores > 0
        candidates, scores = candidates[keep], scores[keep]
        order = np.lexsort((candidates, -scores))[:k]
        return candidates[order], scores[order]

    def exact_scores(self, candidates: np.ndarray, ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Dot products of the query (token ids, impacts) with the CSR rows ``candidates`` (float64, exact)."""
        starts = np.asarray(self.indptr[candidates], dtype=np.int64)
        lengths = np.asarray(self.indptr[candidates + 1], dtype=np.int64) - starts
        total = int(lengths.sum())
        if not total:
            return np.zeros(len(candidates), np.float64)
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        positions = np.repeat(starts - offsets, lengths) + np.arange(total)
        tokens = np.asarray(self.indices[positions], dtype=np.int64)
        segment = np.repeat(np.arange(len(candidates)), lengths)
        order = np.argsort(ids)
        sorted_ids = ids[order]
        slot = np.minimum(np.searchsorted(sorted_ids, tokens), len(ids) - 1)
        matched = sorted_ids[slot] == tokens
        contribution = np.where(matched, weights[order][slot], 0.0) * np.asarray(self.values[positions], np.float64)
        return np.bincount(segment, weights=contribution, minlength=len(candidates))
