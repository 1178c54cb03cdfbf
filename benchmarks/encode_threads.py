"""Query-encode latency with 1 against N torch threads, quiet and under load, blocks alternating in one run.

Why: a query encode is a few small matrix products; torch's intra-op threads help little there, and when other
processes hold the cores its spinning worker threads make it far slower (428 ms p50 with 2 threads against 11 ms
with 1, measured on this machine). ``stair-search serve --encode-threads`` is the policy this measures.

    python benchmarks/encode_threads.py [--model stair-lite] [--threads 1 2] [--load 2] [--rounds 30]

``--load K`` starts K busy processes (pure Python loops) for the "under load" half. Prints p50/p95 ms of one
query and of a batch of 8 (what dynamic batching sends) for each thread count, and the ratio to 1 thread.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import numpy as np
import torch

from stair_search.encode import Encoder
from stair_search.models import DEFAULT_MODEL

QUERIES = ("dog", "red heart", "a cup of coffee on a table", "smiling face with sunglasses", "flag", "tabby cat",
           "a red car", "music")


def spin(stop) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def timings(encoder: Encoder, threads: list[int], rounds: int) -> dict[tuple[int, int], list[float]]:
    """{(threads, batch size): [seconds]}: the thread counts alternate round by round (same load for each)."""
    out: dict[tuple[int, int], list[float]] = {}
    for round_ in range(rounds):
        for n in threads:
            torch.set_num_threads(n)
            for size in (1, 8):
                texts = [QUERIES[(round_ + i) % len(QUERIES)] for i in range(size)]
                started = time.perf_counter()
                encoder.encode_texts(texts)
                out.setdefault((n, size), []).append(time.perf_counter() - started)
    return out


def report(title: str, results: dict[tuple[int, int], list[float]], threads: list[int]) -> None:
    print(f"\n{title}\n\n| threads | 1 query p50 ms | p95 | 8 queries p50 ms | p95 | 1-query p50 / 1 thread's |")
    print("|---|---|---|---|---|---|")
    base = np.median(results[(threads[0], 1)])
    for n in threads:
        one, eight = np.asarray(results[(n, 1)]) * 1000, np.asarray(results[(n, 8)]) * 1000
        print(f"| {n} | {np.median(one):.1f} | {np.percentile(one, 95):.1f} | {np.median(eight):.1f} | "
              f"{np.percentile(eight, 95):.1f} | {np.median(one) / 1000 / base:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--load", type=int, default=2, help="busy processes for the loaded half")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    encoder = Encoder(args.model)
    timings(encoder, args.threads, 3)  # warm-up
    report("quiet (nothing else started by this benchmark)", timings(encoder, args.threads, args.rounds),
           args.threads)
    stop = mp.Event()
    hogs = [mp.Process(target=spin, args=(stop,), daemon=True) for _ in range(args.load)]
    for hog in hogs:
        hog.start()
    try:
        time.sleep(0.5)
        report(f"under load ({args.load} busy processes)", timings(encoder, args.threads, args.rounds), args.threads)
    finally:
        stop.set()
        for hog in hogs:
            hog.join()


if __name__ == "__main__":
    main()
