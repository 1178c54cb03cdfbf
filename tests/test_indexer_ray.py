"""The Ray runner on a local Ray instance gives the same documents, vectors and skipped report as the local
runner.

The Ray job runs in its own process, as `stair-search index --runner ray` does: in one long-lived process,
Lucene calls after a ray.init + ray.shutdown crashed it with SIGSEGV (the JVM handles SIGSEGV itself for its
null checks, and Ray installs and restores signal handlers around its lifetime). It starts a Ray instance of its own
(``address="local"``): a bare ``ray.init()`` joins the cluster /tmp/ray names as the latest, such as one another
test or process on this machine is running."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest

import indexer
from indexer import IndexJob
from stair_search.index.layout import SKIPPED_REPORT
from tests.test_indexer_jobs import JOB_ENV, REPO_ROOT, assert_same_documents, draw_images, index_contents

pytest.importorskip("ray")

RAY_JOB = """
import sys
import ray
import indexer
from indexer import IndexJob
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)  # its own, never another's
job = IndexJob(sys.argv[1], sys.argv[2], model=sys.argv[3], batch_size=4, shard_size=8, workers=0, runner="ray")
summary = indexer.run(job, progress=False)
print(summary.describe())
"""
JOB_ARGS = {"batch_size": 4, "shard_size": 8, "workers": 0}


def test_ray_runner_writes_the_same_index_as_the_local_runner(tmp_path, tiny_config_path):
    folder = tmp_path / "photos"
    draw_images(folder, 11)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join([*map(str, sorted(folder.iterdir())), str(folder / "gone.png")]))
    indexes = {runner: tmp_path / runner for runner in ("local", "ray")}
    job = subprocess.run([sys.executable, "-c", RAY_JOB, str(listing), str(indexes["ray"]), str(tiny_config_path)],
                         env=JOB_ENV, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert job.returncode == 0, job.stdout + job.stderr
    assert "indexed 11" in job.stdout
    summary = indexer.run(IndexJob(listing, indexes["local"], model=str(tiny_config_path), runner="local",
                                   **JOB_ARGS), progress=False)
    assert summary.indexed == 11
    assert_same_documents(index_contents(indexes["ray"]), index_contents(indexes["local"]))
    reports = {runner: pq.read_table(path / SKIPPED_REPORT).to_pylist() for runner, path in indexes.items()}
    assert reports["ray"] == reports["local"] and {r["reason"].split(":")[0] for r in reports["ray"]} == {
        "corrupt or truncated image", "missing file"}
