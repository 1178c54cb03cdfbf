"""First-stage sparse search, query by query: Lucene impact vs the accelerated in-process searcher vs exact scipy.

Per size and document set, one shard is written the project's way (CSR + Lucene via ``write_sparse_shard``, then
``build_seismic`` as the index writer runs it), and every query is run on the three searchers in turn
(round-robin per query, order rotating, so load drift hits all of them alike), k=10, one query at a time:

* **Lucene**: the shard's Pyserini ``LuceneImpactSearcher`` (the index of record);
* **accelerated**: ``stair_search.index.seismic`` (exact impact-ordered postings for 1-2 tokens, Seismic
  for longer queries, every returned row re-scored exactly);
* **exact**: scipy CSR matrix x dense query vector, top-k by argpartition (the ground truth for recall@10; rows
  tied with the 10th exact score count as hits).

Document sets: ``zipf`` (64 distinct Zipf-distributed tokens per document, log-normal weights) and ``like``
(each document a random row of a real index, ``--like INDEX``, weights jittered by ±30%). Queries, reported
separately: ``1 token`` and ``16 tokens`` (the top-weighted tokens of query vectors drawn like the documents);
``--captions`` adds the like-index's captions encoded by its own model (~1.6 tokens each). ``--dense`` adds
the old FAISS Flat/HNSW timing on random vectors.

    python benchmarks/search_latency.py [--sizes 100000 1000000] [--sets zipf like] [--like INDEX] [--queries 300]

Prints p50/p95 ms per searcher, recall@10 against exact, p50 ratios, and bytes per document on disk.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.sparse import csr_matrix

from stair_search.index.seismic import ACCELERATED_DIR, SEISMIC_FILE, SeismicSearcher, build_seismic
from stair_search.index.sparse import (
    CSR_FILES,
    DEFAULT_SCALE,
    LUCENE_DIR,
    SparseShard,
    available_cores,
    index_dtype,
    quantise,
    write_sparse_shard,
)
from stair_search.vocabulary import Vocabulary


def zipf_csr(rng: np.random.Generator, vocab: Vocabulary, count: int, nnz: int, scale: float):
    """CSR of ``count`` sparse vectors with about ``nnz`` distinct Zipf-distributed emittable tokens each."""
    allowed = np.flatnonzero(vocab.emittable)
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
    from stair_search.index import Candidate, IndexReader
    from stair_search.index.layout import SPARSE_DIR
    from stair_search.index.sparse import CSR_FILES

    index = IndexReader(index_dir)
    first = index.manifest.shards[0]
    source = tuple(np.load(first.path(index_dir) / SPARSE_DIR / f"{part}.npy") for part in CSR_FILES)
    rows = rng.choice(first.count, count)
    docs = index.documents([Candidate(0, int(row), 0.0) for row in rows], ["caption"])
    encoder = Encoder(index.manifest.model["spec"])
    return source, [q for q in encoder.encode_texts([d["caption"] for d in docs]).sparse if q]


def top_token_queries(csr, tokens: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(token ids, impacts) of the ``tokens`` highest-weighted tokens of the first ``count`` rows with enough."""
    indptr, indices, values = csr
    out = []
    for lo, hi in itertools.pairwise(indptr.tolist()):
        if hi - lo >= tokens:
            order = np.argsort(-values[lo:hi].astype(np.int64), kind="stable")[:tokens] + lo
            out.append((indices[order].astype(np.int64), values[order].astype(np.int64)))
        if len(out) == count:
            break
    return out


