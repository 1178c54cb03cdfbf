"""Indexing embeddings computed elsewhere (indexer/embeddings.py): documents per second, split by step, peak memory,
and query latency on the index it built, in one run.

Why: the point of ``--embeddings`` is to index at the speed of matrix products and Lucene instead of decoding and
encoding images; this says how close the whole job comes (target >= 2,000 documents/s) and where the time goes:

- reading: the clip-retrieval folder walked into items (npy parts memory-mapped, metadata parquet, unit-normalise),
  measured as a pass of its own;
- concept vectors: the collection's calibration (a 10,000-embedding sample) and each batch's concept vectors;
- Lucene (impact index of the sparse vectors, and the captions' BM25 index), FAISS (HNSW or IVF-PQ), the feature
  store: timed inside the job's one writer;
- peak resident memory of the process (``ru_maxrss``), and query p50 for sparse / dense / hybrid text queries.

    python benchmarks/embeddings_indexing.py [--count 100000] [--dense hnsw ivfpq] [--work /tmp/emb-bench]

The embeddings are synthetic: 512-d, clustered around 2,000 random centres (so FAISS and the concept vectors see
structure), float16 parts of 50,000 rows like LAION's, with url, caption, key and similarity columns. The model is
an open_clip CLIP of 512-d with random weights saved locally (its text tower embeds the concept words once, cached
in the work folder; speed does not depend on the weights).

One run on this 2-core machine (7 December 2026, shared: the process got about a third of a core), 100,000
embeddings (1M did not fit the time), IVF-PQ, one shard: 1,114 s, 90 documents/s (target 2,000: not met);
calibration 24 s, concept vectors 492 s, seismic 314 s, FAISS 230 s, Lucene impact 18 s, BM25 11 s, feature
store 1 s, the rest 25 s; reading 3.2 s as a pass of its own; peak RSS 6.4 GiB (one 100k-document shard in
memory until written); query p50 sparse 114 / dense 65 / hybrid 143 ms. The HNSW job of that run was stopped for
time; at 20,000 embeddings HNSW took 149 s (134 documents/s). See docs/indexing.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

WORDS = ("dog", "cat", "beach", "mountain", "city", "car", "river", "forest", "bird", "flower", "house", "boat",
         "bridge", "snow", "sunset", "market", "train", "horse", "garden", "street")
PART_ROWS = 50_000
MODEL = {"name": "bench-clip-512",
         "clip": {"embed_dim": 512,
                  "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2}},
         "image_top_k": 64, "text_top_k": 24, "num_local": 4, "seed": 7}


def model_spec(work: Path) -> Path:
    """The 512-d open_clip CLIP's config, its weights in a local open_clip checkpoint file."""
    import open_clip
    import torch

    spec = work / "bench-clip-512.json"
    if not spec.is_file():
        torch.manual_seed(0)
        weights = work / "bench-clip-512.pt"
        torch.save({"state_dict": open_clip.CLIP(**MODEL["clip"]).state_dict()}, weights)
        spec.write_text(json.dumps({**MODEL, "pretrained": str(weights)}))
    return spec


