"""The HTTP service on a small real index (drawn shapes, tiny real model, real Lucene + FAISS): search in every
mode, uploads, documents and thumbnails, every limit, path traversal, auth, CORS, metrics, concurrency and
hot swap of a newly published index while requests keep arriving."""

from __future__ import annotations

import base64
import collections
import importlib.util
import io
import os
import re
import sys
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import indexer
from indexer import IndexJob
from indexer.sources import SourceOptions
from server import IndexRegistry, Limits, ServerSettings, create_app
from server.background import serve_in_background
from server.schemas import Mode, RerankerName
from stair_search.index import IndexReader
from stair_search.rerank import RERANKERS
from stair_search.retrieve import MODES, QueryRouter, SearchRequest
from tests.conftest import COLOURS, draw_shape, png_header

SHAPES = ("circle", "square", "triangle")
OPTIONS = SourceOptions(id_column="id", path_column="path", caption_column="caption",
                        metadata_columns=("colour", "shape"))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def write_source(folder: Path, items: list[tuple[str, str]], name: str = "source.parquet") -> Path:
    """Draw (colour, shape) images into ``folder`` and a parquet source listing them with captions and metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour, shape in items:
        path = folder / f"{colour}-{shape}.png"
        draw_shape(colour, shape).save(path)
        rows.append({"id": f"{colour}/{shape}", "path": str(path), "caption": f"a {colour} {shape}",
                     "colour": colour, "shape": shape})
    table = folder / name
    pq.write_table(pa.Table.from_pylist(rows), table)
    return table


@pytest.fixture(scope="session")
def shapes_index(tmp_path_factory, tiny_encoder) -> Path:
    """12 shapes + one document whose file is a symlink out of its folder + one whose file is swapped later."""
    root = tmp_path_factory.mktemp("served")
    images = root / "images"
    source = write_source(images, [(c, s) for c in COLOURS for s in SHAPES])
    outside = root / "outside"
    outside.mkdir()
    draw_shape("green", "circle", background="black").save(outside / "secret.png")
    (images / "linked.png").symlink_to(outside / "secret.png")
    draw_shape("blue", "circle", background="black").save(images / "swapped.png")
    extra = [{"id": "linked/outside", "path": str(images / "linked.png"), "caption": "a symlink", "colour": "green",
              "shape": "circle"},
             {"id": "swapped", "path": str(images / "swapped.png"), "caption": "replaced after indexing",
              "colour": "blue", "shape": "circle"}]
    table = pq.read_table(source).to_pylist() + extra
    pq.write_table(pa.Table.from_pylist(table), source)
    index_dir = root / "shapes"
    indexer.run(IndexJob(source, index_dir, shard_size=5, options=OPTIONS), encoder=tiny_encoder)
    return index_dir


@pytest.fixture(scope="session")
def registry(shapes_index) -> IndexRegistry:
    return IndexRegistry({"shapes": shapes_index})


@pytest.fixture(scope="session")
def library_router(shapes_index, tiny_encoder) -> QueryRouter:
    """The library's own router on the same index: what the API's answers are compared with."""
    return QueryRouter(IndexReader(shapes_index), tiny_encoder)


def make_client(registry: IndexRegistry, **settings) -> TestClient:
    settings.setdefault("reload_interval_s", 0)
    return TestClient(create_app(registry, ServerSettings(**settings)))


@pytest.fixture(scope="module")
def client(registry):
    with make_client(registry) as c:
        yield c


# ------------------------------------------------------------------------------------------------- search


@pytest.mark.parametrize("mode", ["sparse", "dense", "hybrid"])
def test_text_search_returns_what_the_library_router_returns(client, library_router, mode):
    response = client.post("/search", json={"query": "a red circle", "mode": mode, "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = library_router.search(SearchRequest(text="a red circle", mode=mode, k=5, explain=True))
    assert [h["id"] for h in body["hits"]] == [h.id for h in expected.hits]
    assert [h["score"] for h in body["hits"]] == pytest.approx([h.score for h in expected.hits], rel=1e-5)
    assert body["mode"] == mode and body["index"] == "shapes" and body["version"] == 1


def test_hits_carry_parts_metadata_matched_tokens_and_links(client, library_router):
    body = client.post("/search", json={"query": "a blue square", "mode": "hybrid", "k": 3}).json()
    expected = library_router.search(SearchRequest(text="a blue square", mode="hybrid", k=3, explain=True)).hits
    for hit, want in zip(body["hits"], expected, strict=True):
        assert set(hit["parts"]) == {"sparse", "dense"} & set(want.parts)
        assert hit["metadata"] == want.metadata and hit["caption"] == want.caption
        assert [(m["token"], m["query"], m["document"]) for m in hit["matched"]] == \
            [(t, pytest.approx(q), pytest.approx(d)) for t, (q, d) in want.matched.items()]
        assert client.get(hit["thumbnail"]).status_code == 200
        assert client.get(hit["document"]).json()["id"] == hit["id"]


def test_a_matched_piece_of_a_longer_query_word_names_that_word(tmp_path):
    """"hamster" is searched by its first piece ``ham``: each matched token of a hit says which query word it was
    a piece of (``of``), so the page's chip reads "ham… (hamster)", not "ham"."""
    from tests.test_router import split_word_index

    split_word_index(tmp_path)
    with make_client(IndexRegistry({"words": tmp_path / "index"})) as words:  # grounded: the idf lookup
        body = words.post("/search", json={"query": "hamster cage", "mode": "sparse", "k": 3}).json()
    matched = {hit["id"]: {m["token"]: m["of"] for m in hit["matched"]} for hit in body["hits"]}
    assert matched == {"meat": {"ham": "hamster"}, "empty-cage": {"cage": None},
                       "pet-cage": {"ham": "hamster", "cage": None}}


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_image_query_by_base64_and_by_upload_finds_the_same_image_first(client, mode):
    image = png_bytes(draw_shape("yellow", "triangle"))
    as_json = client.post("/search", json={"image": base64.b64encode(image).decode(), "mode": mode, "k": 3})
    data_url = client.post("/search", json={"image": "data:image/png;base64," + base64.b64encode(image).decode(),
                                            "mode": mode, "k": 3})
    upload = client.post("/search", files={"image": ("q.png", image, "image/png")},
                         data={"mode": mode, "k": "3"})
    for response in (as_json, data_url, upload):
        assert response.status_code == 200, response.text
        assert response.json()["hits"][0]["id"] == "yellow/triangle"