def encoded_queries(queries: list[dict[str, float]], vocab: Vocabulary) -> list[tuple[np.ndarray, np.ndarray]]:
    index = vocab.index
    out = []
    for q in queries:
        ids = np.asarray([index[t] for t in q if t in index and q[t] > 0], dtype=np.int64)
        if len(ids):
            out.append((ids, quantise(np.asarray([q[vocab.tokens[i]] for i in ids]), DEFAULT_SCALE).astype(np.int64)))
    return out


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def compare(queries, searchers: dict, exact, k: int = 10) -> dict:
    """Round-robin: each query runs on every searcher (rotating which goes first); times in ms, recall@10."""
    names = list(searchers)
    times = {n: [] for n in names}
    found = {n: 0 for n in names}
    total = 0
    for q in queries[:10]:  # warm-up: JIT, page cache
        for n in names:
            searchers[n](q)
    for i, q in enumerate(queries):
        scores = exact(q)
        top = np.argpartition(-scores, k)[:k] if len(scores) > k else np.arange(len(scores))
        top = top[scores[top] > 0]
        kth = scores[top].min() if len(top) else np.inf
        total += len(top)
        for n in names[i % len(names):] + names[:i % len(names)]:
            start = time.perf_counter()
            rows = searchers[n](q)
            times[n].append((time.perf_counter() - start) * 1000)
            found[n] += int(np.count_nonzero(scores[np.asarray(rows, dtype=np.int64)] >= kth)) if len(rows) else 0
    return {n: (float(np.percentile(times[n], 50)), float(np.percentile(times[n], 95)),
                found[n] / total if total else 1.0) for n in names}


def run_size(n: int, kind: str, args, vocab: Vocabulary, workdir: Path) -> dict:
    rng = np.random.default_rng(n)
    if kind == "like":
        csr = like_csr(rng, args.source, n, DEFAULT_SCALE)
        query_rows = like_csr(rng, args.source, args.queries * 4, DEFAULT_SCALE)
    else:
        csr = zipf_csr(rng, vocab, n, args.nnz, DEFAULT_SCALE)
        query_rows = zipf_csr(rng, vocab, args.queries * 4, args.query_nnz, DEFAULT_SCALE)
    shard_dir = workdir / f"sparse-{kind}-{n}"
    started = time.perf_counter()
    write_sparse_shard(shard_dir, csr, vocab, threads=args.threads)
    lucene_build = time.perf_counter() - started
    started = time.perf_counter()
    build_seismic(shard_dir, *csr, len(vocab.tokens), threads=args.threads)
    accelerated_build = time.perf_counter() - started

    shard = SparseShard(shard_dir, vocab, DEFAULT_SCALE)
    fast = SeismicSearcher.open(shard_dir, (shard.indptr, shard.indices, shard.values), len(vocab.tokens))
    assert fast is not None, "the accelerated searcher did not open"
    lucene = shard.open_searcher()
    matrix = csr_matrix((np.asarray(csr[2], np.float64), csr[1], csr[0]), shape=(n, len(vocab.tokens)))
    dense_query = np.zeros(len(vocab.tokens), np.float64)

    def exact(q):
        dense_query[:] = 0
        dense_query[q[0]] = q[1]
        return matrix @ dense_query

    def lucene_search(q):
        query = shard.encode_query({vocab.tokens[t]: v / DEFAULT_SCALE for t, v in zip(*q, strict=True)})
        return [int(h.docid) for h in lucene.search(query, 10)]

    searchers = {"lucene": lucene_search, "accelerated": lambda q: fast.search(q[0], q[1], 10)[0],
                 "exact": lambda q: np.argpartition(-exact(q), 10)[:10]}
    groups = {"1 token": top_token_queries(query_rows, 1, args.queries),
              "16 tokens": top_token_queries(query_rows, 16, args.queries)}
    if kind == "like" and args.like_queries:
        groups["captions"] = encoded_queries(args.like_queries, vocab)
    seismic_bytes = (shard_dir / ACCELERATED_DIR / SEISMIC_FILE).stat().st_size
    result = {"n": n, "set": kind, "lucene_build_s": lucene_build, "accelerated_build_s": accelerated_build,
              "groups": {g: compare(qs, searchers, exact) for g, qs in groups.items()},
              "counts": {g: len(qs) for g, qs in groups.items()},
              "lucene_bytes": folder_bytes(shard_dir / LUCENE_DIR) / n,
              "accelerated_bytes": folder_bytes(shard_dir / ACCELERATED_DIR) / n,
              "seismic_bytes": seismic_bytes / n,
              "csr_bytes": sum((shard_dir / f"{f}.npy").stat().st_size for f in CSR_FILES) / n}
    shard.close()
    shutil.rmtree(shard_dir)
    return result


