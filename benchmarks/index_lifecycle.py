"""An index that lives: query latency after many small appends, after the merge policy, after ``compact`` and when
built at once; a deleted-heavy index before and after compaction; compaction's throughput and peak memory.

Why: every append used to add a shard and nothing merged them, and every deleted row made every query deeper
(issue 37). This measures what the merge policy, compaction and the bounded fetch depth give back, side by side
in one run, on synthetic documents (random unit dense vectors of ``--dim``; sparse vectors of ``--tokens``
word-pieces drawn from a Zipf-like pool of the real vocabulary; no text route, no model: the first stage alone).

1. Four indexes of the same ``--appends`` x ``--per-append`` documents: appended with the policy off, appended
   with it on (the default), the first one compacted, and built at once; and the policy's index after one more
   append (``policy+1``: its worst case, a small shard beside a full one, with ``--per-append`` more documents).
   Each answers the same ``--queries`` queries (a stored document's 12 strongest word-pieces, and its dense vector
   plus noise), k=10, through ``IndexReader.search``, the indexes interleaved query by query: p50/p95 per route
   (sparse, dense, hybrid = both routes at once) and the ratio to the built-at-once index. The appends' total
   time with the policy and without it (what the policy's merges cost the writes).
2. ``--large`` documents (one shard), ``--deleted`` of them deleted (the policy off, so they stay): p50 and bytes
   on disk before and after ``compact`` (a copy compacted, both measured interleaved), the dense index kind each
   holds (``choose_spec``: HNSW from 100,000 rows, flat below) and what opening each costs (``warm``: a shard with
   deleted rows copies its flat dense index without them); compaction's documents per second and peak memory
   (its own process, ``ru_maxrss``: the JVM that builds the Lucene indexes included).

Run it with ``OMP_NUM_THREADS=1`` on a shared machine (FAISS's OpenMP threads spin otherwise).

    python benchmarks/index_lifecycle.py [--appends 100] [--per-append 20] [--large 20000] [--deleted 0.3]
    python benchmarks/index_lifecycle.py --skip-lifecycle --large 100000   # part 2 alone
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from stair_search.index import FeatureRecord, IndexReader, IndexWriter, ModelRecord, ShardQuery, delete_documents
from stair_search.index.compact import MergePolicy, compact, set_merge_policy
from stair_search.index.sparse import DEFAULT_SCALE, to_csr
from stair_search.vocabulary import DEFAULT_VOCABULARY, Vocabulary

K = 10
QUERY_TOKENS = 12  # a sparse query: a stored document's strongest word-pieces (a text query's length: Seismic's)


def model(dim: int) -> ModelRecord:
    vocabulary = Vocabulary.load(DEFAULT_VOCABULARY)
    return ModelRecord(name="synthetic", spec="synthetic", pretrained=None, fingerprint="0" * 64,
                       vocabulary_location=DEFAULT_VOCABULARY, vocabulary=vocabulary, embed_dim=dim, num_local=0,
                       sparse_source="heads")


def documents(record: ModelRecord, start: int, count: int, tokens: int, seed: int) -> tuple[list, np.ndarray, Any]:
    """Documents ``start`` .. ``start + count``: the same ones whatever the batches they are made in."""
    rng = np.random.default_rng(seed + start)
    dense = rng.standard_normal((count, record.embed_dim)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    pool = 2000 + np.arange(3000)
    weights = 1.0 / np.arange(1, len(pool) + 1)
    weights /= weights.sum()
    names = record.vocabulary.tokens
    sparse = [{names[t]: float(rng.uniform(0.1, 2.5)) for t in rng.choice(pool, tokens, replace=False, p=weights)}
              for _ in range(count)]
    records = [FeatureRecord(id=f"doc{start + i}", source=f"synthetic://{start + i}", width=1, height=1)
               for i in range(count)]
    return records, dense, to_csr(sparse, record.vocabulary, DEFAULT_SCALE)


def add(out: Path, record: ModelRecord, start: int, count: int, args: argparse.Namespace, merge: bool,
        shard_size: int = 100_000) -> None:
    with IndexWriter(out, record, append=True, text_fields=None, merge=merge, shard_size=shard_size) as writer:
        for first in range(start, start + count, 5000):
            writer.add_quantised(*documents(record, first, min(5000, start + count - first), args.tokens, args.seed))
        writer.commit()


def queries(out: Path, count: int, seed: int) -> list[ShardQuery]:
    rng = np.random.default_rng(seed)
    with IndexReader(out) as index:
        picked = [c for batch in index.live() for c in batch]
        chosen = [picked[i] for i in rng.choice(len(picked), count, replace=count > len(picked))]
        sparse, dense = index.sparse_vectors(chosen), index.vectors(chosen)
    noisy = dense + 0.05 * rng.standard_normal(dense.shape).astype(np.float32)
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    short = [dict(sorted(s.items(), key=lambda item: -item[1])[:QUERY_TOKENS]) for s in sparse]
    return [ShardQuery(K, sparse=s, dense=d) for s, d in zip(short, noisy, strict=True)]


ROUTES = {"sparse": lambda q: ShardQuery(K, sparse=q.sparse), "dense": lambda q: ShardQuery(K, dense=q.dense),
          "hybrid": lambda q: q}


def latencies(paths: dict[str, Path], asked: list[ShardQuery]) -> dict[str, dict[str, Any]]:
    """p50 / p95 in ms per index and route, the indexes interleaved query by query, in a new random order each
    time, so that whatever else the machine does weighs on each alike (a rotating order kept one index always
    right after the 100-shard one, whose query leaves the caches cold: 1.3-1.4x for one shard of the same
    documents as the built-at-once index, in CPU time too); after one warm-up pass. ``cpu``: the p50 of the
    process's CPU time per query (``OMP_NUM_THREADS=1``: one thread searches), which the other processes of a
    shared machine change less than the wall time. ``warm_s``: opening every part of the index
    (``IndexReader.warm``)."""
    readers = {name: IndexReader(path) for name, path in paths.items()}
    times: dict[str, dict[str, list[float]]] = {name: {route: [] for route in ROUTES} for name in paths}
    cpu: dict[str, dict[str, list[float]]] = {name: {route: [] for route in ROUTES} for name in paths}
    warm: dict[str, float] = {}
    names, shuffle = list(paths), np.random.default_rng(0).permutation
    try:
        for name, reader in readers.items():
            started = time.perf_counter()
            reader.warm()
            warm[name] = round(time.perf_counter() - started, 3)
            for query in asked[:20]:
                for make in ROUTES.values():
                    reader.search(make(query))
        for query in asked:
            for route, make in ROUTES.items():
                for name in (names[i] for i in shuffle(len(names))):
                    started, used = time.perf_counter(), time.process_time()
                    readers[name].search(make(query))
                    times[name][route].append((time.perf_counter() - started) * 1000)
                    cpu[name][route].append((time.process_time() - used) * 1000)
    finally:
        for reader in readers.values():
            reader.close()
    return {name: {"warm_s": warm[name], "cpu": {route: float(np.percentile(t, 50)) for route, t in cpu[name].items()},
                   **{route: (float(np.percentile(t, 50)), float(np.percentile(t, 95))) for route, t in found.items()}}
            for name, found in times.items()}


def disk_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.rglob("*") if p.is_file())


def shards_of(out: Path) -> int:
    with IndexReader(out) as index:
        return index.shard_count


def dense_kinds(out: Path) -> list[str]:
    return [shard["dense"]["kind"] for shard in json.loads((out / "manifest.json").read_text())["shards"]]


def lifecycle(root: Path, record: ModelRecord, args: argparse.Namespace) -> dict[str, Any]:
    """Part 1: four indexes of the same documents, and the policy's after one more append."""
    total = args.appends * args.per_append
    folders = {name: root / name for name in ("appended", "policy", "policy+1", "compacted", "at_once")}
    started = time.perf_counter()
    for n in range(args.appends):
        add(folders["appended"], record, n * args.per_append, args.per_append, args, merge=False)
    append_s = time.perf_counter() - started
    started = time.perf_counter()
    for n in range(args.appends):
        add(folders["policy"], record, n * args.per_append, args.per_append, args, merge=True)
    policy_s = time.perf_counter() - started
    shutil.copytree(folders["policy"], folders["policy+1"])
    add(folders["policy+1"], record, total, args.per_append, args, merge=True)
    shutil.copytree(folders["appended"], folders["compacted"])
    compact(folders["compacted"])
    add(folders["at_once"], record, 0, total, args, merge=False)
    asked = queries(folders["at_once"], args.queries, args.seed)
    measured = latencies(folders, asked)
    rows = {name: {"shards": shards_of(path), **measured[name]} for name, path in folders.items()}
    return {"documents": total, "append_s": round(append_s, 1), "append_with_policy_s": round(policy_s, 1),
            "rows": rows}