def test_multipart_accepts_the_fields_as_one_json_request_field(client):
    image = png_bytes(draw_shape("green", "square"))
    response = client.post("/search", files={"image": ("q.png", image, "image/png")},
                           data={"request": '{"mode": "dense", "k": 2, "query": "green"}'})
    assert response.status_code == 200, response.text
    assert len(response.json()["hits"]) == 2


def test_filters_keep_only_matching_metadata(client, library_router):
    body = client.post("/search", json={"query": "a shape", "mode": "dense", "k": 4,
                                        "filters": {"colour": ["red", "blue"], "shape": "circle"}}).json()
    everything = library_router.search(SearchRequest(text="a shape", mode="dense", k=20)).hits
    wanted = [h.id for h in everything if h.metadata["colour"] in ("red", "blue") and h.metadata["shape"] == "circle"]
    assert [h["id"] for h in body["hits"]] == wanted[:4]
    assert {tuple(h["id"].split("/")) for h in body["hits"]} <= {("red", "circle"), ("blue", "circle"), ("swapped",)}


def test_auto_mode_and_rerankers_follow_what_the_router_supports(client):
    response = client.post("/search", json={"query": "a red circle", "mode": "auto", "k": 3})
    assert response.status_code == 200, response.text
    assert response.json()["decision"]["mode"] in ("sparse", "dense", "hybrid")
    info = client.get("/info").json()
    assert info["modes"] == list(MODES) and info["rerankers"] == list(RERANKERS)
    # the request schema offers exactly what the router runs
    assert set(get_args(Mode)) == set(MODES) and get_args(RerankerName) == RERANKERS
    response = client.post("/search", json={"query": "a red circle", "rerank": ["bsap"], "k": 3})
    assert response.status_code == 200, response.text
    assert all("bsap" in hit["parts"] for hit in response.json()["hits"])


def test_classify_scores_every_label(client):
    image = base64.b64encode(png_bytes(draw_shape("red", "circle"))).decode()
    response = client.post("/classify", json={"image": image, "labels": ["red circle", "blue square"]})
    assert client.get("/info").json()["classify"] is True
    assert response.status_code == 200, response.text
    assert {entry["label"] for entry in response.json()["labels"]} == {"red circle", "blue square"}


