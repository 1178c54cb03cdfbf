"""End-to-end query latency through ``router.search`` on a 100k-document index, every route interleaved per query.

The index is written by the project's one writer (``IndexWriter.add_quantised``) from synthetic documents with
the default model's shapes: dense unit vectors of its width, trained-like sparse vectors (64 Zipf-distributed
whole-word tokens, log-normal weights: ``search_latency.zipf_csr``) and its number of local features. Queries
are real text (the emoji test split's labels) encoded by the real model. Per query, in turn:

- ``encode``: the dense query encode alone (``encoder.embed_texts``): the reference of the hybrid target;
  ``encode + sparse head``: the tower with its sparse head (what ``query_weights="model"`` runs);
- ``sparse (model)`` / ``sparse (idf)``: the sparse route, query weights from the text tower or inference-free;
- ``dense`` and ``hybrid``: full searches (RRF), hits' stored fields read (k = 10), with the default query
  weights (idf for this grounded model: the tower embeds, the sparse route runs meanwhile);
  ``hybrid (model)``: hybrid with the tower's weights;
- ``hybrid + feedback 3``: hybrid with pseudo-relevance feedback (the dense route run again from the top 3);
- ``hybrid + <reranker>``: the same with one reranker over the top 100 (its added time: the difference).

    python benchmarks/router_latency.py [--docs 100000] [--queries 200] [--torch-threads 1] [--work-dir DIR]

Targets (issue 18): sparse route p50 <= 3 ms; hybrid p50 <= 1.2x the dense encode alone; a reranker adds
<= 3 ms over the top 100. The index is built
once into ``--work-dir`` and reused.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from search_latency import zipf_csr

from stair_search.encode import Encoder
from stair_search.index import FeatureRecord, IndexReader, IndexWriter
from stair_search.models import DEFAULT_MODEL
from stair_search.paths import data_dir
from stair_search.rerank import RERANKERS
from stair_search.retrieve import QueryRouter, SearchRequest

QUERIES = ("dog", "red heart", "cat face", "flag", "cup of coffee", "smiling face", "car", "tree", "music", "fire")


def build(index_dir: Path, encoder: Encoder, docs: int, batch: int = 10_000, seed: int = 0,
          shard_size: int = 100_000) -> None:
    """``docs`` synthetic documents (the default shard size: one shard of 100k)."""
    rng = np.random.default_rng(seed)
    config = encoder.model.config
    dim, local = encoder.model.embed_dim, config.num_local
    with IndexWriter(index_dir, encoder.record, shard_size=shard_size) as writer:
        for start in range(0, docs, batch):
            count = min(batch, docs - start)
            dense = rng.standard_normal((count, dim)).astype(np.float32)
            dense /= np.linalg.norm(dense, axis=1, keepdims=True)
            csr = zipf_csr(rng, encoder.model.vocabulary, count, 64, writer.manifest.scale)
            features = rng.standard_normal((count, local, dim)).astype(np.float16)
            positions = rng.random((count, local, 2)).astype(np.float16)
            records = [FeatureRecord(id=f"doc-{start + i:07d}", source=f"/photos/{start + i:07d}.jpg", width=640,
                                     height=480, caption=f"synthetic document {start + i}",
                                     local=features[i], local_positions=positions[i]) for i in range(count)]
            writer.add_quantised(records, dense, csr)
        writer.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--work-dir", type=Path, default=data_dir() / "router-latency")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads for the query encodes (1: "
                        "what `serve --encode-threads` defaults to)")
    args = parser.parse_args()
    encoder = Encoder(args.model)
    index_dir = args.work_dir / f"{args.model}-{args.docs}"
    if not (index_dir / "manifest.json").is_file():
        print(f"building {index_dir} ...", flush=True)
        started = time.perf_counter()
        build(index_dir, encoder, args.docs)
        print(f"built in {time.perf_counter() - started:.0f} s", flush=True)
    torch.set_num_threads(args.torch_threads)
    index = IndexReader(index_dir)
    model, free = QueryRouter(index, encoder, query_weights="model"), QueryRouter(index, encoder, query_weights="idf")
    runs = {
        "encode": lambda q: encoder.embed_texts([q]),
        "encode + sparse head": lambda q: encoder.encode_texts([q]),
        "sparse (model)": lambda q: model.search(SearchRequest(text=q, mode="sparse", k=10)),
        "sparse (idf)": lambda q: free.search(SearchRequest(text=q, mode="sparse", k=10)),
        "dense": lambda q: free.search(SearchRequest(text=q, mode="dense", k=10)),
        "hybrid": lambda q: free.search(SearchRequest(text=q, mode="hybrid", k=10)),
        "hybrid (model)": lambda q: model.search(SearchRequest(text=q, mode="hybrid", k=10)),
        "hybrid + feedback 3": lambda q: free.search(SearchRequest(text=q, mode="hybrid", k=10, feedback=3)),
        **{f"hybrid + {name}": (lambda q, name=name: free.search(SearchRequest(text=q, mode="hybrid", k=10,
                                                                               rerank=[name])))
           for name in RERANKERS},
    }
    texts = [QUERIES[i % len(QUERIES)] + ("" if i < len(QUERIES) else f" {i}") for i in range(args.queries)]
    for text in texts[:10]:  # warm-up: JVM, FAISS, page cache, idf table
        for run in runs.values():
            run(text)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for text in texts:
        for name, run in runs.items():
            started = time.perf_counter()
            run(text)
            times[name].append((time.perf_counter() - started) * 1000)
    p50 = {name: float(np.median(values)) for name, values in times.items()}
    shards = len(list(index_dir.glob("shards/*")))
    print(f"\n{index_dir.name}: {shards} shards, {args.queries} queries, each route in turn per query\n")
    print("| route | p50 ms | p95 ms |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {p50[name]:.2f} | {np.percentile(values, 95):.2f} |")
    print(f"\nsparse route p50 (idf): {p50['sparse (idf)']:.2f} ms (target <= 3); (model): "
          f"{p50['sparse (model)']:.2f} ms")
    print(f"hybrid p50 / dense encode alone: {p50['hybrid'] / p50['encode']:.2f} (target <= 1.2)")
    added = {name: p50[f"hybrid + {name}"] - p50["hybrid"] for name in RERANKERS}
    print("reranker added p50 ms over the top 100 (target <= 3): "
          + ", ".join(f"{name} {ms:+.2f}" for name, ms in added.items()))


if __name__ == "__main__":
    main()
