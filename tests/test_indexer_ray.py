"""The Ray runner on a local Ray instance gives the same documents, vectors and skipped report as the local
runner. Starting Ray is slow, so this module holds one test and one module-scoped instance."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

import indexer
from indexer.report import SKIPPED_REPORT
from tests.test_indexer_jobs import assert_same_documents, draw_images, index_contents

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_runner_writes_the_same_index_as_the_local_runner(local_ray, tmp_path, tiny_encoder):
    folder = tmp_path / "photos"
    draw_images(folder, 11)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "list.txt").write_text("\n".join([*map(str, sorted(folder.iterdir())), str(folder / "gone.png")]))
    indexes = {}
    for runner in ("local", "ray"):
        indexes[runner] = tmp_path / runner
        summary = indexer.run(tmp_path / "list.txt", indexes[runner], encoder=tiny_encoder, batch_size=4, shard_size=8,
                              workers=0, runner=runner, progress=False)
        assert summary.indexed == 11
    assert_same_documents(index_contents(indexes["ray"]), index_contents(indexes["local"]))
    reports = {runner: pq.read_table(path / SKIPPED_REPORT).to_pylist() for runner, path in indexes.items()}
    assert reports["ray"] == reports["local"] and {r["reason"].split(":")[0] for r in reports["ray"]} == {
        "corrupt or truncated image", "missing file"}