# --------------------------------------------------------------------------------------- documents, thumbnails


def test_document_returns_the_stored_fields(client, shapes_index):
    body = client.get("/documents/red/circle").json()
    source = str(shapes_index.parent / "images" / "red-circle.png")
    assert body == {"id": "red/circle", "index": "shapes", "caption": "a red circle",
                    "metadata": {"colour": "red", "shape": "circle"}, "source": source, "width": 64, "height": 64,
                    "thumbnail": "/thumbnails/red%2Fcircle?index=shapes"}
    assert client.get("/documents/red%2Fcircle").json()["id"] == "red/circle"


def test_thumbnail_is_a_small_png_of_the_stored_image(client):
    response = client.get("/thumbnails/red/circle", params={"size": 32})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(response.content))
    assert thumb.size == (32, 32)
    assert thumb.convert("RGB").getpixel((16, 16)) == pytest.approx(COLOURS["red"], abs=12)
    assert thumb.convert("RGB").getpixel((1, 1)) == (255, 255, 255)


def test_relative_sources_and_ids_with_newlines_are_served(tmp_path, tiny_encoder, monkeypatch):
    """Lists, parquet and webdataset entries given relative to the job's folder; the service runs elsewhere."""
    work = tmp_path / "work"
    (work / "pictures").mkdir(parents=True)
    draw_shape("red", "circle").save(work / "pictures" / "red.png")
    monkeypatch.chdir(work)
    Path("list.txt").write_text("pictures/red.png\n")
    pq.write_table(pa.table({"id": ["two\nlines"], "path": ["pictures/red.png"]}), "data.parquet")
    with tarfile.open("shard-000.tar", "w") as tar:
        tar.add("pictures/red.png", arcname="red.png")
    indexes = {}
    sources = (("list", "list.txt", None), ("parquet", "data.parquet", SourceOptions(id_column="id")),
               ("tar", "shard-000.tar", None))
    for name, source, options in sources:
        indexer.run(IndexJob(source, tmp_path / name, workers=0, options=options), encoder=tiny_encoder, progress=False)
        indexes[name] = tmp_path / name
    monkeypatch.chdir(tmp_path)
    with make_client(IndexRegistry(indexes)) as served:
        for name in indexes:
            hit = served.post("/search", json={"query": "red", "index": name, "mode": "dense"}).json()["hits"][0]
            document = served.get(hit["document"])
            thumbnail = served.get(hit["thumbnail"])
            assert document.status_code == 200 and document.json()["id"] == hit["id"], (name, document.text)
            assert thumbnail.status_code == 200 and thumbnail.headers["content-type"] == "image/png", name
        assert served.get("/documents/two%0Alines", params={"index": "parquet"}).json()["id"] == "two\nlines"


@pytest.mark.parametrize("attempt", [
    "../../../../etc/passwd",
    "red/../../../../etc/passwd",
    "%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%2F..%2F..%2Fetc%2Fpasswd",
    "%252e%252e%252fetc%252fpasswd",
    "/etc/passwd",
    "%2Fetc%2Fpasswd",
    "red-circle.png",
    "file:///etc/passwd",
])
def test_path_traversal_attempts_are_refused(client, shapes_index, attempt):
    real_file = shapes_index.parent / "images" / "red-circle.png"
    for doc_id in (attempt, str(real_file), quote_all(str(real_file))):
        for route in ("thumbnails", "documents"):
            response = client.get(f"/{route}/{doc_id}")
            assert response.status_code == 404, (route, doc_id, response.status_code)
            assert b"root:" not in response.content and b"PNG" not in response.content[:8]


def quote_all(text: str) -> str:
    return "".join(f"%{b:02X}" for b in text.encode())


def test_a_stored_source_that_is_a_symlink_out_of_its_folder_is_not_served(client):
    assert client.get("/documents/linked/outside").status_code == 200  # the document exists ...
    response = client.get("/thumbnails/linked/outside")
    assert response.status_code == 404 and "symlink" in response.json()["detail"]  # ... its file is not served


