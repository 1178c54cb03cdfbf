"""Filters applied before ranking (a filter keeping 1% of the documents still gets k hits), paging, and the
same filter syntax in Python, the CLI and HTTP, on a real index of 200 drawn images."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from server import IndexRegistry, ServerSettings, create_app
from stair_search.cli import app
from stair_search.index.reader import Index
from stair_search.index.store import FeatureRecord
from stair_search.index.writer import IndexWriter
from stair_search.query.filters import FilterError, parse_cli_filters, parse_filter
from stair_search.retrieve.router import QueryRouter
from tests.conftest import COLOURS, draw_shape

SHAPES = ("circle", "square", "triangle")
RARE = {7, 150}  # 2 of 200 documents: a 1% filter


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_encoder):
    items = [(c, s, bg, i) for i, (c, s, bg) in enumerate(
        [(c, s, bg) for bg in ("white", "black", "gray", "pink", "orange", "navy", "olive", "teal", "plum", "tan",
                               "gold", "lime", "aqua", "coral", "khaki", "ivory", "beige")
         for c in COLOURS for s in SHAPES][:200])]
    records = [FeatureRecord(id=f"doc-{i:03d}", source=f"drawn://{i}", width=64, height=64, caption=f"a {c} {s}",
                             metadata={"n": i, "group": "rare" if i in RARE else "common", "tags": [c, s],
                                       "day": f"2024-01-{1 + i % 28:02d}"}) for c, s, bg, i in items]
    images = [draw_shape(c, s, background=bg) for c, s, bg, _ in items]
    folder = tmp_path_factory.mktemp("filters") / "index"
    with IndexWriter(folder, tiny_encoder, shard_size=70) as writer:  # 3 shards
        for start in range(0, len(records), 50):
            writer.add(records[start : start + 50], tiny_encoder.encode_images(images[start : start + 50]))
        writer.commit()
    return folder


@pytest.fixture(scope="module")
def router(index_dir, tiny_encoder):
    return QueryRouter(Index(index_dir), tiny_encoder)


def test_the_filter_syntax():
    flt = parse_filter(parse_cli_filters(["group=rare|common", "n>=10", "n<20", "tags=red", "day>=2024-01-05"]))
    assert flt.matches({"group": "rare", "n": 12, "tags": ["red", "circle"], "day": "2024-01-09"})
    assert not flt.matches({"group": "rare", "n": 20, "tags": ["red"], "day": "2024-01-09"})  # n < 20 fails
    assert not flt.matches({"group": "rare", "n": "12", "tags": ["red"], "day": "2024-01-09"})  # text is no number
    assert not flt.matches({"group": "rare", "n": 12, "tags": ["blue"], "day": "2024-01-09"})
    assert parse_cli_filters(['{"n": {"gt": 3}}', "n<=9"]) == {"n": {"gt": 3, "lte": 9}}
    with pytest.raises(FilterError, match="unknown operator"):
        parse_filter({"n": {"between": [1, 2]}})
    with pytest.raises(FilterError, match="write field=value"):
        parse_cli_filters(["just-a-word"])


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_filter_keeping_one_percent_still_returns_k_hits(router, mode):
    response = router.search(text="a red circle", mode=mode, k=2, filters={"group": "rare"})
    assert sorted(h.id for h in response.hits) == [f"doc-{i:03d}" for i in sorted(RARE)]
    ranged = router.search(text="a red circle", mode=mode, k=10, filters={"n": {"gte": 40, "lt": 45}})
    assert sorted(h.metadata["n"] for h in ranged.hits) == [40, 41, 42, 43, 44]
    listed = router.search(text="a red circle", mode=mode, k=100, filters={"tags": "square", "n": {"lt": 60}})
    assert len(listed.hits) == 20 and all("square" in h.metadata["tags"] for h in listed.hits)


def test_filtered_sparse_scores_are_lucenes(router):
    """Sparse scores over the filtered rows come from the stored vectors, and equal Lucene's for the same
    documents (so fusion sees the same numbers whether or not a filter is set)."""
    index = router.index
    query = index.sparse_vectors([index.find("doc-000")])[0]  # a real document vector: it shares tokens
    assert query
    unfiltered = {c: c.score for c in index.search_sparse([query], 200)[0]}
    allowed = index.filter_rows({"n": {"lt": 100}})
    filtered = index.search_sparse([query], 200, rows=allowed)[0]
    expected = {(c.shard, c.row): s for c, s in unfiltered.items()
                if index.documents([c], ["metadata"])[0]["metadata"]["n"] < 100}
    assert filtered and {(c.shard, c.row) for c in filtered} == set(expected)
    for c in filtered:
        assert c.score == pytest.approx(expected[(c.shard, c.row)], rel=1e-5)


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_three_pages_have_no_repeats_or_gaps(router, mode):
    whole = router.search(text="a blue square", mode=mode, k=15).hits
    assert len(whole) == 15
    pages = [router.search(text="a blue square", mode=mode, k=5, offset=offset).hits for offset in (0, 5, 10)]
    assert [h.id for page in pages for h in page] == [h.id for h in whole]
    assert [h.rank for page in pages for h in page] == list(range(1, len(whole) + 1))


def test_unknown_fields_are_errors_naming_them(router):
    with pytest.raises(FilterError, match=r"unknown filter field\(s\) \['colour'\]: the index's metadata fields "
                                          r"are day, group, n, tags"):
        router.search(text="red", mode="dense", filters={"colour": "red"})


def test_the_cli_and_http_take_the_same_filters(index_dir, tiny_config_path, registry_client):
    result = CliRunner().invoke(app, ["search", str(index_dir), "a red circle", "--mode", "dense", "--json",
                                      "--model", str(tiny_config_path), "--filter", "group=rare", "-k", "5"])
    assert result.exit_code == 0, result.output
    assert sorted(json.loads(line)["id"] for line in result.output.splitlines()) == ["doc-007", "doc-150"]
    bad = CliRunner().invoke(app, ["search", str(index_dir), "red", "--model", str(tiny_config_path),
                                   "--filter", "colour=red"])
    assert bad.exit_code != 0 and "unknown filter field" in bad.output
    body = {"query": "a red circle", "mode": "dense", "k": 5, "filters": {"n": {"gte": 198}}}
    answer = registry_client.post("/search", json=body).json()
    assert sorted(h["id"] for h in answer["hits"]) == ["doc-198", "doc-199"]
    page = registry_client.post("/search", json={"query": "a red circle", "mode": "dense", "k": 3, "offset": 3})
    assert [h["rank"] for h in page.json()["hits"]] == [4, 5, 6]
    unknown = registry_client.post("/search", json={"query": "red", "filters": {"colour": "red"}})
    assert unknown.status_code == 422 and "colour" in unknown.json()["detail"]
    wrong = registry_client.post("/search", json={"query": "red", "filters": {"n": {"between": 3}}})
    assert wrong.status_code == 422


@pytest.fixture(scope="module")
def registry_client(index_dir):
    with TestClient(create_app(IndexRegistry({"filters": index_dir}), ServerSettings(reload_interval_s=0))) as c:
        yield c
