"""Lucene shard build: Anserini's impact indexing (the old path) against ``build_lucene``, same documents, one run.

Anserini's ``IndexCollection -impact -pretokenized`` spells each term out ``impact`` times (~6,000 words per
image at scale 100), about 1 ms per document and thread. ``build_lucene`` writes each document as one
``term|impact ...`` string through Lucene's ``IndexWriter``, whose analyzer makes the impact the term
frequency. This benchmark keeps a private copy of the old path as the baseline, builds both indexes over the
same documents (after a small warm-up build of each, so neither pays the JIT for the other), and checks that
they answer a fixed query set identically and exactly as CSR scoring does.

    python benchmarks/lucene_build.py [--docs 20000] [--threads N] [--queries 200]

Documents: 64 Zipf-distributed tokens each, log-normal weights like trained STAIR vectors (search_latency.py).
Prints docs/s per thread for each path (both on one thread) and their ratio, the new path on ``--threads``
threads, and the query checks: top-10 (ids and scores) of the two indexes, and of each against exact CSR
scores (``SparseShard.search_rows`` over all rows; ties at the top-10 cut may go either way).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from search_latency import zipf_csr

from stair_search.index.jvm import java_class
from stair_search.index.sparse import (
    CSR_FILES,
    DEFAULT_SCALE,
    LUCENE_DIR,
    SparseHit,
    SparseShard,
    available_cores,
    build_lucene,
)
from stair_search.vocabulary import Vocabulary, spell

QUERY_TOKENS = (1, 2, 8, 16)
K = 10


def anserini_build(index_dir: Path, indptr, indices, values, vocabulary: Vocabulary, threads: int) -> None:
    """The old ``build_lucene``: a JsonVectorCollection (one file per thread) + ``IndexCollection -impact``."""
    terms = [spell(t) for t in vocabulary.tokens]
    rows = len(indptr) - 1
    threads = max(1, min(threads, rows))
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
        raise RuntimeError(f"Anserini wrote no Lucene index at {index_dir}")


def zipf_queries(rng: np.random.Generator, vocab: Vocabulary, count: int, tokens: int) -> list[dict[str, float]]:
    """``count`` queries of ``tokens`` Zipf-drawn tokens with log-normal weights (like the documents)."""
    indptr, indices, values = zipf_csr(rng, vocab, count, tokens, DEFAULT_SCALE)
    return [{vocab.tokens[i]: v / DEFAULT_SCALE for i, v in zip(indices[lo:hi].tolist(), values[lo:hi].tolist(),
                                                                strict=True)}
            for lo, hi in zip(indptr[:-1].tolist(), indptr[1:].tolist(), strict=True)]


def build_seconds(build, csr: tuple, vocab: Vocabulary, folder: Path, threads: int) -> float:
    """Seconds to build a shard's Lucene index with ``build``; the shard opens (its count check passes)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in zip(CSR_FILES, csr, strict=True):
        np.save(folder / f"{name}.npy", array)
    start = time.perf_counter()
    build(folder / LUCENE_DIR, *csr, vocab, threads=threads)
    seconds = time.perf_counter() - start
    shard = SparseShard(folder, vocab, DEFAULT_SCALE)
    shard.open_searcher()  # raises unless Lucene holds every row with tokens
    shard.close()
    return seconds


def units(hit: SparseHit) -> int:
    """A hit's score in Lucene's units: an integer (query impacts times document impacts). Pyserini reports the
    n-th of tied scores lowered by n * 1e-6 (Anserini's ScoreTiesAdjusterReranker); rounding undoes that."""
    return round(hit.score * DEFAULT_SCALE**2)


def exact_mismatch(hits: list[SparseHit], exact: list[SparseHit], k: int) -> str | None:
    """Why ``hits`` (Lucene's top-k) differ from exact scoring (every matching row, best first), or None.

    Scores must be equal, in order; per score, the ids must be rows with exactly that score, and all of them
    except at the lowest score of a full top-k (ties at the cut may go either way)."""
    if [units(h) for h in hits] != [units(h) for h in exact[:k]]:
        return f"scores {[units(h) for h in hits]} != {[units(h) for h in exact[:k]]}"
    if any(abs(h.score * DEFAULT_SCALE**2 - units(h)) > 1e-3 for h in hits):
        return f"scores {[h.score for h in hits]} are not whole Lucene units"
    by_score: dict[int, set[int]] = defaultdict(set)
    for h in exact:
        by_score[units(h)].add(h.row)
    got: dict[int, list[int]] = defaultdict(list)
    for h in hits:
        got[units(h)].append(h.row)
    for score, rows in got.items():
        cut = len(hits) == k and score == units(hits[-1])
        if len(set(rows)) != len(rows) or not set(rows) <= by_score[score] or (
                not cut and set(rows) != by_score[score]):
            return f"rows {sorted(rows)} at score {score}, exact: {sorted(by_score[score])}"
    return None