def test_a_source_replaced_by_a_symlink_to_a_system_file_is_not_served(client, shapes_index):
    assert client.get("/thumbnails/swapped").status_code == 200  # served (and cached) while it is a real file
    swapped = shapes_index.parent / "images" / "swapped.png"
    swapped.unlink()
    swapped.symlink_to("/etc/passwd")
    response = client.get("/thumbnails/swapped")
    assert response.status_code == 404
    assert b"root:" not in response.content


@pytest.mark.parametrize("index", ["../shapes", "/etc", "%2e%2e%2fshapes", "shapes/../shapes", "shapes%00"])
def test_index_names_are_looked_up_never_opened_as_paths(client, index):
    for response in (client.get(f"/documents/red/circle?index={index}"),
                     client.get(f"/thumbnails/red/circle?index={index}"),
                     client.post("/search", json={"query": "x", "index": index})):
        assert response.status_code == 404, (index, response.text)
        assert "no index named" in response.json()["detail"]


# ------------------------------------------------------------------------------------------------- limits


@pytest.mark.parametrize(("payload", "needle"), [
    ({"query": "x", "k": 0}, "k"),
    ({"query": "x", "k": 101}, "k"),
    ({"query": "x" * 1001}, "query"),
    ({}, "query"),
    ({"query": "   "}, "query"),
    ({"query": "x", "mode": "fast"}, "mode"),
    ({"query": "x", "fusion": "max"}, "fusion"),
    ({"query": "x", "alpha": 2}, "alpha"),
    ({"query": "x", "rerank": ["magic"]}, "rerank"),
    ({"query": "x", "unknown": 1}, "unknown"),
    ({"query": "x", "filters": {"a": {"nested": 1}}}, "filters"),
])
def test_invalid_requests_answer_422_naming_the_field(client, payload, needle):
    response = client.post("/search", json=payload)
    assert response.status_code == 422, response.text
    assert needle in response.text


