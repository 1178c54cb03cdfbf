"""Sparse shard: a Lucene impact index (written through Lucene's API, searched by Pyserini's Anserini) + numpy CSR.

Lucene impacts are integers, so weights are quantised: ``impact = max(1, round(weight * scale))`` — a weight
that was non-zero never becomes 0 (Pyserini's own path truncates with ``asInt()``). Queries are quantised with
the same scale, and scores are reported de-quantised (``lucene_score / scale**2``) so they stay comparable to
the float dot product.

Each Lucene document's id is its row in the shard; the CSR copy (``indptr``/``indices``/``values`` .npy files,
memory-mapped) gives every hit's matched tokens without storing raw JSON in Lucene, is what tests compare
Lucene against, and is the source for rebuilding a shard.
"""

from __future__ import annotations

import itertools
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from stair_search.index.files import DamagedIndexError
from stair_search.index.jvm import JAVA_CALLS, java_class
from stair_search.index.lucene import ImpactSearcher
from stair_search.index.seismic import MAX_K, MAX_QUERY_TOKENS, SeismicSearcher
from stair_search.vocabulary import Vocabulary, spell

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
    """Write the shard's Lucene impact index from the CSR directly through Lucene's ``IndexWriter``.

    Every document is one string ``term|impact term|impact ...`` that a whitespace tokenizer and Lucene's
    ``DelimitedTermFrequencyTokenFilter`` turn into postings whose term frequency *is* the impact. Anserini's
    ``IndexCollection -impact -pretokenized`` (the path this replaces) spelled each term out ``impact`` times
    (~6,000 words per image at scale 100) and so cost ~1 ms per document and thread; this writes the same
    postings in ~50-80 µs, 10-15x faster per thread (benchmarks/lucene_build.py). The documents are what Anserini's
    ``DefaultLuceneDocumentGenerator`` makes and Pyserini's ``LuceneImpactSearcher`` expects: ``id`` (stored
    string + binary doc values, which break score ties) and ``contents`` (docs and freqs, not stored); the
    writer is configured like Anserini's (``ImpactSimilarity``, no compound files, default codec).

    Rows without a token (an image whose sparse vector is all zeros) are left out: such a row can never match
    a sparse query. Each document's id (Pyserini's docid) is its CSR row number. ``threads`` Python threads
    (default 1) feed the one writer, blocks of rows each; pyjnius releases the GIL while Lucene indexes, so
    they can overlap, but on 2 shared cores 2 threads measured 0.9-1.1x one (Python builds the strings under
    the GIL, and Lucene's merge, GC and JIT threads want the other core), hence the default. Ids, postings
    and search results never depend on ``threads``: only Lucene's internal document order does."""
    index_dir = Path(index_dir)
    rows = len(indptr) - 1
    threads = max(1, min(threads or 1, -(-rows // _BLOCK_ROWS)))
    if len(values) and (int(np.min(values)) < 1 or int(np.max(values)) > MAX_IMPACT):
        raise ValueError(f"Impacts must be integers in 1..{MAX_IMPACT} (quantise() makes them).")
    terms = _delimited_terms(vocabulary)
    if index_dir.exists():
        shutil.rmtree(index_dir)
    writer = _impact_writer(index_dir)
    try:
        _add_documents(writer, indptr, indices, values, terms, threads)
        writer.commit()
    except BaseException:
        writer.rollback()  # close() would commit what was added: no partial index
        raise
    writer.close()
    if not any(index_dir.glob("segments_*")):
        raise RuntimeError(f"Lucene wrote no index at {index_dir}; see the Java log above.")


_DELIMITER = "|"  # term|impact; spell() percent-encodes "|" and whitespace, so neither occurs inside a term
_BLOCK_ROWS = 2048  # rows turned into Lucene documents per step (one numpy pass builds their strings)


def _delimited_terms(vocabulary: Vocabulary) -> np.ndarray:
    """``spell(token) + "|"`` per token id (an object array, so a row's pieces come from one fancy index)."""
    terms = [spell(t) for t in vocabulary.tokens]
    bad = [t for t in terms if not t or _DELIMITER in t or any(c.isspace() for c in t)]
    if bad:
        raise ValueError(f"Lucene terms {bad[:5]} are empty or contain whitespace or '{_DELIMITER}'.")
    return np.array([t + _DELIMITER for t in terms], dtype=object)


def _impact_strings() -> np.ndarray:
    """str(impact) for every possible impact, as an object array."""
    return np.array([str(i) for i in range(MAX_IMPACT + 1)], dtype=object)


def _impact_writer(index_dir: Path):
    """A Lucene IndexWriter set up as Anserini's ``IndexCollection -impact -pretokenized`` sets up its own, but
    whose analyzer reads ``term|impact`` (whitespace tokenizer + delimited term frequency)."""
    custom = java_class("org.apache.lucene.analysis.custom.CustomAnalyzer")
    hash_map = java_class("java.util.HashMap")
    delimiter = hash_map()
    delimiter.put("delimiter", _DELIMITER)
    analyzer = (custom.builder().withTokenizer("whitespace", hash_map())
                .addTokenFilter("delimitedTermFrequency", delimiter).build())
    config = java_class("org.apache.lucene.index.IndexWriterConfig")(analyzer)
    config.setSimilarity(java_class("io.anserini.search.similarity.ImpactSimilarity")())
    config.setOpenMode(java_class("org.apache.lucene.index.IndexWriterConfig$OpenMode").CREATE)
    heap_mb = java_class("java.lang.Runtime").getRuntime().maxMemory() / 2**20
    config.setRAMBufferSizeMB(float(max(16, min(1024, heap_mb // 4))))  # Anserini: 4 GB, more than our heap
    config.setUseCompoundFile(False)
    config.setMergeScheduler(java_class("org.apache.lucene.index.ConcurrentMergeScheduler")())
    path = java_class("java.io.File")(str(index_dir)).toPath()
    return java_class("org.apache.lucene.index.IndexWriter")(
        java_class("org.apache.lucene.store.FSDirectory").open(path), config)


class _DocumentSlots:
    """One Lucene document whose fields are refilled for every row (Lucene allows reusing Field instances
    between ``addDocument`` calls): four Java calls per document instead of building one.

    pyjnius keeps one method object per Java class and binds it to an instance on attribute access, so two
    threads setting fields of *different* documents could swap them; those calls run under ``jvm.JAVA_CALLS``.
    ``IndexWriter.addDocument`` (the writer is the same object for every thread) runs outside it, and
    pyjnius releases the GIL while Java indexes."""

    def __init__(self):
        field = "org.apache.lucene.document."
        with JAVA_CALLS:
            store = java_class(field + "Field$Store")
            options = java_class("org.apache.lucene.index.IndexOptions")
            contents_type = java_class(field + "FieldType")()
            contents_type.setStored(False)
            contents_type.setIndexOptions(options.DOCS_AND_FREQS)
            contents_type.freeze()
            self.document = java_class(field + "Document")()
            self.id = java_class(field + "StringField")("id", "0", store.YES)
            self.id_values = java_class(field + "BinaryDocValuesField")(
                "id", java_class("org.apache.lucene.util.BytesRef")(b"0"))
            self.contents = java_class(field + "Field")(
                "contents", "", contents_type,
                signature="(Ljava/lang/String;Ljava/lang/CharSequence;Lorg/apache/lucene/index/IndexableFieldType;)V")
            for f in (self.id, self.id_values, self.contents):
                self.document.add(f)

    def add(self, writer, docid: str, text: str) -> None:
        with JAVA_CALLS:
            self.id.setStringValue(docid)
            self.id_values.setBytesValue(docid.encode())
            self.contents.setStringValue(text)
        writer.addDocument(self.document)


def _add_documents(writer, indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, terms: np.ndarray,
                   threads: int) -> None:
    """Add every row with tokens as a document, block by block, on ``threads`` threads (1: this one)."""
    rows = len(indptr) - 1
    impacts = _impact_strings()
    blocks = iter(range(0, rows, _BLOCK_ROWS))
    blocks_lock = threading.Lock()
    errors: list[BaseException] = []

    def work() -> None:
        slots = _DocumentSlots()
        while not errors:
            with blocks_lock:
                lo = next(blocks, None)
            if lo is None:
                return
            ptr = np.asarray(indptr[lo:min(lo + _BLOCK_ROWS, rows) + 1], dtype=np.int64)
            first, last = int(ptr[0]), int(ptr[-1])
            pieces = (terms[indices[first:last]] + impacts[values[first:last]]).tolist()
            bounds = (ptr - first).tolist()
            for r, (a, b) in enumerate(itertools.pairwise(bounds)):
                if a != b:
                    slots.add(writer, str(lo + r), " ".join(pieces[a:b]))

    def worker() -> None:
        import jnius

        try:
            work()
        except BaseException as exc:
            errors.append(exc)
        finally:
            jnius.detach()  # a Python thread that used Java must detach before it ends

    if threads == 1:
        work()
        return
    pool = [threading.Thread(target=worker, name=f"lucene-build-{i}") for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    if errors:
        raise errors[0]


class SparseShard:
    """Read side of one shard: Lucene impact search (Anserini via Pyserini's jar) + CSR for explanations.

    The CSR files open at once (memory-mapped); the Lucene searcher, and with it the JVM, only on the first
    search (``open_searcher``), so explaining a hit or a dense-only search never
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
        self._seismic: SeismicSearcher | bool | None = False  # False: not looked for yet
        self._csr = None
        self._lock = threading.Lock()

    def open_searcher(self):
        """The Lucene searcher (opened once, thread-safely); None for a shard none of whose documents has a token
        (there are no terms for Pyserini to open)."""
        if self._searcher is None and self._with_tokens:
            with self._lock, JAVA_CALLS:
                if self._searcher is None:
                    searcher = ImpactSearcher(self.dir / LUCENE_DIR)
                    if searcher.num_docs != self._with_tokens:
                        raise DamagedIndexError(
                            f"Sparse shard {self.dir}: Lucene has {searcher.num_docs} documents but the vector "
                            f"files have {self._with_tokens} with tokens; the shard is damaged, rebuild it.")
                    self._searcher = searcher
        return self._searcher

    @staticmethod
    def required_files(shard_dir: Path) -> list[Path]:
        return [shard_dir / f"{n}.npy" for n in CSR_FILES] + [shard_dir / LUCENE_DIR]

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def encode_query(self, query: Mapping[str, float]) -> dict[str, int]:
        """Token weights -> {Lucene term: impact}; tokens outside the vocabulary are ignored."""
        ids, impacts = self._query_impacts(query)
        return {self._terms[i]: int(v) for i, v in zip(ids.tolist(), impacts.tolist(), strict=True)}

    def search_rows(self, query: Mapping[str, float], rows: np.ndarray, k: int = 10) -> list[SparseHit]:
        """Top-k of ``rows`` only, scored exactly from the stored CSR vectors: the quantised query impacts times
        the documents' impacts, as Lucene scores them (rows sharing no token with the query are left out)."""
        ids, impacts = self._query_impacts(query)
        if not len(ids) or not len(rows):
            return []
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

    def seismic(self) -> SeismicSearcher | None:
        """The shard's in-process searcher (seismic.py), opened once; None when the shard has none, its files
        are damaged or ``seismic`` is not installed: Lucene answers then."""
        if self._seismic is False:
            with self._lock:
                if self._seismic is False:
                    self._seismic = SeismicSearcher.open(self.dir, (self.indptr, self.indices, self.values),
                                                         len(self.vocabulary.tokens))
        return self._seismic

    def _query_impacts(self, query: Mapping[str, float]) -> tuple[np.ndarray, np.ndarray]:
        """Token ids and quantised impacts of a query (tokens outside the vocabulary are ignored)."""
        index = self.vocabulary.index
        ids = np.asarray([index[t] for t in query if t in index and query[t] > 0], dtype=np.int64)
        return ids, quantise(np.asarray([query[self.vocabulary.tokens[i]] for i in ids]), self.scale)

    def batch_search(self, queries: Sequence[Mapping[str, float]], k: int = 10,
                     threads: int = 1) -> list[list[SparseHit]]:
        """Top-k per query: in process when the shard has a Seismic searcher and the query suits it (k <=
        MAX_K, at most MAX_QUERY_TOKENS tokens: text queries), else Lucene, exact, which runs the queries on
        ``threads`` Java threads. Both give the same scores."""
        results: list[list[SparseHit] | None] = [None] * len(queries)
        seismic = self.seismic() if k <= MAX_K else None
        if seismic is not None:
            norm = self.scale * self.scale
            try:
                for i, query in enumerate(queries):
                    ids, impacts = self._query_impacts(query)
                    if len(ids) <= MAX_QUERY_TOKENS:
                        results[i] = [SparseHit(int(r), float(s) / norm)
                                      for r, s in zip(*seismic.search(ids, impacts, k), strict=True)]
            except Exception:  # a damaged file that loaded: Lucene, the index of record, answers
                self._seismic = None
                results = [None] * len(queries)
        rest = [i for i, found in enumerate(results) if found is None]
        if rest:
            for i, hits in zip(rest, self._lucene_search([queries[i] for i in rest], k, threads), strict=True):
                results[i] = hits
        return results  # type: ignore[return-value]

    def _lucene_search(self, queries: Sequence[Mapping[str, float]], k: int, threads: int) -> list[list[SparseHit]]:
        encoded = [self.encode_query(q) for q in queries]
        searcher = self.open_searcher() if any(encoded) else None
        if searcher is None:
            return [[] for _ in encoded]
        norm = self.scale * self.scale
        with JAVA_CALLS:  # the hits are per-call Java objects (see jvm.JAVA_CALLS)
            live = [i for i, q in enumerate(encoded) if q]
            if len(live) == 1:
                found = {live[0]: searcher.search(encoded[live[0]], k)}
            else:
                found = dict(zip(live, searcher.batch_search([encoded[i] for i in live], k, threads), strict=True))
            return [[SparseHit(row, score / norm) for row, score in found.get(i, [])] for i in range(len(encoded))]

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
        raise DamagedIndexError(f"Sparse shard file {path} is unreadable ({exc}): restore it or rebuild the "
                                f"index.") from exc
