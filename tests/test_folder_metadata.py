"""A folder source's own metadata (issue 40): every photo's ``folder`` (and the folders above it), ``size`` and
``modified``, stored like any metadata and usable in every filter: the CLI, Python, HTTP and a batch, where a
search with a filter the index cannot apply fails alone."""

from __future__ import annotations

import json
import os

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from server import IndexRegistry, ServerSettings, create_app
from stair_search.cli import app
from stair_search.index import IndexReader
from tests.conftest import draw_shape

PHOTOS = {"top.png": ("red", "circle"), "Pets/cat.png": ("blue", "square"), "Pets/Cats/tom.png": ("green", "circle"),
          "Pets/Cats/kit.png": ("blue", "circle"), "Trips/2019/sea.png": ("yellow", "square")}
MODIFIED = {"Pets/cat.png": 1_560_000_000, "Trips/2019/sea.png": 1_700_000_000}  # 2019-06-08, 2023-11-14 (UTC)


@pytest.fixture(scope="module")
def folder_index(tmp_path_factory, tiny_config_path):
    root = tmp_path_factory.mktemp("folder-metadata")
    photos = root / "photos"
    for name, (colour, shape) in PHOTOS.items():
        (photos / name).parent.mkdir(parents=True, exist_ok=True)
        draw_shape(colour, shape).save(photos / name)
    for name, seconds in MODIFIED.items():
        os.utime(photos / name, (seconds, seconds))
    out = root / "index"
    result = CliRunner().invoke(app, ["index", str(photos), "--out", str(out), "--model", str(tiny_config_path),
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    return {"photos": photos, "index": out, "model": str(tiny_config_path)}


def test_each_photo_carries_its_folders_size_and_modification_time(folder_index):
    with IndexReader(folder_index["index"]) as index:
        rows = index.documents(next(iter(index.live(100))), ["id", "metadata"])
    metadata = {row["id"]: row["metadata"] for row in rows}
    assert set(metadata) == set(PHOTOS)
    assert metadata["top.png"]["folder"] == ["."]
    assert metadata["Pets/Cats/tom.png"]["folder"] == ["Pets", "Pets/Cats"]
    assert metadata["Trips/2019/sea.png"]["folder"] == ["Trips", "Trips/2019"]
    for name in PHOTOS:
        assert metadata[name]["size"] == (folder_index["photos"] / name).stat().st_size
    assert metadata["Pets/cat.png"]["modified"] == "2019-06-08T13:20:00Z"
    assert metadata["Trips/2019/sea.png"]["modified"] == "2023-11-14T22:13:20Z"


def search_ids(folder_index, *filters: str) -> set[str]:
    arguments = ["search", str(folder_index["index"]), "a circle", "--mode", "dense", "-k", "10", "--json",
                 "--model", folder_index["model"]]
    for spec in filters:
        arguments += ["--filter", spec]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    return {json.loads(line)["id"] for line in result.output.splitlines() if line.startswith("{")}


def test_cli_filters_by_folder_with_its_subfolders_by_size_and_by_date(folder_index):
    assert search_ids(folder_index, "folder=Pets") == {"Pets/cat.png", "Pets/Cats/tom.png", "Pets/Cats/kit.png"}
    assert search_ids(folder_index, "folder=Pets/Cats") == {"Pets/Cats/tom.png", "Pets/Cats/kit.png"}
    assert search_ids(folder_index, "folder=.") == {"top.png"}
    assert search_ids(folder_index, "folder=Pets|Trips/2019") == set(PHOTOS) - {"top.png"}
    assert search_ids(folder_index, "modified>=2023", "modified<2024") == {"Trips/2019/sea.png"}
    assert search_ids(folder_index, "modified<=2019-06-08") == {"Pets/cat.png"}
    largest = max(PHOTOS, key=lambda name: (folder_index["photos"] / name).stat().st_size)
    size = (folder_index["photos"] / largest).stat().st_size
    assert largest in search_ids(folder_index, f"size>={size}")


def test_http_and_a_batch_filter_by_folder_and_a_bad_search_fails_alone(folder_index):
    settings = ServerSettings(reload_interval_s=0)
    with TestClient(create_app(IndexRegistry({"photos": folder_index["index"]}), settings)) as client:
        alone = client.post("/search", json={"query": "a circle", "mode": "dense", "filters": {"folder": "Pets"}})
        assert alone.status_code == 200
        assert {h["id"] for h in alone.json()["hits"]} == {"Pets/cat.png", "Pets/Cats/tom.png", "Pets/Cats/kit.png"}
        batch = client.post("/search/batch", json={"requests": [
            {"query": "a circle", "mode": "dense", "filters": {"folder": "Pets/Cats"}},
            {"query": "a circle", "mode": "dense", "filters": {"album": "Pets"}},
            {"query": "a circle", "mode": "dense", "filters": {"folder": {"regex": "P.*"}}},
            {"query": "a circle", "mode": "dense", "filters": {"folder": "Trips", "size": {"gt": 0}}}]})
        operator_alone = client.post("/search", json={"query": "a circle", "filters": {"folder": {"regex": "P"}}})
    assert batch.status_code == 200
    first, unknown, operator, last = batch.json()["results"]
    assert {h["id"] for h in first["hits"]} == {"Pets/Cats/tom.png", "Pets/Cats/kit.png"}
    assert unknown["status"] == 422 and "unknown filter field(s) ['album']" in unknown["detail"]
    assert "folder" in unknown["detail"] and "modified" in unknown["detail"]  # the fields it could have used
    assert operator["status"] == operator_alone.status_code == 422
    assert {k: operator[k] for k in ("detail", "errors")} == operator_alone.json()
    assert [h["id"] for h in last["hits"]] == ["Trips/2019/sea.png"]