def dense_timing(n: int, args) -> dict:
    """The FAISS Flat / HNSW side of the old benchmark (random unit vectors), behind ``--dense``."""
    from stair_search.index import DenseShard, DenseSpec

    rng = np.random.default_rng(n)
    vectors = rng.standard_normal((n, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = [v[None] for v in vectors[rng.integers(0, n, args.queries)]]
    hnsw = DenseSpec("hnsw", {"M": 32, "ef_construction": args.ef_construction, "ef_search": 128})
    out = {}
    for name, spec in (("flat", DenseSpec("flat")), ("hnsw", hnsw)):
        index = DenseShard.build(vectors, spec)
        times = []
        for q in queries:
            start = time.perf_counter()
            index.search(q, 10)
            times.append((time.perf_counter() - start) * 1000)
        out[name] = (float(np.percentile(times, 50)), float(np.percentile(times, 95)), index.nbytes() / n)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--sets", nargs="+", choices=["zipf", "like"], default=["zipf", "like"])
    parser.add_argument("--like", type=Path, default=Path("indexes/demo"), help="the trained-like source index")
    parser.add_argument("--captions", action="store_true", help="also query with the like-index's captions")
    parser.add_argument("--nnz", type=int, default=64, help="non-zero tokens per Zipf document")
    parser.add_argument("--query-nnz", type=int, default=32, help="tokens per Zipf query row (its top 1/16 used)")
    parser.add_argument("--queries", type=int, default=300, help="queries per group")
    parser.add_argument("--threads", type=int, default=available_cores(), help="build threads")
    parser.add_argument("--dense", action="store_true", help="also time FAISS Flat and HNSW (random vectors)")
    parser.add_argument("--dim", type=int, default=512, help="dense width for --dense (ViT-B-32: 512)")
    parser.add_argument("--ef-construction", type=int, default=80)
    args = parser.parse_args()
    vocab = Vocabulary.load()
    args.source, args.like_queries = None, None
    if "like" in args.sets:
        if args.captions:
            args.source, args.like_queries = like_source(args.like, args.queries, np.random.default_rng(0))
        else:
            first = json.loads((args.like / "manifest.json").read_text())["shards"][0]["name"]
            args.source = tuple(np.load(args.like / "shards" / first / "sparse" / f"{p}.npy") for p in CSR_FILES)
    workdir = Path(tempfile.mkdtemp(prefix="stair-bench-"))
    rows = []
    try:
        for n in args.sizes:
            for kind in args.sets:
                rows.append(run_size(n, kind, args, vocab, workdir))
                print(f"done n={n} {kind}: {rows[-1]}", flush=True)
            if args.dense:
                print(f"dense n={n}: " + ", ".join(f"{name} p50/p95 {v[0]:.2f}/{v[1]:.2f} ms, {v[2]:.0f} B/doc"
                                                   for name, v in dense_timing(n, args).items()), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\nk=10, one query at a time, round-robin per query; {args.queries} queries per group; recall@10 vs exact")
    print("| docs | set | queries | Lucene p50/p95 ms | accelerated p50/p95 ms | exact p50/p95 ms | recall@10 Lucene / "
          "accel | Lucene/accel p50 | exact/accel p50 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        for g, res in r["groups"].items():
            lu, ac, ex = res["lucene"], res["accelerated"], res["exact"]
            print(f"| {r['n']:,} | {r['set']} | {g} ({r['counts'][g]}) | {lu[0]:.3f} / {lu[1]:.3f} | "
                  f"{ac[0]:.3f} / {ac[1]:.3f} | {ex[0]:.3f} / {ex[1]:.3f} | {lu[2]:.3f} / {ac[2]:.3f} | "
                  f"{lu[0] / ac[0]:.1f}x | {ex[0] / ac[0]:.1f}x |")
    print("\n| docs | set | bytes/doc Lucene | accelerated (Seismic + postings) | CSR | accel/Lucene | "
          "build s Lucene | accelerated |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['set']} | {r['lucene_bytes']:.0f} | {r['accelerated_bytes']:.0f} "
              f"({r['seismic_bytes']:.0f} + {r['accelerated_bytes'] - r['seismic_bytes']:.0f}) | "
              f"{r['csr_bytes']:.0f} | "
              f"{r['accelerated_bytes'] / r['lucene_bytes']:.1f}x | {r['lucene_build_s']:.0f} | "
              f"{r['accelerated_build_s']:.0f} |")


if __name__ == "__main__":
    main()
