"""Indexing embeddings computed elsewhere (indexer/embeddings.py): documents per second, split by step, peak memory,
and query latency on the index it built, in one run.

Why: the point of ``--embeddings`` is to index at the speed of matrix products and Lucene instead of decoding and
encoding images; this says how close the whole job comes (target >= 2,000 documents/s) and where the time goes:

- reading: the clip-retrieval folder walked into items (npy parts memory-mapped, metadata parquet read a block at
  a time, unit-normalise), measured as a pass of its own;
- concept vectors: the collection's calibration (a 10,000-embedding sample) and each batch's concept vectors;
- Lucene (impact index of the sparse vectors, and the captions' BM25 index), FAISS (HNSW or IVF-PQ), the feature
  store: timed inside the job's one writer;
- peak resident memory of the process (``ru_maxrss``), and query p50 for sparse / dense / hybrid text queries.

    python benchmarks/embeddings_indexing.py [--count 100000] [--dense hnsw ivfpq] [--shard-size N] [--work DIR]

The embeddings are synthetic: 512-d, clustered around 2,000 random centres (so FAISS and the concept vectors see
structure), float16 parts of 50,000 rows like LAION's, with url, caption, key and similarity columns. The model is
an open_clip CLIP of 512-d with random weights saved locally (its text tower embeds the concept words once, cached
in the work folder; speed does not depend on the weights).

Runs on this 2-core machine (7 December 2026, shared with other jobs: the 1-minute load average is printed at the
start and the end of each job, and CPU seconds beside wall seconds), one shard:
1,000,000 embeddings, IVF-PQ (load 3.3 -> 5.7): 1,434 s, 697 documents/s (target 2,000: not met), 1.28 ms of CPU
per document; wall (CPU) s: calibration 4.6 (4.7), concept vectors 511 (450), seismic 586 (599), FAISS 212 (117),
Lucene impact 41 (44), BM25 26 (20), feature store 5.8 (5.0), the rest 47 (36); reading 11.6 s as a pass of its
own; peak RSS 13.9 GiB (one 1M-document shard); query p50 sparse 96.7 / dense 52.1 / hybrid 29.4 ms (text
encode 6.2). 100,000 embeddings (load 11.6 -> 6.9): IVF-PQ 341 s, 294 documents/s, 1.93 ms CPU per document
(before this version: 1,114 s, 90 documents/s); HNSW 1,037 s, 96 documents/s (its build 267 s of CPU); peak RSS
3.4 GiB. Seismic is the largest cost now (0.6 ms CPU per document). See docs/indexing.md.
"""

from __future__ import annotations

import argparse
import json
import os
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
    """Wraps named functions in their modules and sums the wall seconds and the process's CPU seconds (all its
    threads: BLAS, FAISS, the JVM) spent in each; on a shared machine the CPU time is the steadier figure."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    def wrap(self, owner: Any, attribute: str, label: str) -> None:
        inner = getattr(owner, attribute)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started, cpu = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - started
                self.cpu[label] += time.process_time() - cpu

        setattr(owner, attribute, timed)

    def clear(self) -> None:
        self.seconds.clear()
        self.cpu.clear()


def install_timers() -> Timers:
    from indexer import job
    from stair_search.index import writer
    from stair_search.index.dense import DenseShard
    from stair_search.models.concepts import ConceptBank

    timers = Timers()
    timers.wrap(job, "index_bank", "calibration (10,000-embedding sample)")
    timers.wrap(ConceptBank, "image_csr", "concept vectors")
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

    encoder = Encoder(str(spec))
    router = QueryRouter(IndexReader(out), encoder)
    rng = np.random.default_rng(1)
    texts = [f"a {WORDS[a]} and a {WORDS[b]}" for a, b in rng.integers(0, len(WORDS), (queries, 2))]
    encoder.encode_texts(texts[:1])
    times = []
    for text in texts:  # what every mode's p50 includes: the query's text encode (torch, for this model)
        started = time.perf_counter()
        encoder.encode_texts([text])
        times.append(time.perf_counter() - started)
    result = {"text_encode": round(1000 * statistics.median(times), 1)}
    for mode in ("sparse", "dense", "hybrid"):
        router.search(SearchRequest(text=texts[0], mode=mode, k=10))  # warm
        times = []
        for text in texts:
            started = time.perf_counter()
            router.search(SearchRequest(text=text, mode=mode, k=10))
            times.append(time.perf_counter() - started)
        result[mode] = round(1000 * statistics.median(times), 1)
    return result


def run_job(folder: Path, out: Path, spec: Path, dense: str, count: int, shard_size: int,
            timers: Timers) -> dict[str, Any]:
    import indexer
    from indexer import IndexJob

    timers.clear()
    load = os.getloadavg()[0]
    started, cpu = time.perf_counter(), time.process_time()
    summary = indexer.run(IndexJob(folder, out, model=str(spec), embeddings=True, batch_size=2048,
                                   shard_size=shard_size, dense=dense, overwrite=out.exists()), progress=False)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    other = "other (items, spool, journal, publish)"
    timers.seconds[other] = seconds - sum(timers.seconds.values())
    timers.cpu[other] = cpu - sum(timers.cpu.values())
    return {"dense": dense, "documents": summary.indexed, "shards": len(summary.manifest.shards),
            "seconds": round(seconds, 1), "documents_per_s": round(count / seconds),
            "cpu_s": round(cpu, 1), "cpu_ms_per_document": round(1000 * cpu / count, 3),
            "load_average_1min": [round(load, 2), round(os.getloadavg()[0], 2)],  # at the start and the end
            "steps_s": {k: round(v, 1) for k, v in timers.seconds.items()},
            "steps_cpu_s": {k: round(v, 1) for k, v in timers.cpu.items()}}


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
    parser.add_argument("--shard-size", type=int, default=None, help="documents per shard (default: all in one)")
    args = parser.parse_args(argv)
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
        report["jobs"].append(run_job(folder, out, spec, dense, args.count, args.shard_size or args.count, timers))
        report["jobs"][-1]["query_p50_ms"] = query_p50(out, spec)
        print(json.dumps(report["jobs"][-1]), flush=True)  # each job's figures as soon as they are known
    report["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    report["cores"] = os.cpu_count()
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