def same_top_k(a: list[SparseHit], b: list[SparseHit]) -> bool:
    """Equal scores in order and, per score, the same ids (tie order may differ among equal scores)."""
    def groups(hits):
        out: dict[int, set[int]] = defaultdict(set)
        for h in hits:
            out[units(h)].add(h.row)
        return out
    return [units(h) for h in a] == [units(h) for h in b] and groups(a) == groups(b)


def query_checks(old: SparseShard, new: SparseShard, queries: list[dict[str, float]]) -> dict[str, int]:
    rows = np.arange(len(new))
    old_hits, new_hits = old.batch_search(queries, K), new.batch_search(queries, K)
    counts = {"queries": len(queries), "identical": 0, "same_top10": 0, "old_exact": 0, "new_exact": 0, "hits": 0}
    for query, a, b in zip(queries, old_hits, new_hits, strict=True):
        exact = new.search_rows(query, rows, k=len(rows))
        counts["identical"] += [(h.row, h.score) for h in a] == [(h.row, h.score) for h in b]
        counts["same_top10"] += same_top_k(a, b)
        counts["old_exact"] += exact_mismatch(a, exact, K) is None
        counts["new_exact"] += exact_mismatch(b, exact, K) is None
        counts["hits"] += len(b)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=available_cores(), help="threads of the new path's 2nd run")
    parser.add_argument("--queries", type=int, default=200, help="split evenly over 1, 2, 8 and 16 tokens")
    args = parser.parse_args()
    vocab = Vocabulary.load()
    csr = zipf_csr(np.random.default_rng(0), vocab, args.docs, 64, DEFAULT_SCALE)
    rng = np.random.default_rng(7)
    per_size = args.queries // len(QUERY_TOKENS)
    queries = [q for n in QUERY_TOKENS for q in zipf_queries(rng, vocab, per_size, n)]
    words = int(csr[2].sum()) / args.docs
    work = Path(tempfile.mkdtemp(prefix="lucene-bench-"))
    try:
        warm = zipf_csr(np.random.default_rng(1), vocab, 2000, 64, DEFAULT_SCALE)
        build_seconds(anserini_build, warm, vocab, work / "warm-old", 1)
        build_seconds(build_lucene, warm, vocab, work / "warm-new", 1)
        old = build_seconds(anserini_build, csr, vocab, work / "old", 1)
        new = build_seconds(build_lucene, csr, vocab, work / "new", 1)
        many = build_seconds(build_lucene, csr, vocab, work / "many", args.threads)
        shards = [SparseShard(work / name, vocab, DEFAULT_SCALE) for name in ("old", "new", "many")]
        checks = query_checks(shards[0], shards[1], queries)
        threaded = query_checks(shards[1], shards[2], queries)
        for shard in shards:
            shard.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.docs:,} documents of 64 tokens ({words:,.0f} words each as Anserini spells them), "
          f"{available_cores()} cores")
    print("\n| path | threads | s | docs/s | docs/s per thread |")
    print("|---|---|---|---|---|")
    for name, threads, seconds in (("Anserini IndexCollection -impact (old)", 1, old),
                                   ("build_lucene: Lucene IndexWriter, impact = term frequency (new)", 1, new),
                                   ("build_lucene (new)", args.threads, many)):
        rate = args.docs / seconds
        print(f"| {name} | {threads} | {seconds:.2f} | {rate:,.0f} | {rate / threads:,.0f} |")
    print(f"\nper thread, new / old: {old / new:.1f}×")
    print(f"\n{checks['queries']} queries ({'/'.join(map(str, QUERY_TOKENS))} tokens), top-{K}, "
          f"{checks['hits']:,} hits from the new index:")
    print(f"- old vs new index: identical lists (ids, scores, order) {checks['identical']}/{checks['queries']}, "
          f"same scores and ids per score {checks['same_top10']}/{checks['queries']}")
    print(f"- equal to exact CSR scoring: old {checks['old_exact']}/{checks['queries']}, "
          f"new {checks['new_exact']}/{checks['queries']}")
    print(f"- new on {args.threads} threads vs on 1: identical {threaded['identical']}/{threaded['queries']}, "
          f"exact {threaded['new_exact']}/{threaded['queries']}")
    if min(checks["identical"], checks["new_exact"], threaded["identical"]) < checks["queries"]:
        raise SystemExit("The indexes answer differently: see above.")


if __name__ == "__main__":
    main()
