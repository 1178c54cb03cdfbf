"""Serving on a Ray cluster (docs/cluster.md) against serving in one process, measured side by side in one run.

Runs itself in network and PID namespaces of its own with only loopback up (``unshare -n -p``; root), starts a
head and two worker nodes with ``ray.cluster_utils.Cluster`` and serves synthetic indexes of the default model's shapes
(``router_latency.build``: unit dense vectors, trained-like sparse vectors, local features) both ways:

- **overhead**: the same queries over HTTP to ``stair-search serve`` in this process (uvicorn) and to the cluster
  (Serve's proxy -> the ingress -> the shard replicas), interleaved query by query; p50 / p95 per mode (sparse,
  dense, hybrid) on the ``--docs`` index (one shard, as ``serve`` builds it). Target: cluster p50 <= in-process + 5 ms;
- **replicas**: throughput of ``--clients`` clients for ``--seconds`` with 1 and then 2 replicas per shard of a
  four-shard index;
- **fan-out**: hybrid p50 on ``--fanout-docs`` documents cut into 1, 4 and 16 shards;
- **bytes**: bytes per document of each part of a shard on disk (and so in RAM where it is held there), and of
  each FAISS kind, on the ``--docs`` index.

    sudo python benchmarks/cluster_latency.py [--docs 100000] [--fanout-docs 16000] [--queries 60] [--clients 8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

LOOPBACK = "127.0.0.1"
MODES = ("sparse", "dense", "hybrid")
QUERIES = ("dog", "red heart", "cat face", "flag", "cup of coffee", "smiling face", "car", "tree", "music", "fire")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--fanout-docs", type=int, default=16_000)
    parser.add_argument("--fanout", default="1,4,16", help="shard counts of the fan-out measurement (each shard is a "
                        "replica process: about 0.3 GB each, see docs/cluster.md)")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    if os.environ.get("STAIR_NETNS") != "1":  # again, inside a namespace that has loopback only
        # and a PID namespace: every Ray process ends with this one, however it ends
        os.execvp("unshare", ["unshare", "-n", "-p", "-f", "--mount-proc", "sh", "-c",
                              'ip link set lo up && STAIR_NETNS=1 exec "$0" "$@"',
                              sys.executable, *sys.argv])
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from router_latency import build

    from stair_search.encode import Encoder
    from stair_search.models import DEFAULT_MODEL
    from stair_search.paths import data_dir

    work = args.work_dir or data_dir() / "cluster-latency"
    encoder = Encoder(DEFAULT_MODEL)
    indexes = {"big": (args.docs, 100_000), "four": (args.docs, -(-args.docs // 4)),
               **{f"fan{n}": (args.fanout_docs, -(-args.fanout_docs // n)) for n in fanout(args)}}
    for name, (docs, shard_size) in indexes.items():
        folder = work / f"{name}-{docs}"
        if not (folder / "manifest.json").is_file():
            print(f"building {folder} ...", flush=True)
            build(folder, encoder, docs, batch=min(10_000, shard_size), shard_size=shard_size)
    dirs = {name: work / f"{name}-{docs}" for name, (docs, _) in indexes.items()}
    print(f"feature store's local features: {local_feature_bytes(dirs['big'], args.docs):.0f} bytes/doc (mmap)")
    print(json.dumps(bytes_per_document(dirs["big"], args.docs, encoder.model.embed_dim), indent=1), flush=True)
    del encoder
    cluster, ray = start_cluster()
    try:
        measure(args, dirs)
    finally:
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def start_cluster():
    import ray

    from server.cluster import loopback_cluster

    return loopback_cluster(workers=2), ray


def measure(args: argparse.Namespace, dirs: dict[str, Path]) -> None:
    import httpx
    import uvicorn

    from server.app import create_app
    from server.cluster import ClusterServer, ClusterSettings, serve_on_cluster
    from server.settings import ServerSettings

    settings = ServerSettings(reload_interval_s=0)
    local_app = create_app({"big": dirs["big"]}, settings)
    local = uvicorn.Server(uvicorn.Config(local_app, host=LOOPBACK, port=8601, log_level="warning"))
    threading.Thread(target=local.run, daemon=True).start()
    started = time.perf_counter()
    server = serve_on_cluster(dirs, settings, ClusterSettings(replicas=1), LOOPBACK, 8600)
    print(f"deployed {len(dirs)} indexes on the cluster in {time.perf_counter() - started:.0f} s", flush=True)
    with httpx.Client(base_url=f"http://{LOOPBACK}:8600", timeout=120) as cluster, \
            httpx.Client(base_url=f"http://{LOOPBACK}:8601", timeout=120) as process:
        wait_ready(process)
        overhead(cluster, process, args.queries)
        fan_out(cluster, args.queries, fanout(args))
        throughput(cluster, args, "four", 1)
        ClusterServer(dirs, settings, ClusterSettings(replicas=2)).deploy()  # the same applications, 2 copies
        throughput(cluster, args, "four", 2)
    local.should_exit = True
    server.undeploy()


def wait_ready(client) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except Exception:  # not listening yet
            pass
        time.sleep(0.5)
    raise RuntimeError("the in-process server did not become ready")


def timed(client, body: dict) -> float:
    started = time.perf_counter()
    response = client.post("/search", json=body)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"{body}: {response.status_code} {response.text[:300]}")
    return elapsed


def overhead(cluster, process, queries: int) -> None:
    print("\n| mode | in-process p50 / p95 ms | cluster p50 / p95 ms | p50 overhead ms |\n|---|---|---|---|")
    for mode in MODES:
        bodies = [{"query": QUERIES[i % len(QUERIES)], "mode": mode, "k": 10, "index": "big"} for i in range(queries)]
        for body in bodies[:3]:  # warm both
            timed(cluster, body), timed(process, body | {"index": None})
        ours, theirs = [], []
        for body in bodies:  # interleaved query by query
            theirs.append(timed(process, body | {"index": None}))
            ours.append(timed(cluster, body))
        a, b = np.percentile(theirs, [50, 95]), np.percentile(ours, [50, 95])
        print(f"| {mode} | {a[0]:.1f} / {a[1]:.1f} | {b[0]:.1f} / {b[1]:.1f} | {b[0] - a[0]:+.1f} |", flush=True)


def fanout(args: argparse.Namespace) -> list[int]:
    return [int(n) for n in args.fanout.split(",") if n.strip()]


def fan_out(cluster, queries: int, counts: list[int]) -> None:
    print("\n| shards | hybrid p50 / p95 ms (cluster) |\n|---|---|")
    for shards in counts:
        body = {"mode": "hybrid", "k": 10, "index": f"fan{shards}"}
        for query in QUERIES[:3]:
            timed(cluster, body | {"query": query})
        times = [timed(cluster, body | {"query": QUERIES[i % len(QUERIES)]}) for i in range(queries)]
        p50, p95 = np.percentile(times, [50, 95])
        print(f"| {shards} | {p50:.1f} / {p95:.1f} |", flush=True)


def throughput(cluster, args: argparse.Namespace, index: str, replicas: int) -> None:
    done: list[float] = []
    stop = time.monotonic() + args.seconds
    lock = threading.Lock()

    def client(n: int) -> None:
        i = n
        while time.monotonic() < stop and len(done) < 100_000:
            timed(cluster, {"query": QUERIES[i % len(QUERIES)], "mode": "hybrid", "k": 10, "index": index})
            i += args.clients
            with lock:
                done.append(time.monotonic())

    threads = [threading.Thread(target=client, args=(n,)) for n in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(f"\n{replicas} replica(s) per shard, {args.clients} clients, hybrid on '{index}': "
          f"{len(done) / args.seconds:.1f} queries/s", flush=True)


def local_feature_bytes(index_dir: Path, docs: int) -> float:
    """The feature store's memory-mapped local features and positions, per document."""
    return sum(f.stat().st_size for f in index_dir.glob("shards/*/features.local*.npy")) / docs


