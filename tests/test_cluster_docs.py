"""docs/cluster.md followed as written: ``ray start --head``, ``ray start --address`` and ``stair-search serve
--cluster auto --replicas 2`` from the page's "Step by step" (placeholders replaced, ``--copy-shards`` added),
run by tests/cluster_docs_run.py as PID 1 of PID and network namespaces of its own with only loopback up (so every
Ray process ends with it, and none reaches another address or another cluster). The cluster's answers equal
in-process serving of the same index, every shard was copied to the node-local folder before serving, and a
``stair-search delete`` published while it serves (its tombstone read from the shared path) takes the document out
of the answers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import ServerSettings
from stair_search.index import Manifest
from tests.cluster_run import without_times
from tests.test_cluster import UNSHARE, can_unshare
from tests.test_golden import BACKGROUNDS, SHAPES, build_index, differences

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.cluster  # make test runs these alone, after the rest: they check serving under load
ROOT = Path(__file__).resolve().parents[1]
BODIES = [{"query": "green square", "mode": "hybrid", "k": 6}, {"query": "pot", "mode": "sparse", "k": 5},
          {"query": "square", "mode": "text", "k": 4}, {"query": "a red circle", "mode": "dense", "k": 5,
                                                         "filters": {"background": "black"}}]
DELETE = "green-square-white"


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_encoder) -> dict:
    if not can_unshare():
        pytest.skip("needs network and PID namespaces of its own (unshare -n -p: root, or user namespaces)")
    work = tmp_path_factory.mktemp("cluster_docs")
    items = [(c, s, bg) for bg in BACKGROUNDS for c in ("red", "green", "blue") for s in SHAPES]
    index = build_index(work / "photos", tiny_encoder, items, 6)
    with TestClient(create_app({"photos": index}, ServerSettings(reload_interval_s=0))) as local:
        expected = [without_times(local.post("/search", json=body).json()) for body in BODIES]
    ray_tmp = tempfile.mkdtemp(prefix="rd", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    try:
        spec = {"index": str(index), "copies": str(work / "copies"), "ray_tmp": ray_tmp, "home": str(work),
                "bodies": BODIES, "delete_id": DELETE, "out": str(work / "report.json")}
        (work / "spec.json").write_text(json.dumps(spec))
        done = subprocess.run([*UNSHARE, "sh", "-c",
                               'ip link set lo up && exec "$0" "$1" "$2"', sys.executable,
                               str(ROOT / "tests" / "cluster_docs_run.py"), str(work / "spec.json")],
                              cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert Path(spec["out"]).exists(), done.stdout[-3000:] + done.stderr[-4000:]
    shards = [info.name for info in Manifest.load(index).shards]
    return json.loads(Path(spec["out"]).read_text()) | {"expected": expected, "shards": shards}


def test_the_page_starts_a_head_a_worker_and_serves(report):
    commands = report["commands"]
    run = [c.split()[:2] for c in commands if not c.startswith("export")]
    assert run == [["ray", "get-auth-token"], ["ray", "start"], ["ray", "start"], ["stair-search", "serve"]]
    assert "--cluster auto" in commands[-1] and "--replicas 2" in commands[-1]
    assert [code for _, code, _ in report["ray"]] == [0, 0, 0], report["ray"]  # the worker joined with the token
    assert "error" not in report, report.get("serve_log", "")[-3000:]


def test_its_answers_equal_in_process_serving(report):
    for body, got, want in zip(BODIES, report["answers"], report["expected"], strict=True):
        assert differences(without_times(got), want, str(body)) == []
        assert got["hits"], body


def test_every_shard_was_copied_to_the_node_local_folder(report):
    assert sorted({copy.split("/", 2)[2] for copy in report["copies"]}) == sorted(report["shards"])


def test_a_delete_published_while_serving_reaches_the_answers(report):
    assert report["delete"][0] == 0, report["delete"]
    assert DELETE in [hit["id"] for hit in report["answers"][0]["hits"]]
    assert report["gone"] and DELETE not in [hit["id"] for hit in report["after"]["hits"]]
