"""Serving on a Ray cluster (server/cluster.py): a head and three worker nodes started by the test itself
(``ray.cluster_utils.Cluster``, separate raylets) inside a network namespace of its own with only loopback up, so no
traffic leaves 127.0.0.1 and no other Ray cluster can be joined. The scenarios run in tests/cluster_run.py; this
test builds the index and the inputs, runs it under ``unshare -n -p`` and checks what it reports:

- every mode, filters, paging, like, vectors (one long enough for Lucene inside a replica), a batch, feedback and
  each reranker answer exactly as in-process serving of the same three-shard index (deleted documents included);
- each shard's two replicas on two nodes; a worker node killed, and a replica process killed, under load: no failed
  query, and the lost replicas come back by themselves;
- a shard with no replica left: 503 naming it, or a partial answer that lists it; /readyz not ready; deployed
  again, answers are whole again;
- an append and a delete published under load: no failed query, the responses say which version answered;
- the Ray indexing runner on the multi-node cluster writes the same index as the local runner.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stair_search.index import IndexReader
from tests.conftest import draw_shape
from tests.test_golden import BACKGROUNDS, DELETED, SHAPES, build_index, differences
from tests.test_indexer_jobs import draw_images

pytest.importorskip("ray.serve")
pytestmark = pytest.mark.cluster  # make test runs these alone, after the rest: they check serving under load
ROOT = Path(__file__).resolve().parents[1]
PORT = 8765
COLOURS = ("red", "green", "blue", "yellow")
# Network and PID namespaces of the run's own: only loopback up, and every Ray process ends with the run
UNSHARE = ["unshare", "-n", "-p", "-f", "--mount-proc"]


def can_unshare() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run([*UNSHARE, "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_encoder, tiny_config_path) -> dict:
    if not can_unshare():
        pytest.skip("needs network and PID namespaces of its own (unshare -n -p: root, or user namespaces) so "
                    "Ray binds loopback only")
    work = tmp_path_factory.mktemp("cluster")
    items = [(c, s, bg) for bg in BACKGROUNDS for c in COLOURS for s in SHAPES]
    index = build_index(work / "index", tiny_encoder, items, 8, DELETED)
    reader = IndexReader(index)
    like = reader.find("blue-square-white")
    dense = reader.vectors([like])[0].tolist()
    long_sparse: dict[str, float] = {}
    for doc in ("blue-square-white", "green-circle-black", "yellow-square-white", "red-triangle-black"):
        long_sparse.update(reader.sparse_vectors([reader.find(doc)])[0])
    assert len(long_sparse) > 32  # more query tokens than the in-process Seismic searcher takes: Lucene answers
    spec = {"index": str(index), "port": PORT, "work": str(work), "model": str(tiny_config_path),
            "out": str(work / "report.json"), "bodies": bodies(dense, long_sparse), "batch": batch(),
            "load_body": {"query": "green square", "mode": "hybrid", "k": 5},
            "append_source": str(append_source(work)), "appended_id": "new-0", "delete_id": "green-square-white",
            "images": str(draw_images(work / "images", 10)[0].parent)}
    (work / "spec.json").write_text(json.dumps(spec))
    done = subprocess.run([*UNSHARE, "sh", "-c", 'ip link set lo up && exec "$0" "$1" "$2"',
                           sys.executable, str(ROOT / "tests" / "cluster_run.py"), str(work / "spec.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=1500,
                          env=os.environ | {"HOME": str(work)})  # Ray's generated token goes to $HOME/.ray
    (work / "run.log").write_text(done.stdout + done.stderr)  # for a failure's post-mortem
    assert Path(spec["out"]).exists(), done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(Path(spec["out"]).read_text()) | {"log": done.stderr[-4000:]}


def bodies(dense: list[float], long_sparse: dict[str, float]) -> list[dict]:
    hybrid = {"query": "green square", "mode": "hybrid", "k": 6}
    return [
        {"query": "pot", "mode": "sparse", "k": 5},
        {"query": "a green square", "mode": "dense", "k": 5},
        hybrid,
        hybrid | {"fusion": "convex", "alpha": 0.7},
        {"query": "yellow shape", "k": 5},  # auto, with the text route
        {"query": "a red circle left of a blue square", "k": 5},  # auto: ComCLIP
        {"query": "square", "mode": "text", "k": 5},
        hybrid | {"k": 4, "offset": 4},
        hybrid | {"filters": {"colour": ["green", "blue"]}},
        {"query": "pot shape", "filters": {"n": {"gte": 5, "lt": 18}}, "k": 5},
        hybrid | {"feedback": 2},
        *[hybrid | {"rerank": [name]} for name in ("bsap", "ssp", "comclip")],
        hybrid | {"rerank": ["bsap", "ssp", "comclip"]},
        {"image": image_b64("green", "square"), "k": 5},
        {"like": "blue-square-white", "k": 5},
        {"like": "blue-square-white", "k": 5, "filters": {"shape": "circle"}},
        {"vector": dense, "k": 5},
        {"sparse": long_sparse, "k": 8, "mode": "sparse"},
        {"vector": dense, "sparse": long_sparse, "k": 8},
        {"query": "pot", "filters": {"nope": 1}},  # refused alike
    ]


def batch() -> dict:
    return {"requests": [{"query": "pot", "mode": "sparse", "k": 3}, {"like": "green-circle-white", "k": 3},
                         {"query": "green square", "k": 3, "explain": True}]}


def image_b64(colour: str, shape: str) -> str:
    from tests.cluster_run import png_base64

    return png_base64(draw_shape(colour, shape))


def append_source(work: Path) -> Path:
    folder = work / "appended"
    folder.mkdir()
    rows = []
    for n, (colour, shape) in enumerate((("green", "circle"), ("blue", "triangle"), ("red", "square"))):
        path = folder / f"new-{n}.png"
        draw_shape(colour, shape, background="black").save(path)
        rows.append({"id": f"new-{n}", "image_path": str(path), "caption": f"a new {colour} {shape}",
                     "colour": colour, "shape": shape, "background": "black", "n": 100 + n})
    pq.write_table(pa.Table.from_pylist(rows), work / "appended.parquet")
    return work / "appended.parquet"


def test_the_cluster_answers_as_one_process_does(report):
    for case in report["equality"]:
        assert case["cluster"][0] == case["local"][0], (case["body"], case["cluster"], report["log"])
        assert differences(case["local"][1], case["cluster"][1], "answer") == [], case["body"]
    statuses = [case["local"][0] for case in report["equality"]]
    assert statuses.count(200) == len(statuses) - 1 and statuses[-2] == 422  # the unknown filter field
    assert all(codes == [200, 200] for codes in report["pages"].values()), report["pages"]
    assert differences(report["info"][1], report["info"][0], "info") == []


def test_shard_replicas_are_spread_and_hold_no_model(report):
    replicas = report["replicas"]
    assert len(replicas) == 3 and all(len(held) == 2 for held in replicas.values()), replicas
    assert all(len({r["node"] for r in held}) == 2 for held in replicas.values())  # never two on one node
    assert not any(r["model"] or r["torch"] for held in replicas.values() for r in held), replicas


def test_a_node_or_a_replica_killed_under_load_fails_no_query(report):
    for scenario in ("node_kill", "replica_kill"):
        outcome = report[scenario]
        assert outcome["requests"] > 0 and outcome["statuses"] == {"200": outcome["requests"]}, outcome
        assert outcome["replaced"], outcome
    assert report["node_kill"]["spread_before"]


def test_a_shard_with_no_replica_is_named_never_silently_dropped(report):
    gone = report["shard_gone"]
    shard = gone["shard"]
    status, body = gone["refused"]
    assert status == 503 and shard in body["detail"] and body["missing_shards"] == [shard]
    status, partial = gone["partial"]
    assert status == 200 and partial["missing_shards"] == [shard]
    status, ready = gone["readyz"]
    assert status == 503 and ready["unready_shards"] == {"shapes": [shard]}
    assert gone["healed"] and gone["again_equal"]


def test_an_append_and_a_delete_roll_out_under_load(report):
    update = report["update"]
    assert update["requests"] > 0 and update["statuses"] == {"200": update["requests"]}, update
    assert update["swapped"] and len(update["versions"]) >= 2, update
    assert update["deleted"] == ["green-square-white"] and update["appended_like"] == 200
    assert update["deleted_like"][0] == 404
    assert update["info"]["indexes"][0]["shards"] == 4


def test_the_ray_runner_on_the_cluster_writes_the_same_index(report):
    assert report["ray_indexing"]["same"] is True and report["ray_indexing"]["documents"] == 10