def write_embeddings(folder: Path, count: int, seed: int = 0) -> Path:
    """``count`` clustered 512-d unit embeddings and their metadata in clip-retrieval's layout."""
    if (folder / "done").is_file():
        return folder
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(2000, 512)).astype(np.float32)
    (folder / "img_emb").mkdir(parents=True, exist_ok=True)
    (folder / "metadata").mkdir(exist_ok=True)
    for part, start in enumerate(range(0, count, PART_ROWS)):
        rows = min(PART_ROWS, count - start)
        which = rng.integers(0, len(centres), rows)
        vectors = centres[which] + 0.6 * rng.normal(size=(rows, 512)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        np.save(folder / "img_emb" / f"img_emb_{part}.npy", vectors.astype(np.float16))
        words = rng.integers(0, len(WORDS), (rows, 3))
        table = pa.table({"url": [f"https://example.org/{start + i}.jpg" for i in range(rows)],
                          "caption": [" ".join(WORDS[w] for w in row) for row in words],
                          "key": [f"{start + i:09d}" for i in range(rows)],
                          "similarity": rng.random(rows).astype(np.float32)})
        pq.write_table(table, folder / "metadata" / f"metadata_{part}.parquet")
    (folder / "done").write_text("")
    return folder


class Timers:
    """Wraps named functions in their modules and sums the seconds spent in each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, attribute: str, label: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started

        setattr(owner, attribute, timed)


def install_timers() -> Timers:
    from indexer import job
    from stair_search.index import writer
    from stair_search.index.dense import DenseShard
    from stair_search.models.concepts import ConceptBank

    timers = Timers()
    timers.wrap(job, "collection_bank", "calibration (10,000-embedding sample)")
    timers.wrap(ConceptBank, "image_vectors", "concept vectors")
    timers.wrap(writer, "write_sparse_shard", "Lucene impact (sparse)")
    timers.wrap(writer, "build_seismic", "seismic (sparse, optional)")
    timers.wrap(writer, "build_text_index", "Lucene BM25 (captions)")
    timers.wrap(DenseShard, "build", "FAISS build")
    timers.wrap(writer, "write_features", "feature store")
    return timers


def read_pass(folder: Path) -> float:
    from indexer.embeddings import open_source

    started = time.perf_counter()
    for _ in open_source(folder).items():
        pass
    return time.perf_counter() - started


def query_p50(out: Path, spec: Path, queries: int = 60) -> dict[str, float]:
    from stair_search.encode import Encoder
    from stair_search.index import IndexReader
    from stair_search.retrieve import QueryRouter, SearchRequest

    router = QueryRouter(IndexReader(out), Encoder(str(spec)))
    rng = np.random.default_rng(1)
    texts = [f"a {WORDS[a]} and a {WORDS[b]}" for a, b in rng.integers(0, len(WORDS), (queries, 2))]
    result = {}
    for mode in ("sparse", "dense", "hybrid"):
        router.search(SearchRequest(text=texts[0], mode=mode, k=10))  # warm
        times = []
        for text in texts:
            started = time.perf_counter()
            router.search(SearchRequest(text=text, mode=mode, k=10))
            times.append(time.perf_counter() - started)
        result[mode] = round(1000 * statistics.median(times), 1)
    return result


def run_job(folder: Path, out: Path, spec: Path, dense: str, count: int, timers: Timers) -> dict[str, Any]:
    import indexer
    from indexer import IndexJob

    timers.seconds.clear()
    started = time.perf_counter()
    summary = indexer.run(IndexJob(folder, out, model=str(spec), embeddings=True, batch_size=2048,
                                   dense=dense, overwrite=out.exists()), progress=False)
    seconds = time.perf_counter() - started
    timers.seconds["other (items, spool, journal, CSR, publish)"] = seconds - sum(timers.seconds.values())
    return {"dense": dense, "documents": summary.indexed, "seconds": round(seconds, 1),
            "documents_per_s": round(count / seconds), "steps_s": {k: round(v, 1) for k, v in timers.seconds.items()}}


def warm(spec: Path, work: Path) -> float:
    """The concept words' embeddings through the text tower, once (cached beside the data)."""
    from indexer.embeddings import concept_texts
    from stair_search.encode import Encoder

    started = time.perf_counter()
    concept_texts(Encoder(str(spec)))
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--dense", nargs="+", default=["hnsw", "ivfpq"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/emb-bench"))
    args = parser.parse_args(argv)
    import os

    args.work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("STAIR_DATA", str(args.work / "data"))
    spec = model_spec(args.work)
    folder = write_embeddings(args.work / f"emb-{args.count}", args.count)
    report: dict[str, Any] = {"count": args.count, "concept_words_once_s": round(warm(spec, args.work), 1),
                              "reading_s": round(read_pass(folder), 1)}
    report["reading_documents_per_s"] = round(args.count / report["reading_s"])
    timers = install_timers()
    report["jobs"] = []
    for dense in args.dense:
        out = args.work / f"index-{args.count}-{dense}"
        report["jobs"].append(run_job(folder, out, spec, dense, args.count, timers))
        report["jobs"][-1]["query_p50_ms"] = query_p50(out, spec)
        print(json.dumps(report["jobs"][-1]), flush=True)  # each job's figures as soon as they are known
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