@pytest.mark.parametrize(("content", "needle"), [
    (b'{"query": "x", "k": ', "json"),
    (b"[1, 2]", "should be an object"),
    (b"", "empty"),
    (b"\xff\xfe\x00", "json"),  # not UTF-8
    (b'{"query": "x", "k": 1e309}', "finite number"),  # inf, which a JSON error answer could not echo back
    (b'{"query": "x", "alpha": NaN}', "alpha"),
    (b"[" * 5000 + b"]" * 5000, "recursion limit"),
])
def test_malformed_json_answers_422(client, content, needle):
    response = client.post("/search", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert needle.lower() in response.text.lower()


def test_validation_errors_do_not_echo_the_input_back(client):
    response = client.post("/search", json={"query": "x", "image": 12345, "filters": {"a": ["x" * 50_000]}})
    assert response.status_code == 422
    assert "12345" not in response.text and len(response.content) < 2_000


def test_a_content_length_that_is_not_a_number_answers_400(client):
    response = client.post("/search", content=b"{}", headers={"content-type": "application/json",
                                                                "content-length": "-5"})
    assert response.status_code == 400 and "Content-Length" in response.json()["detail"]


def test_wrong_content_type_answers_415(client):
    response = client.post("/search", content=b"query=x", headers={"content-type": "text/plain"})
    assert response.status_code == 415 and "application/json" in response.json()["detail"]


@pytest.mark.parametrize(("image", "needle"), [
    ("not base64!!", "base64"),
    (base64.b64encode(b"this is not an image").decode(), "not a readable image"),
    (base64.b64encode(png_bytes(draw_shape("red", "circle"))[:60]).decode(), "not a readable image"),
    ("", "query"),
])
def test_bad_images_answer_422_with_a_message(client, image, needle):
    response = client.post("/search", json={"image": image})
    assert response.status_code == 422, response.text
    assert needle in response.text


def test_upload_that_is_not_an_image_answers_422(client):
    response = client.post("/search", files={"image": ("q.png", b"GIF89a broken", "image/gif")})
    assert response.status_code == 422 and "not a readable image" in response.json()["detail"]


@pytest.mark.parametrize(("form", "file_field", "needle"), [
    ({"k": "101"}, "image", "k"),
    ({"query": "x" * 1001}, "image", "query"),
    ({"mode": "fast"}, "image", "mode"),
    ({"request": "{not json"}, "image", "request"),
    ({"filters": "{broken"}, "image", "filters"),
    ({}, "picture", "picture"),
])
def test_invalid_multipart_fields_answer_422_naming_the_field(client, form, file_field, needle):
    image = png_bytes(draw_shape("red", "circle"))
    response = client.post("/search", data=form, files={file_field: ("q.png", image, "image/png")})
    assert response.status_code == 422, response.text
    assert needle in response.text


def test_a_broken_multipart_body_answers_4xx_not_500(client):
    body = b"--xyz\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n\r\nabc"  # no end
    response = client.post("/search", content=body, headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert 400 <= response.status_code < 500, response.text


@pytest.mark.parametrize(("payload", "needle"), [
    ({"labels": ["red circle", "blue square"]}, "exactly one image"),
    ({"image": "AAAA", "labels": ["only one"]}, "labels"),
    ({"image": "AAAA", "labels": ["same", " same "]}, "two distinct"),
    ({"image": "AAAA", "labels": ["x" * 101, "y"]}, "longer than 100"),
    ({"image": "not base64!!", "labels": ["a", "b"]}, "base64"),
])
def test_invalid_classify_requests_answer_422(client, payload, needle):
    response = client.post("/classify", json=payload)
    assert response.status_code == 422, response.text
    assert needle in response.text


def test_classify_accepts_a_multipart_upload(client):
    if not client.get("/info").json()["classify"]:
        pytest.skip("this build has no zero-shot classifier")
    response = client.post("/classify", files={"image": ("q.png", png_bytes(draw_shape("red", "circle")), "image/png")},
                           data={"labels": "red circle,blue square"})
    assert response.status_code == 200, response.text
    assert sorted(entry["label"] for entry in response.json()["labels"]) == ["blue square", "red circle"]


@pytest.mark.parametrize(("limits", "needle"), [
    ({"max_body_bytes": 0}, "max_body_bytes"),
    ({"search_timeout_s": -1}, "search_timeout_s"),
    ({"max_image_bytes": 10, "max_body_bytes": 5}, "raise max_body_bytes"),
])
def test_limits_that_would_refuse_everything_are_refused_at_start(limits, needle):
    with pytest.raises(ValueError, match=needle):
        Limits(**limits)


@pytest.fixture(scope="module")
def strict_client(registry):
    limits = Limits(max_body_bytes=40_000, max_image_bytes=20_000, max_image_pixels=128 * 128)
    with make_client(registry, limits=limits) as c:
        yield c


def test_body_over_the_cap_answers_413(strict_client):
    response = strict_client.post("/search", json={"query": "x", "image": "A" * 50_000})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_chunked_body_over_the_cap_answers_413(strict_client):
    def chunks():
        yield b'{"query": "x", "image": "'
        for _ in range(10):
            yield b"A" * 8_000
        yield b'"}'

    response = strict_client.post("/search", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413


def test_image_over_the_byte_cap_answers_413(strict_client):
    noisy = Image.frombytes("RGB", (100, 100), os.urandom(100 * 100 * 3))  # incompressible: ~30 kB as PNG
    data = png_bytes(noisy)
    assert len(data) > 20_000
    assert strict_client.post("/search", json={"image": base64.b64encode(data).decode()}).status_code == 413
    upload = strict_client.post("/search", files={"image": ("q.png", data, "image/png")})
    assert upload.status_code == 413 and "limit" in upload.json()["detail"]


def test_image_over_the_pixel_cap_answers_413_before_decoding(strict_client):
    bomb = png_bytes(Image.new("1", (6000, 6000)))  # 36 M pixels in a few kB
    assert len(bomb) < 20_000
    response = strict_client.post("/search", json={"image": base64.b64encode(bomb).decode()})
    assert response.status_code == 413 and "6000x6000" in response.json()["detail"]


def test_an_image_past_pils_own_limit_answers_413_not_422(client):
    flood = png_header(30000, 30000)  # PIL refuses to even open it
    response = client.post("/search", json={"image": base64.b64encode(flood).decode()})
    assert response.status_code == 413 and "900000000 pixels" in response.json()["detail"]
    upload = client.post("/search", files={"image": ("flood.png", flood, "image/png")})
    assert upload.status_code == 413


def test_search_past_the_timeout_answers_504(registry):
    with make_client(registry, limits=Limits(search_timeout_s=1e-4)) as c:
        response = c.post("/search", json={"query": "a red circle", "mode": "hybrid"})
    assert response.status_code == 504 and "longer than" in response.json()["detail"]


def test_unknown_index_answers_404(client):
    response = client.post("/search", json={"query": "x", "index": "nope"})
    assert response.status_code == 404 and "shapes" in response.json()["detail"]


# --------------------------------------------------------------------------------------------- auth, CORS


def test_api_key_is_required_when_configured(registry):
    with make_client(registry, api_key="s3cret") as c:
        assert c.post("/search", json={"query": "x"}).status_code == 401
        assert c.post("/search", json={"query": "x"}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert c.post("/search", json={"query": "x"}, headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/thumbnails/red/circle").status_code == 401
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200


def test_cors_allows_only_the_configured_origins(registry):
    with make_client(registry, cors_origins=("https://app.example",)) as c:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
        ok = c.options("/search", headers={"Origin": "https://app.example", **preflight})
        other = c.options("/search", headers={"Origin": "https://evil.example", **preflight})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------------------------------ operations, page


def test_health_readiness_metrics_and_openapi(client, registry):
    client.post("/search", json={"query": "a red circle", "mode": "sparse"})
    client.get("/thumbnails/red/circle")
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["ready"] and ready["indexes"]["shapes"]["documents"] == 14
    text = client.get("/metrics").text
    assert 'stair_http_requests_total{method="POST",route="/search",status="200"}' in text
    assert 'stair_http_request_seconds_bucket{le="0.005",route="/thumbnails/{doc_id:doc_id}"}' in text
    assert 'stair_search_seconds_count{index="shapes",mode="sparse"}' in text
    assert 'stair_index_documents{index="shapes"} 14.0' in text
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]["/search"]["post"]["requestBody"]["content"]) == {"application/json",
                                                                               "multipart/form-data"}
    refs = set()

    def collect(node):
        if isinstance(node, dict):
            refs.update([node["$ref"]] if isinstance(node.get("$ref"), str) else [])
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(schema)
    components = schema["components"]["schemas"]
    assert {"SearchRequest", "ClassifyRequest", "FilterRange"} <= set(components)
    assert all(ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in components for ref in refs)


def test_every_answer_5xx_included_is_counted_under_its_route_and_status(registry):
    """Real failures: a search and a batch past the timeout (504), and two routes added to the real app that fail
    with a bug, one in the thread pool (as the thumbnail route runs) and one on the event loop (as batch and
    search run; no route of the service is left that answers 500 on purpose): /metrics counts each answer the
    client got under its route and status, 5xx included, through the one middleware that counts them all."""
    app = create_app(registry, ServerSettings(reload_interval_s=0, limits=Limits(search_timeout_s=1e-4)))

    @app.get("/bug-in-pool")
    def bug_in_pool() -> None:
        raise RuntimeError("a bug in a sync route")

    @app.post("/bug-in-loop")
    async def bug_in_loop() -> None:
        raise RuntimeError("a bug in an async route")

    asked = [("POST", "/search", {"json": {"query": "a red circle", "mode": "hybrid"}}),
             ("POST", "/search/batch", {"json": {"requests": [{"query": "a red circle"}] * 3}}),
             ("GET", "/thumbnails/red%2Fcircle", {}), ("GET", "/thumbnails/red%2Fnope", {}),
             ("GET", "/bug-in-pool", {}), ("POST", "/bug-in-loop", {}), ("POST", "/bug-in-loop", {})]
    with TestClient(app, raise_server_exceptions=False) as c:
        got = collections.Counter((method, path.split("/red")[0], c.request(method, path, **kw).status_code)
                                  for method, path, kw in asked)
        counted = http_counts(c.get("/metrics").text)
    assert got[("POST", "/search", 504)] == 1 and got[("POST", "/search/batch", 504)] == 1
    assert got[("GET", "/bug-in-pool", 500)] == 1 and got[("POST", "/bug-in-loop", 500)] == 2
    assert got[("GET", "/thumbnails", 200)] == 1 and got[("GET", "/thumbnails", 404)] == 1
    templates = {"/thumbnails": "/thumbnails/{doc_id:doc_id}"}
    assert counted == {(m, templates.get(p, p), str(status)): n for (m, p, status), n in got.items()}


def http_counts(metrics: str) -> dict[tuple[str, str, str], int]:
    """(method, route, status) -> count, from /metrics' request counter (the /metrics request itself left out)."""
    counts = {}
    for line in metrics.splitlines():
        if found := re.fullmatch(r"stair_http_requests_total\{(.*)\} (\S+)", line):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', found[1]))
            if labels["route"] != "/metrics":
                counts[(labels["method"], labels["route"], labels["status"])] = int(float(found[2]))
    return counts


def test_the_page_and_its_assets_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


# ------------------------------------------------------------------------------------------------ concurrency


def test_concurrent_requests_get_the_same_answers_as_sequential_ones(client):
    requests = [{"query": q, "mode": m, "k": 5} for q in ("a red circle", "green", "a yellow square")
                for m in ("sparse", "dense", "hybrid")]
    image = base64.b64encode(png_bytes(draw_shape("blue", "triangle"))).decode()
    requests += [{"image": image, "mode": m, "k": 5} for m in ("sparse", "dense", "hybrid")]
    sequential = [client.post("/search", json=r).json()["hits"] for r in requests]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda r: client.post("/search", json=r), requests * 3))
    assert all(r.status_code == 200 for r in responses)
    assert [[h["id"] for h in r.json()["hits"]] for r in responses] == [[h["id"] for h in s] for s in sequential] * 3


# -------------------------------------------------------------------------------------------------- hot swap


def test_a_newly_published_index_is_swapped_in_without_dropping_requests(tmp_path, tiny_encoder):
    index_dir = tmp_path / "live"
    first = write_source(tmp_path / "a", [("red", "circle"), ("blue", "square")])
    indexer.run(IndexJob(first, index_dir, options=OPTIONS), encoder=tiny_encoder)
    registry = IndexRegistry({"live": index_dir})
    old = registry.current()
    statuses: list[int] = []
    versions: set[int] = set()
    stop = threading.Event()
    with make_client(registry, reload_interval_s=0.1) as c:
        def hammer() -> None:
            while not stop.is_set():
                response = c.post("/search", json={"query": "a shape", "mode": "hybrid", "k": 3})
                statuses.append(response.status_code)
                if response.status_code == 200:
                    versions.add(response.json()["version"])

        workers = [threading.Thread(target=hammer) for _ in range(3)]
        for worker in workers:
            worker.start()
        try:
            more = write_source(tmp_path / "b", [("green", "triangle")])
            indexer.run(IndexJob(more, index_dir, append=True, options=OPTIONS), encoder=tiny_encoder)  # manifest swap
            wait_for_version(c, 2)
            assert c.get("/documents/green/triangle").status_code == 200
            rebuilt = write_source(tmp_path / "c", [("yellow", "square")])
            indexer.run(IndexJob(rebuilt, index_dir, overwrite=True, options=OPTIONS), encoder=tiny_encoder)  # rename
            wait_for_version(c, 3)
            time.sleep(0.3)
        finally:
            stop.set()
            for worker in workers:
                worker.join()
        assert c.get("/documents/red/circle").status_code == 404
        assert c.get("/thumbnails/yellow/square").status_code == 200
        assert [h["id"] for h in c.post("/search", json={"query": "x", "k": 5}).json()["hits"]] == ["yellow/square"]
    assert statuses and set(statuses) == {200}, f"{statuses.count(200)} of {len(statuses)} requests answered 200"
    assert 3 in versions
    assert old.closed and not registry.current().closed


def wait_for_version(client: TestClient, version: int, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/readyz").json()["indexes"]["live"]["version"] == version:
            return
        time.sleep(0.05)
    raise AssertionError(f"version {version} was not swapped in within {timeout_s} s: {client.get('/readyz').json()}")


def test_a_broken_new_version_is_reported_and_the_old_one_keeps_serving(tmp_path, tiny_encoder):
    index_dir = tmp_path / "live"
    indexer.run(IndexJob(write_source(tmp_path / "a", [("red", "circle")]), index_dir, options=OPTIONS),
                encoder=tiny_encoder)
    registry = IndexRegistry({"live": index_dir})
    manifest = index_dir / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"shards": [', '"shards": [{"name": "gone", "count": 1, '
                                                                       '"dense": {"kind": "flat"}}, ', 1))
    assert registry.refresh() == []
    with make_client(registry) as c:
        ready = c.get("/readyz").json()
        assert ready["indexes"]["live"]["version"] == 1 and "gone" in ready["reload_errors"]["live"]
        assert str(tmp_path) not in c.get("/readyz").text  # no key needed here: no folder shown
        assert c.post("/search", json={"query": "x", "k": 1}).json()["hits"][0]["id"] == "red/circle"


# ------------------------------------------------------------------------------------------------ load test


def load_benchmark_module():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "load_test.py"
    spec = importlib.util.spec_from_file_location("benchmarks_load_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_the_load_test_measures_a_real_server_and_counts_failures(registry):
    load_test = load_benchmark_module()
    with serve_in_background(create_app(registry, ServerSettings(reload_interval_s=0))) as url:
        requests = load_test.query_mix(url, ["a red circle", "blue", "a square", "green"], k=3)
        good = load_test.run_load(url, requests, "hybrid", clients=3, seconds=1.0)
        bad = load_test.run_load(url, requests, "no-such-mode", clients=2, seconds=0.3)
    assert [sorted(body) for body in requests] == [["k", "query"]] * 3 + [["image", "k"], ["k", "query"]]
    assert good.errors == [] and good.requests >= 3 and len(good.latencies_s) == good.requests
    assert bad.latencies_s == [] and bad.requests >= 2 and all(e.startswith("422") for e in bad.errors)
    table = load_test.format_table([good, bad]).splitlines()
    assert table[0].startswith("| server | mode | clients") and table[2].split(" | ")[1] == "hybrid"
    assert table[3].split(" | ")[-1] == f"{bad.requests} |"
    alone = load_test.ModeResult(mode="hybrid", clients=1, seconds=1.0, server="no batching",
                                 latencies_s=[0.1] * 10)
    rows = [load_test.ModeResult(mode="hybrid", clients=1, seconds=1.0, latencies_s=[0.1] * 10), good,
            alone, load_test.ModeResult(mode="hybrid", clients=3, seconds=1.0, server="no batching",
                                        latencies_s=[0.3] * 10)]
    ratios = load_test.format_ratios(rows, clients=3).splitlines()
    assert ratios[2].split(" | ")[1:3] == [f"{len(good.latencies_s) / 10:.2f}", "1.00"]


def test_serve_refuses_contradictory_limits_before_opening_anything(tmp_path):
    from typer.testing import CliRunner

    from stair_search.cli import app

    result = CliRunner().invoke(app, ["serve", str(tmp_path / "no-index"), "--max-body-bytes", "1000",
                                      "--max-image-bytes", "5000"])
    assert result.exit_code == 2
    assert "Invalid value" in result.output and "max_body_bytes" in result.output


def test_more_searches_than_the_in_flight_cap_answer_503_not_a_growing_queue(registry):
    """The batching encoder's forward lock is held, so the first search waits inside the pool holding the only
    slot."""
    encoder_lock = registry.current().router.encoder._alone
    statuses: list[int] = []
    with make_client(registry, limits=Limits(max_in_flight=1)) as c:
        def search(query: str) -> None:
            response = c.post("/search", json={"query": query, "mode": "dense", "k": 1})
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1" and "busy" in response.json()["detail"]

        encoder_lock.acquire()
        try:
            workers = [threading.Thread(target=search, args=(f"in flight {i}",)) for i in range(2)]
            for worker in workers:
                worker.start()
            deadline = time.monotonic() + 30
            while not statuses and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            encoder_lock.release()
        for worker in workers:
            worker.join()
    assert statuses == [503, 200]


def test_a_list_field_given_both_in_the_json_request_and_as_a_form_field_is_merged_not_a_500(client):
    image = png_bytes(draw_shape("red", "circle"))
    response = client.post("/search", files={"image": ("q.png", image, "image/png")},
                           data={"request": '{"query": "red", "rerank": "bsap", "mode": "dense", "k": 2}',
                                 "rerank": "ssp"})
    assert response.status_code == 200, response.text
    assert response.json()["decision"]["rerank"] == ["bsap", "ssp"]
    labels = client.post("/classify", files={"image": ("q.png", image, "image/png")},
                         data={"request": '{"labels": "red circle"}', "labels": "blue square"})
    assert labels.status_code == 200, labels.text
    assert {entry["label"] for entry in labels.json()["labels"]} == {"red circle", "blue square"}