def bytes_per_document(index_dir: Path, docs: int, dim: int) -> dict[str, float]:
    """Bytes per document of each part of the index's shards, and of each FAISS kind over the same vectors."""
    from stair_search.index import DenseShard, DenseSpec, Manifest

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size

    parts: dict[str, int] = {}
    for shard in Manifest.load(index_dir).shards:
        folder = shard.path(index_dir)
        for name, path in (("lucene", folder / "sparse" / "lucene"), ("sparse accelerated",
                                                                       folder / "sparse" / "accelerated"),
                           ("sparse CSR", folder / "sparse"), ("dense (as built)", folder / "dense.faiss"),
                           ("feature store", folder / "features.arrow"), ("text route", folder / "text")):
            if path.exists():
                parts[name] = parts.get(name, 0) + size(path)
    parts["sparse CSR"] -= parts.get("lucene", 0) + parts.get("sparse accelerated", 0)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((docs, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    scratch = index_dir.parent / "faiss-kinds"
    scratch.mkdir(exist_ok=True)
    for kind in ("hnsw", "ivfpq"):
        DenseShard.build(vectors, DenseSpec(kind)).save(scratch / f"{kind}.faiss")
        parts[f"dense {kind}"] = (scratch / f"{kind}.faiss").stat().st_size
    shutil.rmtree(scratch, ignore_errors=True)
    return {name: round(total / docs, 1) for name, total in parts.items()}


if __name__ == "__main__":
    sys.exit(main())
