"""Search options beyond a plain query, on a real index of 200 drawn images: filters applied before ranking (a
filter keeping 1% of the documents still gets k hits), paging, more like this, queries by vector, batches, and
the same syntax in Python, the CLI and HTTP."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from server import IndexRegistry, Limits, ServerSettings, create_app
from stair_search.cli import app
from stair_search.index import FeatureRecord, IndexReader, IndexWriter, ShardQuery
from stair_search.query.filters import FilterError, parse_cli_filters, parse_filter
from stair_search.retrieve import QueryRouter, SearchRequest
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
    with IndexWriter(folder, tiny_encoder.record, shard_size=70) as writer:  # 3 shards
        for start in range(0, len(records), 50):
            writer.add(records[start : start + 50], tiny_encoder.encode_images(images[start : start + 50]))
        writer.commit()
    return folder


@pytest.fixture(scope="module")
def router(index_dir, tiny_encoder):
    return QueryRouter(IndexReader(index_dir), tiny_encoder)


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
    response = router.search(SearchRequest(text="a red circle", mode=mode, k=2, filters={"group": "rare"}))
    assert sorted(h.id for h in response.hits) == [f"doc-{i:03d}" for i in sorted(RARE)]
    ranged = router.search(SearchRequest(text="a red circle", mode=mode, k=10, filters={"n": {"gte": 40, "lt": 45}}))
    assert sorted(h.metadata["n"] for h in ranged.hits) == [40, 41, 42, 43, 44]
    listed = router.search(SearchRequest(text="a red circle", mode=mode, k=100, filters={"tags": "square",
                                                                                         "n": {"lt": 60}}))
    assert len(listed.hits) == 20 and all("square" in h.metadata["tags"] for h in listed.hits)


def test_the_over_fetching_dense_path_finds_what_the_exact_one_finds(router, monkeypatch):
    """Above EXACT_FILTERED_ROWS allowed rows a shard asks FAISS for more until k of them come back."""
    from stair_search.index import shard

    exact = router.search(SearchRequest(text="a red circle", mode="dense", k=7, filters={"tags": "square"})).hits
    monkeypatch.setattr(shard, "EXACT_FILTERED_ROWS", 0)
    fetched = router.search(SearchRequest(text="a red circle", mode="dense", k=7, filters={"tags": "square"})).hits
    assert len(exact) == 7 and [(h.id, round(h.score, 5)) for h in fetched] == [(h.id, round(h.score, 5))
                                                                                 for h in exact]
    rare = router.search(SearchRequest(text="a red circle", mode="dense", k=2, filters={"group": "rare"})).hits
    assert sorted(h.id for h in rare) == [f"doc-{i:03d}" for i in sorted(RARE)]


def test_filtered_sparse_scores_are_lucenes(router):
    """Sparse scores over the filtered rows come from the stored vectors, and equal Lucene's for the same
    documents (so fusion sees the same numbers whether or not a filter is set)."""
    index = router.index
    query = index.sparse_vectors([index.find("doc-000")])[0]  # a real document vector: it shares tokens
    assert query
    unfiltered = {c: c.score for c in index.search(ShardQuery(200, sparse=query))["sparse"]}
    kept = index.check_filter({"n": {"lt": 100}})
    filtered = index.search(ShardQuery(200, sparse=query, filter=kept))["sparse"]
    expected = {(c.shard, c.row): s for c, s in unfiltered.items()
                if index.documents([c], ["metadata"])[0]["metadata"]["n"] < 100}
    assert filtered and {(c.shard, c.row) for c in filtered} == set(expected)
    for c in filtered:
        assert c.score == pytest.approx(expected[(c.shard, c.row)], rel=1e-5)


@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_three_pages_have_no_repeats_or_gaps(router, mode):
    whole = router.search(SearchRequest(text="a blue square", mode=mode, k=15)).hits
    assert len(whole) == 15
    pages = [router.search(SearchRequest(text="a blue square", mode=mode, k=5, offset=offset)).hits
             for offset in (0, 5, 10)]
    assert [h.id for page in pages for h in page] == [h.id for h in whole]
    assert [h.rank for page in pages for h in page] == list(range(1, len(whole) + 1))


def test_unknown_fields_are_errors_naming_them(router):
    with pytest.raises(FilterError, match=r"unknown filter field\(s\) \['colour'\]: the index's metadata fields "
                                          r"are day, group, n, tags"):
        router.search(SearchRequest(text="red", mode="dense", filters={"colour": "red"}))


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


def test_more_like_this_uses_the_stored_vectors_and_leaves_the_document_out(router):
    index = router.index
    found = index.find("doc-010")
    dense, sparse = index.vectors([found])[0], index.sparse_vectors([found])[0]
    like = router.search(SearchRequest(like="doc-010", k=5))
    assert like.mode == "hybrid" and "doc-010" not in [h.id for h in like.hits] and len(like.hits) == 5
    same = router.search(SearchRequest(dense=dense, sparse=sparse, k=6))
    assert same.hits[0].id == "doc-010"  # the document is its own nearest neighbour
    assert [h.id for h in same.hits][1:] == [h.id for h in like.hits]
    dense_only = router.search(SearchRequest(like="doc-010", k=3, mode="dense", filters={"group": "rare"}))
    assert sorted(h.id for h in dense_only.hits) == ["doc-007", "doc-150"]
    with pytest.raises(KeyError, match="no document with id 'nope'"):
        router.search(SearchRequest(like="nope"))


def test_vector_queries_are_checked_against_the_index(router):
    width = router.index.manifest.embed_dim
    with pytest.raises(ValueError, match=f"must be {width} finite numbers"):
        router.search(SearchRequest(dense=[1.0, 2.0]))
    with pytest.raises(ValueError, match=f"must be {width} finite numbers"):
        router.search(SearchRequest(dense=[float("nan")] * width))
    with pytest.raises(ValueError, match=r"not in the index's vocabulary: \['zzqx'\]"):
        router.search(SearchRequest(sparse={"zzqx": 1.0}))
    with pytest.raises(ValueError, match="mode 'sparse' needs sparse"):
        router.search(SearchRequest(dense=[1.0] * width, mode="sparse"))
    with pytest.raises(ValueError, match="finite and >= 0"):
        router.search(SearchRequest(sparse={"red": -1.0}))


def test_http_takes_like_vector_sparse_and_batches(registry_client, router):
    like = registry_client.post("/search", json={"like": "doc-010", "k": 5}).json()
    assert [h["id"] for h in like["hits"]] == [h.id for h in router.search(SearchRequest(like="doc-010", k=5)).hits]
    dense = router.index.vectors([router.index.find("doc-020")])[0].tolist()
    by_vector = registry_client.post("/search", json={"vector": dense, "k": 1}).json()
    assert by_vector["hits"][0]["id"] == "doc-020" and by_vector["mode"] == "dense"
    sparse = router.index.sparse_vectors([router.index.find("doc-020")])[0]
    by_sparse = registry_client.post("/search", json={"sparse": sparse, "k": 3}).json()
    assert by_sparse["mode"] == "sparse" and "doc-020" in [h["id"] for h in by_sparse["hits"]]
    assert registry_client.post("/search", json={"like": "nope"}).status_code == 404
    assert registry_client.post("/search", json={"vector": [1.0, 2.0]}).status_code == 422
    mixed = registry_client.post("/search", json={"query": "red", "like": "doc-010"})
    assert mixed.status_code == 422 and "one kind of query" in mixed.text
    batch = registry_client.post("/search/batch", json={"requests": [
        {"query": "a red circle", "mode": "dense", "k": 2}, {"like": "doc-010", "k": 2},
        {"query": "a red circle", "mode": "dense", "k": 2, "filters": {"group": "rare"}}]}).json()
    single = registry_client.post("/search", json={"query": "a red circle", "mode": "dense", "k": 2}).json()
    assert [[h["id"] for h in r["hits"]] for r in batch["results"]] == [
        [h["id"] for h in single["hits"]], [h["id"] for h in like["hits"][:2]], ["doc-007", "doc-150"]]
    failing = registry_client.post("/search/batch", json={"requests": [
        {"query": "red", "mode": "dense"}, {"like": "nope"}, {"query": "red", "filters": {"nope": 1}},
        {"query": "red", "k": -5}, {"query": "red", "index": "absent"}, {"query": "red", "mode": "dense", "k": 1}]})
    assert failing.status_code == 200  # each search fails alone, with what it would have answered alone
    results = failing.json()["results"]
    assert [r.get("status") for r in results] == [None, 404, 422, 422, 404, None]
    assert results[1]["detail"] == registry_client.post("/search", json={"like": "nope"}).json()["detail"]
    assert results[2]["detail"].startswith("filters: unknown filter field(s) ['nope']")
    assert results[3]["detail"].startswith("field 'k'") and results[3]["errors"][0]["loc"] == ["body", "k"]
    assert [h["id"] for h in results[5]["hits"]] == [h["id"] for h in results[0]["hits"][:1]]
    assert registry_client.post("/search", json={"query": "red", "mode": "dense"}).status_code == 200  # no lease lost


def test_cli_query_file_vectors_and_like(index_dir, tiny_config_path, tmp_path, router):
    (tmp_path / "queries.tsv").write_text("q-red\ta red circle\n\n# a comment\nq-blue\ta blue square\n")
    model = ["--model", str(tiny_config_path)]
    batch = CliRunner().invoke(app, ["search", str(index_dir), "--queries", str(tmp_path / "queries.tsv"), "--mode",
                                     "dense", "-k", "2", *model])
    assert batch.exit_code == 0, batch.output
    rows = [json.loads(line) for line in batch.output.splitlines()]
    assert [r["query_id"] for r in rows] == ["q-red", "q-red", "q-blue", "q-blue"]
    assert [r["id"] for r in rows[:2]] == [h.id for h in router.search(SearchRequest(text="a red circle",
                                                                                     mode="dense", k=2)).hits]
    dense = router.index.vectors([router.index.find("doc-020")])[0]
    np.save(tmp_path / "query.npy", dense)
    by_vector = CliRunner().invoke(app, ["search", str(index_dir), "--vector", str(tmp_path / "query.npy"), "--json",
                                         "-k", "1", *model])
    assert by_vector.exit_code == 0 and json.loads(by_vector.output)["id"] == "doc-020", by_vector.output
    like = CliRunner().invoke(app, ["search", str(index_dir), "--like", "doc-010", "--json", "-k", "2", *model])
    assert [json.loads(line)["id"] for line in like.output.splitlines()] == [
        h.id for h in router.search(SearchRequest(like="doc-010", k=2)).hits]
    both = CliRunner().invoke(app, ["search", str(index_dir), "red", "--like", "doc-010", *model])
    assert both.exit_code != 0 and "one kind of query" in both.output


def test_the_cli_and_http_take_feedback(index_dir, tiny_config_path, registry_client, router):
    expected = [h.id for h in router.search(SearchRequest(text="a red circle", mode="hybrid", k=5, feedback=3)).hits]
    rare = router.search(SearchRequest(text="a red circle", mode="hybrid", k=5, feedback=3, filters={"group": "rare"}))
    assert sorted(h.id for h in rare.hits) == ["doc-007", "doc-150"]  # the moved query keeps the filter
    assert expected != [h.id for h in router.search(SearchRequest(text="a red circle", mode="hybrid", k=5)).hits]
    cli = CliRunner().invoke(app, ["search", str(index_dir), "a red circle", "--mode", "hybrid", "--feedback", "3",
                                   "-k", "5", "--json", "--model", str(tiny_config_path)])
    assert cli.exit_code == 0, cli.output
    assert [json.loads(line)["id"] for line in cli.output.splitlines()] == expected
    http = registry_client.post("/search", json={"query": "a red circle", "mode": "hybrid", "feedback": 3, "k": 5})
    assert http.status_code == 200, http.text
    assert [h["id"] for h in http.json()["hits"]] == expected and http.json()["decision"]["feedback"] == 3
    refused = registry_client.post("/search", json={"like": "doc-010", "feedback": 3})
    assert refused.status_code == 422 and "'feedback' refines the dense route" in refused.text
    sparse = CliRunner().invoke(app, ["search", str(index_dir), "red", "--mode", "sparse", "--feedback", "2",
                                      "--model", str(tiny_config_path)])
    message = " ".join(sparse.output.replace("│", " ").split())  # the usage box wraps long lines
    assert sparse.exit_code != 0 and "use mode dense, hybrid or auto" in message


@pytest.fixture(scope="module")
def registry_client(index_dir):
    with TestClient(create_app(IndexRegistry({"filters": index_dir}), ServerSettings(reload_interval_s=0))) as c:
        yield c


@pytest.fixture(scope="module")
def image_host(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving a drawn image, a redirect, a large file and a slow answer."""
    import http.server
    import io
    import threading
    import time

    picture = io.BytesIO()
    draw_shape("red", "circle").save(picture, format="PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow.png":
                time.sleep(3)
            if self.path == "/redirect.png":
                self.send_response(302)
                self.send_header("Location", "http://169.254.169.254/latest/meta-data/")
                self.end_headers()
                return
            body = picture.getvalue() if self.path in ("/red.png", "/slow.png") else b"\x89PNG" + b"0" * 3_000_000
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", picture.getvalue()
    server.shutdown()


def test_image_url_queries_are_off_by_default_and_guarded_when_on(index_dir, image_host, registry_client):
    import base64

    base, picture = image_host
    off = registry_client.post("/search", json={"image_url": f"{base}/red.png"})
    assert off.status_code == 422 and "off on this server" in off.json()["detail"]
    settings = ServerSettings(reload_interval_s=0, image_url_hosts=("127.0.0.1",), image_url_timeout_s=1.0,
                              limits=Limits(max_image_bytes=1_000_000))
    with TestClient(create_app(IndexRegistry({"filters": index_dir}), settings)) as on:
        by_url = on.post("/search", json={"image_url": f"{base}/red.png", "mode": "dense", "k": 3}).json()
        inline = on.post("/search", json={"image": base64.b64encode(picture).decode(), "mode": "dense", "k": 3})
        assert [h["id"] for h in by_url["hits"]] == [h["id"] for h in inline.json()["hits"]]
        other_host = on.post("/search", json={"image_url": base.replace("127.0.0.1", "localhost") + "/red.png"})
        assert other_host.status_code == 403 and "not allowed" in other_host.json()["detail"]
        redirect = on.post("/search", json={"image_url": f"{base}/redirect.png"})
        assert redirect.status_code == 422 and "redirects" in redirect.json()["detail"]  # never followed
        assert on.post("/search", json={"image_url": f"{base}/large.png"}).status_code == 413
        assert on.post("/search", json={"image_url": f"{base}/slow.png"}).status_code == 504
        assert on.post("/search", json={"image_url": "file:///etc/passwd"}).status_code == 422
