"""First-stage search latency and index size: Lucene impact (sparse) vs FAISS Flat vs FAISS HNSW, one run.

Synthetic documents with realistic sparsity: ~64 non-zero word-pieces per document (images keep their top 64),
token frequencies Zipf-distributed over the 30,522-token vocabulary, weights log-normal like trained STAIR
vectors; queries carry ~16 tokens. Dense vectors are random unit vectors of the same count.

    python benchmarks/search_latency.py --sizes 100000 1000000 [--dim 512] [--queries 300] [--like INDEX]

``--like INDEX`` draws the documents from a real index instead (each one a stored document's tokens, weights
jittered by ±30% so copies do not tie) and the queries from its captions encoded by its own model: the token
statistics of trained vectors and real queries (``indexes/demo``: CLDR labels, ~1.6 tokens each).

Prints, per size: p50/p95 ms per query (one query at a time, k=10) for each index, the sparse/Flat latency
ratio and index bytes per document.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from stair_search.index.dense import DenseIndex, DenseSpec
from stair_search.index.sparse import DEFAULT_SCALE, SparseShard, index_dtype, quantise, write_sparse_shard
from stair_search.models.vocab import Vocabulary


def zipf_csr(rng: np.random.Generator, vocab: Vocabulary, count: int, nnz: int, scale: float):
    """CSR of ``count`` sparse vectors with about ``nnz`` distinct Zipf-distributed emittable tokens each."""
    allowed = np.flatnonzero(vocab.emittable.numpy())
    ranks = np.arange(1, len(allowed) + 1, dtype=np.float64)
    cdf = np.cumsum(ranks**-1.07)
    cdf /= cdf[-1]
    draws = allowed[np.searchsorted(cdf, rng.random((count, int(nnz * 1.6))))]
    draws.sort(axis=1)
    fresh = np.ones_like(draws, dtype=bool)
    fresh[:, 1:] = draws[:, 1:] != draws[:, :-1]
    keep = fresh & (np.cumsum(fresh, axis=1) <= nnz)
    lengths = keep.sum(axis=1)
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    indices = draws[keep].astype(index_dtype(len(vocab)))
    weights = rng.lognormal(mean=-0.3, sigma=0.6, size=len(indices))
    return indptr, indices, quantise(weights, scale)


def like_csr(rng: np.random.Generator, source: tuple, count: int, scale: float):
    """CSR of ``count`` documents, each a random row of ``source`` (a real index's CSR) with jittered weights."""
    indptr, indices, values = source
    rows = rng.integers(0, len(indptr) - 1, count)
    starts, lengths = indptr[rows], np.diff(indptr)[rows]
    out_ptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(starts - out_ptr[:-1], lengths) + np.arange(out_ptr[-1])
    weights = values[gather] / scale * rng.lognormal(0.0, 0.3, len(gather))
    return out_ptr, indices[gather], quantise(weights, scale)


def like_source(index_dir: Path, count: int, rng: np.random.Generator) -> tuple[tuple, list[dict[str, float]]]:
    """A real index's sparse rows (first shard) and ``count`` queries: its captions encoded by its own model."""
    from stair_search.encode import Encoder
    from stair_search.index.layout import SPARSE_DIR
    from stair_search.index.reader import Candidate, Index
    from stair_search.index.sparse import CSR_FILES

    index = Index(index_dir)
    first = index.manifest.shards[0]
    source = tuple(np.load(first.path(index_dir) / SPARSE_DIR / f"{part}.npy") for part in CSR_FILES)
    rows = rng.choice(first.count, count)
    docs = index.documents([Candidate(0, int(row), 0.0) for row in rows], ["caption"])
    encoder = Encoder(index.manifest.model["spec"])
    return source, [q for q in encoder.encode_texts([d["caption"] for d in docs]).sparse if q]


def to_queries(indptr, indices, values, vocab, scale):
    return [{vocab.tokens[i]: v / scale for i, v in zip(indices[lo:hi], values[lo:hi], strict=True)}
            for lo, hi in itertools.pairwise(indptr)]


def percentiles(fn, queries) -> tuple[float, float]:
    for q in queries[:10]:  # warm-up: JIT, page cache
        fn(q)
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q)
        times.append((time.perf_counter() - start) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def run_size(n: int, args, vocab: Vocabulary, workdir: Path) -> dict:
    rng = np.random.default_rng(n)
    started = time.perf_counter()
    csr = like_csr(rng, args.source, n, DEFAULT_SCALE) if args.like else zipf_csr(rng, vocab, n, args.nnz,
                                                                                    DEFAULT_SCALE)
    shard_dir = workdir / f"sparse-{n}"
    write_sparse_shard(shard_dir, csr, vocab, threads=args.threads)
    sparse_build = time.perf_counter() - started
    sparse = SparseShard(shard_dir, vocab, DEFAULT_SCALE)
    queries = args.like_queries or to_queries(*zipf_csr(rng, vocab, args.queries, args.query_nnz, DEFAULT_SCALE),
                                              vocab, DEFAULT_SCALE)
    result = {"n": n, "sparse_build_s": sparse_build, "sparse_ms": percentiles(lambda q: sparse.search(q, 10), queries),
              "sparse_bytes": folder_bytes(shard_dir / "lucene") / n,
              "csr_bytes": sum((shard_dir / f"{f}.npy").stat().st_size for f in ("indptr", "indices", "values")) / n}
    sparse.close()
    shutil.rmtree(shard_dir)

    vectors = rng.standard_normal((n, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    dense_queries = [v[None] for v in vectors[rng.integers(0, n, args.queries)]]
    hnsw = DenseSpec("hnsw", {"M": 32, "ef_construction": args.ef_construction, "ef_search": 128})
    for name, spec in (("flat", DenseSpec("flat")), ("hnsw", hnsw)):
        started = time.perf_counter()
        index = DenseIndex.build(vectors, spec)
        result[f"{name}_build_s"] = time.perf_counter() - started
        result[f"{name}_ms"] = percentiles(lambda q, index=index: index.search(q, 10), dense_queries)
        result[f"{name}_bytes"] = index.nbytes() / n
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512, help="dense width (ViT-B-32: 512)")
    parser.add_argument("--nnz", type=int, default=64, help="non-zero tokens per document")
    parser.add_argument("--query-nnz", type=int, default=16, help="non-zero tokens per query")
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="Lucene indexing threads (default: one per core)")
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--like", type=Path, help="draw documents and queries from this index (see above)")
    args = parser.parse_args()
    vocab = Vocabulary.load()
    args.source, args.like_queries = like_source(args.like, args.queries, np.random.default_rng(0)) if args.like \
        else (None, None)
    workdir = Path(tempfile.mkdtemp(prefix="stair-bench-"))
    rows = []
    try:
        for n in args.sizes:
            rows.append(run_size(n, args, vocab, workdir))
            print(f"done n={n}: {rows[-1]}", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    shape = (f"documents and {len(args.like_queries)} caption queries like {args.like}" if args.like
             else f"{args.nnz} Zipf tokens/doc, {args.query_nnz} tokens/query")
    print(f"\n{shape}, dense dim {args.dim}, k=10, one query at a time")
    print("| docs | sparse p50/p95 ms | Flat p50/p95 ms | HNSW p50/p95 ms | sparse/Flat p50 | "
          "bytes/doc sparse (+CSR) | Flat | HNSW | sparse/Flat bytes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['sparse_ms'][0]:.2f} / {r['sparse_ms'][1]:.2f} | {r['flat_ms'][0]:.2f} / "
              f"{r['flat_ms'][1]:.2f} | {r['hnsw_ms'][0]:.2f} / {r['hnsw_ms'][1]:.2f} | "
              f"{r['sparse_ms'][0] / r['flat_ms'][0]:.3f} | {r['sparse_bytes']:.0f} (+{r['csr_bytes']:.0f}) | "
              f"{r['flat_bytes']:.0f} | {r['hnsw_bytes']:.0f} | {r['sparse_bytes'] / r['flat_bytes']:.2f} |")
    print("build seconds: " + ", ".join(f"n={r['n']:,}: sparse {r['sparse_build_s']:.0f} s, HNSW "
                                        f"{r['hnsw_build_s']:.0f} s" for r in rows))


if __name__ == "__main__":
    main()
