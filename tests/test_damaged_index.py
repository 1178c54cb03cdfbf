"""Damaged and tampered index files (issue 36's D13 and D15), through the real entry points.

- A manifest is validated as data: any other shape (``{}``, a ``format_version`` of ``"abc"``, shards that are not
  objects, wrong types, out-of-range numbers, unknown keys, names that leave the index, a JSON bomb) is one line
  naming the file, exit 1 (not a usage error's exit 2 and its "see --help"), in ``search`` and ``serve``.
- A damaged Lucene folder (a truncated ``.tim``, a missing ``segments_N``) is one line naming it, not Java's stack.
- A memory-mapped file truncated in place under a serving process (``truncate -s 2000 features.arrow``) is
  detected before it is read: that index answers 503 naming the file, the server and its other index go on, and
  the file restored, the index answers again (it killed the server with SIGBUS).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from indexer import IndexJob
from stair_search.cli import main
from stair_search.index import DamagedIndexError, Manifest
from tests.conftest import draw_shape

ROOT = Path(__file__).resolve().parents[1]
SERVE_MAX_S = 120.0


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_config_path) -> Path:
    import indexer

    root = tmp_path_factory.mktemp("damaged")
    (root / "images").mkdir()
    for colour in ("red", "green", "blue"):
        for shape in ("circle", "square"):
            draw_shape(colour, shape).save(root / "images" / f"{colour}-{shape}.png")
    indexer.run(IndexJob(root / "images", root / "index", model=str(tiny_config_path), workers=0), progress=False)
    return root / "index"


def copy_of(index: Path, folder: Path) -> Path:
    shutil.copytree(index, folder)
    return folder


def tampered_manifests(good: dict) -> dict[str, str]:
    """The manifest's text, tampered 18 ways."""
    shard = good["shards"][0]
    nested = json.dumps(good)[:-1] + ', "jobs": ' + "[" * 5000 + "]" * 5000 + "}"
    return {"nested 5,000 deep": nested, "truncated": json.dumps(good)[:100], "not UTF-8": "\udcff"} | {
        name: json.dumps(data) for name, data in {
        "empty object": {},
        "format_version abc": good | {"format_version": "abc"},
        "shards of strings": good | {"shards": ["x"]},
        "a list": [good],
        "null": None,
        "count as text": good | {"shards": [shard | {"count": "3"}]},
        "negative count": good | {"shards": [shard | {"count": -1}]},
        "deleted beyond count": good | {"shards": [shard | {"deleted_count": shard["count"] + 1}]},
        "embed_dim true": good | {"embed_dim": True},
        "zero scale": good | {"scale": 0},
        "model without fingerprint": good | {"model": {"name": "x", "spec": "y"}},
        "unknown key": good | {"shardz": []},
        "unknown shard key": good | {"shards": [shard | {"path": "/etc"}]},
        "absolute shard name": good | {"shards": [shard | {"name": "/tmp"}]},
        "dotdot tombstone": good | {"shards": [shard | {"deleted": "../x.npy"}]},
        "future format": good | {"format_version": 99},
        "dense as list": good | {"shards": [shard | {"dense": []}]},
    }.items()}


def test_a_manifest_is_validated_as_data(built, tmp_path):
    good = json.loads((built / "manifest.json").read_text())
    index = copy_of(built, tmp_path / "index")
    for name, text in tampered_manifests(good).items():
        (index / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        with pytest.raises(DamagedIndexError) as refused:
            Manifest.load(index)
        message = str(refused.value)
        assert "manifest.json is damaged" in message and "\n" not in message and len(message) < 600, (name, message)
    (index / "manifest.json").write_text(json.dumps(good))
    assert Manifest.load(index).count == 6


def one_line(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as stopped:
        main(args)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and "--help" not in err, err
    return stopped.value.code, lines[0]


def test_the_reported_manifests_are_one_line_and_exit_1_in_search(built, tmp_path, tiny_config_path, capsys):
    good = json.loads((built / "manifest.json").read_text())
    index = copy_of(built, tmp_path / "index")
    for data in ({}, good | {"format_version": "abc"}, good | {"shards": ["x"]}):
        (index / "manifest.json").write_text(json.dumps(data))
        code, line = one_line(["search", str(index), "red", "--model", str(tiny_config_path)], capsys)
        assert code == 1 and "manifest.json is damaged" in line, line
    served = subprocess.run([sys.executable, "-m", "stair_search.cli", "serve", str(index), "--port", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)  # the process, exit status
    assert served.returncode == 1 and served.stderr.strip().count("\n") == 0, served.stderr
    assert "manifest.json is damaged: shards[0] is a JSON str, not an object" in served.stderr, served.stderr


def test_a_damaged_lucene_folder_is_one_line_naming_it(built, tmp_path, tiny_config_path, capsys):
    """Sparse search through Lucene (the in-process searcher removed) and the text route's BM25 index."""
    for damage in ("truncated .tim", "missing segments"):
        index = copy_of(built, tmp_path / damage.replace(" ", "-"))
        for folder in index.glob("shards/*/sparse/accelerated"):
            shutil.rmtree(folder)
        lucene = next(index.glob("shards/*/sparse/lucene"))
        if damage == "truncated .tim":
            for tim in lucene.glob("*.tim"):
                os.truncate(tim, 20)
        else:
            for segments in lucene.glob("segments_*"):
                segments.unlink()
        code, line = one_line(["search", str(index), "red circle", "--mode", "sparse", "--model",
                               str(tiny_config_path)], capsys)
        assert code == 1 and "Lucene cannot read this index" in line and "lucene" in line, (damage, line)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_mapped_file_truncated_under_the_server_is_a_503_and_the_server_lives(built, tmp_path,
                                                                               tiny_config_path):
    damaged, other = copy_of(built, tmp_path / "damaged"), copy_of(built, tmp_path / "other")
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "stair_search.cli", "serve", f"damaged={damaged}",
                               f"other={other}", "--model", str(tiny_config_path), "--host", "127.0.0.1",
                               "--port", str(port), "--reload-interval", "0"], cwd=ROOT, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + SERVE_MAX_S
            while not up(client) and time.monotonic() < deadline and server.poll() is None:
                time.sleep(0.5)
            body = {"query": "red circle", "k": 3, "index": "damaged"}
            before = client.post("/search", json=body)
            assert before.status_code == 200, (tmp_path / "serve.log").read_text()[-3000:]
            features = next(damaged.glob("shards/*/features.arrow"))
            original = features.read_bytes()
            os.truncate(features, 0)  # in place (`truncate -s 2000` of the report: this file is under 4 KB)
            refused = [client.post("/search", json=body) for _ in range(3)]
            assert [r.status_code for r in refused] == [503] * 3, [r.text[:300] for r in refused]
            assert "features.arrow changed in place" in refused[0].json()["detail"]
            assert str(damaged) not in refused[0].text  # named by shard and file, not the server's folders
            assert server.poll() is None and client.get("/healthz").status_code == 200
            assert client.post("/search", json=body | {"index": "other"}).status_code == 200
            with features.open("r+b") as restoring:  # the same file, its bytes back
                restoring.write(original)
            after = client.post("/search", json=body)
            assert after.status_code == 200 and after.json()["hits"] == before.json()["hits"]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


def up(client: httpx.Client) -> bool:
    try:
        return client.get("/healthz").status_code == 200
    except httpx.TransportError:
        return False
