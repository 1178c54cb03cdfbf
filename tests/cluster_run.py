"""The cluster scenarios of tests/test_cluster.py, run in a network namespace of their own with only loopback up.

``python tests/cluster_run.py SPEC.json``: starts a Ray cluster of its own (a head and three worker nodes, each a
separate raylet, all on 127.0.0.1) with ``ray.cluster_utils.Cluster`` (what ``ray start --head`` and ``ray start
--address`` do on real machines), serves the spec's index on it with ``stair-search serve INDEX --cluster ADDRESS
--replicas 2`` as docs/cluster.md says, and writes what it saw to the spec's ``out`` file as JSON: every answer of
the cluster beside the in-process answer to the same request, what replicas hold, a worker node killed and a
replica process killed under load, a shard with no replica left, an append and a delete published under load, and
the Ray indexing runner on the multi-node cluster. Every load loop is bounded in count
and time. It never joins a cluster it did not start: the namespace has no other network, and the cluster is its
own.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["RAY_DISABLE_FAILURE_SIGNAL_HANDLER"] = "1"

LOOPBACK = "127.0.0.1"
LOAD_THREADS = 4
LOAD_MAX_REQUESTS = 400  # per scenario, over all threads
LOAD_MAX_S = 90.0
UPDATE_MAX_REQUESTS = 6000  # the update scenario searches until the new version has answered
UPDATE_MAX_S = 240.0


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    report: dict[str, Any] = {}
    started = time.monotonic()
    cluster, ray = start_cluster()
    report["step_s"] = {"cluster": round(time.monotonic() - started, 1)}  # where a slow run spends its time
    try:
        run_scenarios(spec, cluster, report)
    finally:
        report["seconds"] = round(time.monotonic() - started, 1)
        Path(spec["out"]).write_text(json.dumps(report, indent=1, default=str))
        from ray import serve

        serve.shutdown()
        ray.shutdown()
        cluster.shutdown()


def start_cluster():
    import ray

    from server.cluster import loopback_cluster

    return loopback_cluster(workers=3), ray


def run_scenarios(spec: dict[str, Any], cluster: Any, report: dict[str, Any]) -> None:
    import httpx
    from fastapi.testclient import TestClient

    from server.app import create_app
    from server.settings import ServerSettings

    index, port = spec["index"], spec["port"]
    driver = start_driver(spec, cluster.address)
    try:
        with httpx.Client(base_url=f"http://{LOOPBACK}:{port}", timeout=60) as remote, \
                TestClient(create_app({"shapes": index}, ServerSettings(reload_interval_s=0))) as local:
            steps = {
                "deployed": lambda: wait_for(lambda: ready(remote), 300),
                "equality": lambda: compare(remote, local, spec["bodies"], spec["batch"]),
                "pages": lambda: {path: [remote.get(path).status_code, local.get(path).status_code]
                                  for path in ("/", "/info", "/metrics", "/readyz", "/healthz")},
                "info": lambda: [without_times(remote.get("/info").json()), without_times(local.get("/info").json())],
                "replicas": replica_status,
                "node_kill": lambda: kill_a_worker_under_load(remote, cluster, spec["load_body"]),
                "replica_kill": lambda: kill_a_replica_under_load(remote, spec["load_body"]),
                "shard_gone": lambda: shard_gone(remote, index, spec["load_body"]),
                "update": lambda: update_under_load(remote, spec),
            }
            for name, step in steps.items():
                begun = time.monotonic()
                report[name] = step()
                report["step_s"][name] = round(time.monotonic() - begun, 1)
                Path(spec["out"]).write_text(json.dumps(report, indent=1, default=str))  # what ran so far
    finally:
        driver.send_signal(signal.SIGINT)
        try:
            report["driver"] = driver.communicate(timeout=60)[0][-3000:]
        except subprocess.TimeoutExpired:
            driver.kill()
    begun = time.monotonic()
    report["ray_indexing"] = ray_indexing(spec, cluster)
    report["step_s"]["ray_indexing"] = round(time.monotonic() - begun, 1)


def start_driver(spec: dict[str, Any], address: str) -> subprocess.Popen:
    """``stair-search serve INDEX --cluster ADDRESS --replicas 2``, as docs/cluster.md runs it."""
    command = [sys.executable, "-m", "stair_search.cli", "serve", f"shapes={spec['index']}", "--cluster", address,
               "--replicas", "2", "--host", LOOPBACK, "--port", str(spec["port"]), "--shard-timeout", "4",
               "--reload-interval", "0.5"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def ready(remote: Any) -> bool:
    try:
        return remote.get("/readyz").status_code == 200
    except Exception:  # the proxy is not listening yet
        return False


def compare(remote: Any, local: Any, bodies: list[dict], batch: dict) -> list[dict]:
    """The cluster's and the in-process server's answers to each request, without the timings."""
    out = []
    for body in bodies:
        got, want = remote.post("/search", json=body), local.post("/search", json=body)
        out.append({"body": body, "cluster": [got.status_code, without_times(got.json())],
                    "local": [want.status_code, without_times(want.json())]})
    got, want = remote.post("/search/batch", json=batch), local.post("/search/batch", json=batch)
    out.append({"body": batch, "cluster": [got.status_code, without_times(got.json())],
                "local": [want.status_code, without_times(want.json())]})
    return out


def without_times(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: without_times(v) for k, v in data.items() if k not in ("took_ms", "opened")}
    if isinstance(data, list):
        return [without_times(v) for v in data]
    return data


def replica_status() -> dict[str, list[dict]]:
    """What the shard replicas hold and where (``ShardServer.status``): each shard's application asked until both
    of its replicas answered (bounded)."""
    from ray import serve

    found: dict[str, list[dict]] = {}
    for app in shard_apps():
        handle = serve.get_deployment_handle("ShardServer", app_name=app)
        seen: dict[str, dict] = {}
        for _ in range(60):
            status = handle.status.remote().result(timeout_s=30)
            seen[status["actor"]] = status
            if len(seen) == 2:
                break
        found[app] = list(seen.values())
    return found


def shard_apps() -> list[str]:
    from ray import serve

    return sorted(app for app in serve.status().applications if app.startswith("stair-search."))


def running_replicas() -> dict[str, int]:
    """Shard application -> its running replicas (Serve's own count)."""
    from ray import serve

    applications = serve.status().applications
    return {app: applications[app].deployments["ShardServer"].replica_states.get("RUNNING", 0)
            for app in shard_apps()}


def ingress_node() -> str:
    from ray import serve

    return serve.get_deployment_handle("Ingress", app_name="stair-search").status.remote().result(timeout_s=30)["node"]


def load(remote: Any, body: dict, stop: threading.Event, limit: int = LOAD_MAX_REQUESTS,
         seconds: float = LOAD_MAX_S) -> dict:
    """Clients searching until ``stop`` (bounded by ``limit`` requests and ``seconds``)."""
    results: list[tuple[int | str, int | None, str | None]] = []
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while not stop.is_set() and time.monotonic() < deadline:
            with lock:
                if len(results) >= limit:
                    return
            try:
                response = remote.post("/search", json=body)
                answer = response.json() if response.headers.get("content-type", "").startswith(
                    "application/json") else {"text": response.text[:200]}
                entry = (response.status_code, answer.get("version"), answer.get("text") or answer.get("detail"))
            except Exception as exc:  # a connection error counts as a failed query, named
                entry = (type(exc).__name__, None, str(exc)[:200])
            with lock:
                results.append(entry)

    threads = [threading.Thread(target=client) for _ in range(LOAD_THREADS)]
    for thread in threads:
        thread.start()
    return {"threads": threads, "results": results}


def finish(running: dict, stop: threading.Event) -> dict:
    stop.set()
    for thread in running["threads"]:
        thread.join(timeout=UPDATE_MAX_S)
    statuses: dict[str, int] = {}
    for status, _, _ in running["results"]:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    versions = sorted({v for _, v, _ in running["results"] if v is not None})
    errors = sorted({f"{status}: {why}" for status, _, why in running["results"] if status != 200})[:5]
    return {"requests": len(running["results"]), "statuses": statuses, "versions": versions, "errors": errors}


def wait_for(check, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.5)
    return False


def kill_a_worker_under_load(remote: Any, cluster: Any, body: dict) -> dict:
    """A worker node that holds shard replicas (not the ingress) removed while clients search."""
    before = replica_status()
    spread = all(len({r["node"] for r in held}) == len(held) for held in before.values())
    keep, holding = ingress_node(), {r["node"] for held in before.values() for r in held}
    victim = next(node for node in cluster.worker_nodes if node.node_id != keep and node.node_id in holding)
    stop = threading.Event()
    running = load(remote, body, stop)
    time.sleep(2)
    cluster.remove_node(victim)
    time.sleep(3)
    outcome = finish(running, stop)
    back = wait_for(lambda: all(n == 2 for n in running_replicas().values()), 120)
    return outcome | {"spread_before": spread, "replicas_before": {a: len(n) for a, n in before.items()},
                      "replaced": back}


def kill_a_replica_under_load(remote: Any, body: dict) -> dict:
    """One shard replica's process killed while clients search."""
    import ray

    victim = next(iter(replica_status().values()))[0]["actor"]
    stop = threading.Event()
    running = load(remote, body, stop)
    time.sleep(1)
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    time.sleep(3)
    outcome = finish(running, stop)
    back = wait_for(lambda: all(n == 2 for n in running_replicas().values()), 120)
    return outcome | {"replaced": back}


def shard_gone(remote: Any, index: str, body: dict) -> dict:
    """Every replica of one shard gone (both processes killed while its files are missing, so no replacement can
    start): a 503 naming it, or a partial answer that lists it; /readyz not ready. Its files back, the shard comes
    back by itself (Serve's replacements, the driver's refresh) and answers are whole again."""
    import ray

    from stair_search.index import Manifest

    shard = Manifest.load(Path(index)).shards[0]
    whole = remote.post("/search", json=body).json()
    folder = shard.path(Path(index))
    hidden = folder.with_name(folder.name + ".away")
    replicas = replica_status()[f"stair-search.shapes.{shard.name}"]  # asked while they are healthy
    folder.rename(hidden)
    for replica in replicas:
        ray.kill(ray.get_actor(replica["actor"], namespace="serve"), no_restart=True)
    refused = remote.post("/search", json=body)
    partial = remote.post("/search", json=body | {"partial": True})
    readyz = remote.get("/readyz")
    hidden.rename(folder)
    healed = wait_for(lambda: remote.post("/search", json=body).status_code == 200, 180)
    again = remote.post("/search", json=body).json()
    return {"shard": shard.name, "refused": [refused.status_code, refused.json()],
            "partial": [partial.status_code, without_times(partial.json())], "whole": without_times(whole),
            "readyz": [readyz.status_code, readyz.json()], "healed": healed,
            "again_equal": without_times(again) == without_times(whole)}


def update_under_load(remote: Any, spec: dict) -> dict:
    """An append (a new shard) and a delete published while clients search; the driver rolls the new shard out,
    the ingress swaps the new version in."""
    import indexer
    from stair_search.index import delete_documents

    stop = threading.Event()
    running = load(remote, spec["load_body"], stop, limit=UPDATE_MAX_REQUESTS, seconds=UPDATE_MAX_S)
    time.sleep(1)
    from indexer.sources import SourceOptions

    options = SourceOptions(id_column="id", path_column="image_path", caption_column="caption",
                            metadata_columns=("colour", "shape", "background", "n"))
    # merge=False: a new shard to roll out (the merge policy would merge the index's shards, smaller than its floor)
    job = indexer.IndexJob(spec["append_source"], spec["index"], model=spec["model"], append=True, workers=0,
                           options=options, merge=False)
    indexer.run(job, progress=False)
    deleted = delete_documents(spec["index"], [spec["delete_id"]]).deleted
    swapped = wait_for(lambda: remote.post("/search", json={"like": spec["appended_id"]}).status_code == 200
                       and remote.post("/search", json={"like": spec["delete_id"]}).status_code == 404, 200)
    time.sleep(1)
    outcome = finish(running, stop)
    new = remote.post("/search", json={"like": spec["appended_id"], "k": 3})
    gone = remote.post("/search", json={"like": spec["delete_id"], "k": 3})
    return outcome | {"swapped": swapped, "deleted": deleted, "appended_like": new.status_code,
                      "deleted_like": [gone.status_code, gone.json()],
                      "info": without_times(remote.get("/info").json())}


def ray_indexing(spec: dict, cluster: Any) -> dict:
    """The Ray runner on this multi-node cluster writes the same index as the local runner."""
    import indexer
    from tests.test_indexer_jobs import assert_same_documents, index_contents

    outs = {}
    for runner in ("local", "ray"):
        out = Path(spec["work"]) / f"ray-indexing-{runner}"
        job = indexer.IndexJob(spec["images"], out, model=spec["model"], workers=0, batch_size=4, shard_size=8,
                               runner=runner, ray_address=cluster.address if runner == "ray" else None)
        indexer.run(job, progress=False)
        outs[runner] = index_contents(out)
    try:
        assert_same_documents(outs["ray"], outs["local"])
        same = True
    except AssertionError as exc:
        same = str(exc)
    return {"same": same, "documents": len(outs["local"])}


def png_base64(image: Any) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


if __name__ == "__main__":
    main(sys.argv[1])
