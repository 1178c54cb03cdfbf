"""Lucene shard build time: one Anserini thread against one per core, on the same documents, in one run.

Anserini's impact indexing spells each term out ``impact`` times (~6,000 words per image at scale 100), so
a shard's Lucene build costs about 1 ms per document and thread, and an indexing job waits for it at each
shard. ``build_lucene`` splits the collection into one file per thread, the unit Anserini parallelises.

    python benchmarks/lucene_build.py [--docs 20000] [--threads N]

Documents: 64 Zipf-distributed tokens each, log-normal weights like trained STAIR vectors (as in
search_latency.py). Both builds are checked to hold every document.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from search_latency import zipf_csr

from stair_search.index.sparse import DEFAULT_SCALE, SparseShard, available_cores, write_sparse_shard
from stair_search.models.vocab import Vocabulary


def build_seconds(csr: tuple, vocab: Vocabulary, folder: Path, threads: int) -> float:
    start = time.perf_counter()
    write_sparse_shard(folder, csr, vocab, threads=threads)
    seconds = time.perf_counter() - start
    shard = SparseShard(folder, vocab, DEFAULT_SCALE)  # its count check: every document made it into Lucene
    shard.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--threads", type=int, default=available_cores(), help="the parallel build's threads")
    args = parser.parse_args()
    vocab = Vocabulary.load()
    csr = zipf_csr(np.random.default_rng(0), vocab, args.docs, 64, DEFAULT_SCALE)
    words = int(csr[2].sum()) / args.docs
    work = Path(tempfile.mkdtemp(prefix="lucene-bench-"))
    try:
        build_seconds(zipf_csr(np.random.default_rng(1), vocab, 200, 64, DEFAULT_SCALE), vocab, work / "warm", 1)
        one = build_seconds(csr, vocab, work / "one", 1)
        many = build_seconds(csr, vocab, work / "many", args.threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.docs:,} documents, {words:,.0f} words each as Anserini spells them, {available_cores()} cores")
    print("\n| 1 thread s | docs/s | threads | s | docs/s | speed-up |")
    print("|---|---|---|---|---|---|")
    print(f"| {one:.1f} | {args.docs / one:,.0f} | {args.threads} | {many:.1f} | {args.docs / many:,.0f} | "
          f"{one / many:.2f}× |")


if __name__ == "__main__":
    main()
