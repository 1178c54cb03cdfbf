"""Inference-free sparse queries against the text tower's weights: quality and speed, side by side in one run.

On the emoji test split (Google + Twitter in one index, concepts never seen in training) indexed with the
default model, the sparse route alone, hybrid (RRF) and auto are searched with each query's word-pieces
weighted by the text tower (``query_weights="model"``) and by the index's idf (``"idf"``, query/weights.py:
the tower then computes the dense embedding only, and none for the sparse route alone).
Quality: label R@1 and MRR@10, tag nDCG@10 and R@10, through the project's own evaluation. Speed: end-to-end
``router.search(mode="sparse")`` per query, the two routers interleaved query by query.

    python benchmarks/query_weights.py [--model stair-lite] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from load_test import emoji_index

from stair_search.cli.demo import open_dataset
from stair_search.encode import Encoder
from stair_search.eval.runner import evaluate_router
from stair_search.index import IndexReader
from stair_search.models import DEFAULT_MODEL
from stair_search.paths import data_dir
from stair_search.retrieve import QueryRouter, SearchRequest

ROUTES = ["sparse", "hybrid-rrf", "auto"]  # the evaluation's routes whose sparse part the weights change
WEIGHTS = ("model", "idf")  # the router's default ("auto") is idf for a grounded model such as stair-lite


def latencies(routers: dict[str, QueryRouter], texts: list[str], rounds: int = 2) -> dict[str, np.ndarray]:
    """ms per sparse-route search, the routers taking turns on each query (the same load for both)."""
    out: dict[str, list[float]] = {name: [] for name in routers}
    for _ in range(rounds):
        for text in texts:
            for name, router in routers.items():
                started = time.perf_counter()
                router.search(SearchRequest(text=text, mode="sparse", k=10))
                out[name].append((time.perf_counter() - started) * 1000)
    return {name: np.asarray(values) for name, values in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--work-dir", type=Path, default=data_dir() / "load-test")
    args = parser.parse_args()
    index_dir, _ = emoji_index(args.work_dir, args.model)
    dataset = open_dataset()
    encoder, index = Encoder(args.model), IndexReader(index_dir)
    routers = {name: QueryRouter(index, encoder, query_weights=name) for name in WEIGHTS}
    print(f"\n{index_dir.name}: sparse route, query weights from the text tower ('model') or the index's idf "
          f"('idf', no tower)\n")
    print("| route | queries | metric (%) | model | idf | idf - model |\n|---|---|---|---|---|---|")
    for kind, metrics in (("label", ("R@1", "MRR@10")), ("tag", ("nDCG@10", "R@10"))):
        queries, qrels = dataset.queries("test", kind), dataset.qrels("test", kind, "all")
        reports = {name: evaluate_router(router, queries, qrels, modes=ROUTES).rows
                   for name, router in routers.items()}
        for position, route in enumerate(ROUTES):
            for metric in metrics:
                model, idf = (100 * reports[name][position].metrics[metric] for name in WEIGHTS)  # in %
                print(f"| {route} | {kind} ({len(queries)}) | {metric} | {model:.1f} | {idf:.1f} | "
                      f"{idf - model:+.1f} |")
    texts = sorted(set(dataset.queries("test", "label").values()))[:200]
    latencies(routers, texts[:10], rounds=1)  # warm-up: JVM, page cache, idf table
    timed = latencies(routers, texts)
    p50 = {name: float(np.median(values)) for name, values in timed.items()}
    print("\n| query weights | sparse-route search p50 ms | p95 ms |\n|---|---|---|")
    for name, values in timed.items():
        print(f"| {name} | {p50[name]:.2f} | {np.percentile(values, 95):.2f} |")
    print(f"\nidf / model p50: {p50['idf'] / p50['model']:.2f} ({len(texts)} label queries x 2, interleaved)")


if __name__ == "__main__":
    main()