COMPACT_CHILD = r'''
import json, resource, sys, time
from stair_search.index.compact import compact
started = time.perf_counter()
result = compact(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - started, "documents": result.documents,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def deleted_heavy(root: Path, record: ModelRecord, args: argparse.Namespace) -> dict[str, Any]:
    """Part 2: one large shard with ``--deleted`` of it deleted, before and after compaction."""
    out = root / "large"
    add(out, record, 0, args.large, args, merge=False, shard_size=args.large)
    set_merge_policy(out, MergePolicy(enabled=False))
    asked = queries(out, args.queries, args.seed + 1)
    rng = np.random.default_rng(args.seed)
    doomed = [f"doc{i}" for i in rng.choice(args.large, int(args.large * args.deleted), replace=False)]
    delete_documents(out, doomed)
    compacted = root / "large_compacted"
    shutil.copytree(out, compacted)
    print(f"part 2: {args.large} documents built, {len(doomed)} deleted; compacting", file=sys.stderr, flush=True)
    child = subprocess.run([sys.executable, "-c", COMPACT_CHILD, str(compacted)], check=True, capture_output=True,
                           text=True)
    run = json.loads(child.stdout.strip().splitlines()[-1])
    listed = {shard["name"] for shard in json.loads((compacted / "manifest.json").read_text())["shards"]}
    for leftover in compacted.glob("shards/*"):  # the replaced shard stays 120 s for readers: not the index's size
        if leftover.name not in listed:
            shutil.rmtree(leftover)
    measured = latencies({"before": out, "after": compacted}, asked)
    before = {"bytes": disk_bytes(out), "dense_kind": dense_kinds(out), **measured["before"]}
    after = {"bytes": disk_bytes(compacted), "dense_kind": dense_kinds(compacted), **measured["after"]}
    return {"documents": args.large, "deleted": len(doomed), "before": before, "after": after,
            "compaction_docs_per_s": round(run["documents"] / run["seconds"], 1),
            "compaction_s": round(run["seconds"], 1), "compaction_peak_rss_mib": round(run["peak_rss_mib"], 1)}


def report(results: dict[str, Any]) -> None:
    print(f"\n{args_line(results)}")
    if "lifecycle" in results:
        report_lifecycle(results["lifecycle"])
    report_deleted(results["deleted_heavy"])


def report_lifecycle(part: dict[str, Any]) -> None:
    base = part["rows"]["at_once"]
    print(f"\n{part['documents']} documents:")
    print(f"{'index':<11}{'shards':>7}" + "".join(f"{r + ' p50/p95 ms':>24}{'x':>6}" for r in ("sparse", "dense",
                                                                                                  "hybrid")))
    for name, row in part["rows"].items():
        cells = "".join(f"{row[r][0]:>11.2f} / {row[r][1]:>8.2f}{row[r][0] / base[r][0]:>8.2f}"
                        for r in ("sparse", "dense", "hybrid"))
        print(f"{name:<11}{row['shards']:>7}{cells}")
    print("CPU time p50 ms (x the built-at-once index): " + "; ".join(
        f"{name} " + " ".join(f"{row['cpu'][r]:.2f} ({row['cpu'][r] / base['cpu'][r]:.2f})"
                              for r in ("sparse", "dense", "hybrid")) for name, row in part["rows"].items()))
    print(f"appends: {part['append_s']} s without the policy, {part['append_with_policy_s']} s with it")


def report_deleted(heavy: dict[str, Any]) -> None:
    print(f"\n{heavy['documents']} documents, {heavy['deleted']} deleted, one shard:")
    for name in ("before", "after"):
        row = heavy[name]
        routes = "  ".join(f"{r} {row[r][0]:.2f}/{row[r][1]:.2f} ms" for r in ("sparse", "dense", "hybrid"))
        print(f"  {name:<7} {row['bytes'] / 2**20:8.1f} MiB  dense {'/'.join(row['dense_kind'])}  "
              f"warm {row['warm_s']} s  {routes}")
    ratio = {r: heavy["before"][r][0] / heavy["after"][r][0] for r in ("sparse", "dense", "hybrid")}
    print(f"  p50 before / after: {json.dumps({r: round(v, 2) for r, v in ratio.items()})}")
    cpu = {r: heavy["before"]["cpu"][r] / heavy["after"]["cpu"][r] for r in ("sparse", "dense", "hybrid")}
    print(f"  CPU time p50 before / after: {json.dumps({r: round(v, 2) for r, v in cpu.items()})} (ms before: "
          f"{json.dumps({r: round(v, 2) for r, v in heavy['before']['cpu'].items()})})")
    print(f"  compaction: {heavy['compaction_docs_per_s']} documents/s ({heavy['compaction_s']} s), "
          f"peak RSS {heavy['compaction_peak_rss_mib']} MiB")


def args_line(results: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in results["settings"].items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=100)
    parser.add_argument("--per-append", type=int, default=20)
    parser.add_argument("--large", type=int, default=20_000)
    parser.add_argument("--deleted", type=float, default=0.3)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-lifecycle", action="store_true", help="part 2 alone")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    record = model(args.dim)
    with tempfile.TemporaryDirectory(prefix="lifecycle-") as tmp:
        results: dict[str, Any] = {"settings": {k: v for k, v in vars(args).items() if k != "json"}}
        if not args.skip_lifecycle:
            results["lifecycle"] = lifecycle(Path(tmp), record, args)
        results["deleted_heavy"] = deleted_heavy(Path(tmp), record, args)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(f"\nthis process's peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
