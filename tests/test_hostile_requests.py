"""Hostile requests against the real HTTP service (uvicorn on loopback, the shapes index of test_server.py): issue
36's four multipart 500s exactly as reported, then a generated set of bad shapes (a wrong type in every field of
the search, batch and classify bodies, as JSON, in a multipart ``request`` field and as form fields; depth bombs;
huge strings; non-UTF-8 bytes; duplicate fields; broken multipart; wrong content types; empty bodies; NaN and
1e309; negative and huge k and offset; unknown fields; long query parameters). Every answer must be a 4xx with a
small JSON error, /metrics must count no 5xx, and a normal search must still answer afterwards."""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from pydantic import BaseModel, ValidationError

from server import ServerSettings, create_app
from server.background import serve_in_background
from server.schemas import BatchSearchRequest, ClassifyRequest, SearchRequest
from tests.conftest import draw_shape
from tests.test_server import png_bytes, registry, shapes_index  # noqa: F401 - fixtures shared with the API tests

MAX_ERROR_BYTES = 4096  # the largest error answer allowed, whatever was sent
DEEP = 5000
PNG = png_bytes(draw_shape("red", "circle"))
PNG64 = base64.b64encode(PNG).decode()
# Values of every JSON type, some of them huge or deep: each is sent in each field the schema refuses it for.
WRONG: tuple[Any, ...] = (None, True, 7, -1, 2.5, 1e300, 10**30, "", "x", "x" * 5000, [], [1], ["x", 2], {}, {"a": 1},
                          {"a": {"b": [1]}}, json.loads("[" * 40 + "]" * 40))
BASES: dict[str, tuple[type[BaseModel], dict[str, Any]]] = {
    "/search": (SearchRequest, {"query": "a red circle"}),
    "/classify": (ClassifyRequest, {"image": PNG64, "labels": ["red circle", "blue square"]}),
    "/search/batch": (BatchSearchRequest, {"requests": [{"query": "a red circle"}]}),
}


@dataclass
class Case:
    """One request: what it is, and how to send it (httpx keyword arguments)."""

    name: str
    path: str
    send: dict[str, Any] = field(default_factory=dict)


def as_json(name: str, path: str, body: Any) -> Case:
    return Case(name, path, {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}})


def raw(name: str, path: str, content: bytes, content_type: str | None) -> Case:
    return Case(name, path, {"content": content, "headers": {"content-type": content_type} if content_type else {}})


def multipart(name: str, path: str, fields: list[tuple[str, str]], image: bool = False) -> Case:
    """A multipart body as curl -F builds it: text fields in order (repeats kept), and the PNG as 'image'."""
    files = [(key, (None, value.encode())) for key, value in fields]
    files += [("image", ("a.png", PNG, "image/png"))] if image else []
    return Case(name, path, {"files": files})


def refused(model: type[BaseModel], body: Any, uploaded: bool = False) -> bool:
    """Whether the schema itself refuses ``body`` (what the server must answer 4xx for)."""
    try:
        model.model_validate_json(json.dumps(body), context={"uploaded_image": uploaded})
    except ValidationError:
        return True
    return False


# ------------------------------------------------------------------------------------------------ the cases


def reproductions() -> list[Case]:
    """Issue 36's D3, exactly (each answered 500)."""
    return [
        multipart("D3 rerank 5 in request + rerank form field", "/search",
                  [("request", '{"query":"heart","rerank":5}'), ("rerank", "bsap")]),
        multipart("D3 classify labels 7 in request + labels form field", "/classify",
                  [("request", '{"labels":7}'), ("labels", "a,b")], image=True),
        multipart("D3 request of 5,000 nested brackets", "/search", [("request", "[" * DEEP + "]" * DEEP)]),
        multipart("D3 filters 5,000 deep", "/search", [("query", "x"), ("filters", '{"a":' * DEEP + "1" + "}" * DEEP)]),
    ]


def wrong_types() -> Iterator[Case]:
    """Every field of every body with every value of WRONG the schema refuses: as JSON, and (search, classify)
    inside a multipart ``request`` field; a batch's inner search fields too."""
    for path, (model, base) in BASES.items():
        for name in model.model_fields:
            for value in WRONG:
                body = base | {name: value}
                if refused(model, body):
                    yield as_json(f"json {path} {name}={str(value)[:20]}", path, body)
                if path == "/search/batch":
                    continue
                upload = path == "/classify"
                in_request = {k: v for k, v in body.items() if not (upload and k == "image")}
                if refused(model, in_request, uploaded=upload):
                    yield multipart(f"request field {path} {name}={str(value)[:20]}", path,
                                    [("request", json.dumps(in_request))], image=upload)
    for name in SearchRequest.model_fields:
        for value in WRONG:
            inner = {"query": "a red circle", name: value}
            if refused(SearchRequest, inner):
                yield as_json(f"json batch inner {name}={str(value)[:20]}", "/search/batch", {"requests": [inner]})


# Form-field text the schema refuses for each field, as a client would type it (curl -F name=value).
FORM_TEXT: dict[str, tuple[str, ...]] = {
    "k": ("", "abc", "0", "-1", "101", "1e309", "NaN", "5.5", "9" * 5000, "[1]"),
    "offset": ("-1", "1001", "1e30", "inf", "x"),
    "alpha": ("2", "-0.1", "NaN", "inf", "-inf", "1e309", "half"),
    "feedback": ("-1", "101", "1.5", "lots"),
    "mode": ("fast", "", "SPARSE ", "x" * 5000),
    "fusion": ("max", "[]"),
    "rerank": ("magic", "bsap,magic", "x" * 5000, "bsap,ssp,comclip,s3,bsap,magic"),
    "explain": ("maybe", "2", "[]"),
    "partial": ("perhaps",),
    "filters": ("{broken", "[]", "null", "7", '"colour"', '{"colour": {"nested": {"x": 1}}}', "NaN",
                '{"n": 1e309}', '{"n": Infinity}', "[" * 40 + "]" * 40, '{"a": ' + "9" * 5000 + "}"),
    "vector": ("1,2,3", "[NaN]", "[1e309]", '["a"]', "{}", "[" + ",".join(["1"] * 9000) + "]"),
    "sparse": ("pot", '{"pot": "high"}', '{"pot": NaN}', "[1]"),
    "like": ("x" * 1001,),
    "query": ("x" * 1001,),
    "image_url": ("x" * 3000,),
    "unknown": ("1",),
    "request": ("null", "[]", '[["query", "x"]]', "7", '"x"', "{", '{"request": {}}', '{"query": "x"}{'),
}


def form_fields() -> Iterator[Case]:
    for name, texts in FORM_TEXT.items():
        for text in texts:
            query = [] if name in ("query", "like", "vector", "sparse", "request") else [("query", "a red circle")]
            yield multipart(f"form {name}={text[:20]}", "/search", [*query, (name, text)])
    yield multipart("form classify labels of one", "/classify", [("labels", "a")], image=True)
    yield multipart("form classify labels blank", "/classify", [("labels", " , ,")], image=True)
    yield multipart("form classify no image", "/classify", [("labels", "a,b")])
    yield multipart("form classify image twice", "/classify", [("labels", "a,b"), ("image", PNG64)], image=True)


def duplicates() -> list[Case]:
    return [
        multipart("dup query form fields", "/search", [("query", "a"), ("query", "b")]),
        multipart("dup k form fields", "/search", [("query", "a"), ("k", "3"), ("k", "4")]),
        multipart("dup request fields", "/search", [("request", '{"query": "a"}'), ("request", '{"query": "b"}')]),
        multipart("dup request + form field", "/search", [("request", '{"query": "a", "k": 3}'), ("k", "4")]),
        multipart("dup filters", "/search", [("query", "a"), ("filters", "{}"), ("filters", "{}")]),
        multipart("dup labels string + list of int", "/classify", [("request", '{"labels": [1, 2]}'),
                                                                   ("labels", "a")], image=True),
        raw("dup JSON keys, last one bad", "/search", b'{"query": "x", "k": 5, "k": -1}', "application/json"),
        Case("dup image files", "/search", {"files": [("image", ("a.png", PNG, "image/png")),
                                                      ("image", ("b.png", PNG, "image/png"))]}),
        Case("file under another name", "/search", {"files": [("picture", ("a.png", PNG, "image/png"))]}),
        Case("request as a file", "/search", {"files": [("request", ("r.json", b'{"query": "x"}', "text/plain"))]}),
    ]


def structure() -> list[Case]:
    """Depth bombs, huge strings and names, non-UTF-8, broken multipart, content types, empty bodies, numbers."""
    deep_object = '{"a":' * DEEP + "1" + "}" * DEEP
    part = b'--B\r\nContent-Disposition: form-data; name="query"\r\n\r\nx\r\n'
    return [
        raw("json depth bomb list", "/search", b"[" * DEEP + b"]" * DEEP, "application/json"),
        raw("json depth bomb object", "/search", deep_object.encode(), "application/json"),
        raw("json filters depth bomb", "/search", b'{"query": "x", "filters": ' + deep_object.encode() + b"}",
            "application/json"),
        raw("batch depth bomb", "/search/batch", b'{"requests": ' + b"[" * DEEP + b"]" * DEEP + b"}",
            "application/json"),
        raw("classify depth bomb", "/classify", b'{"labels": ' + b"[" * DEEP + b"]" * DEEP + b"}", "application/json"),
        as_json("query of 1 MB", "/search", {"query": "x" * 1_000_000}),
        as_json("unknown field named 100 KB", "/search", {"query": "x", "f" * 100_000: 1}),
        as_json("filter field named 100 KB", "/search", {"query": "x", "filters": {"f" * 100_000: "v"}}),
        as_json("index named 100 KB", "/search", {"query": "x", "index": "i" * 100_000}),
        as_json("like of 100 KB", "/search", {"like": "l" * 100_000}),
        as_json("10 filters of 5 KB names", "/search",
                {"query": "x", "filters": {f"{i}" * 5000: 1 for i in range(10)}}),
        as_json("vector of 8,192 strings", "/search", {"vector": ["a"] * 8192}),
        as_json("101 labels", "/classify", {"image": PNG64, "labels": [f"l{i}" for i in range(101)]}),
        as_json("33 searches", "/search/batch", {"requests": [{"query": "x"}] * 33}),
        raw("non-UTF-8 JSON", "/search", b'{"query": "\xff\xfe"}', "application/json"),
        raw("non-UTF-8 request field", "/search", b'--B\r\nContent-Disposition: form-data; name="request"\r\n\r\n'
            b'\xff{"query"\r\n--B--\r\n', "multipart/form-data; boundary=B"),
        raw("non-UTF-8 field name", "/search", b'--B\r\nContent-Disposition: form-data; name="\xff\xfe"\r\n\r\n'
            b"x\r\n--B--\r\n", "multipart/form-data; boundary=B"),
        raw("multipart without boundary", "/search", part + b"--B--\r\n", "multipart/form-data"),
        raw("multipart wrong boundary", "/search", part + b"--B--\r\n", "multipart/form-data; boundary=Z"),
        raw("multipart cut short", "/search", part[:30], "multipart/form-data; boundary=B"),
        raw("multipart no closing boundary", "/search", part, "multipart/form-data; boundary=B"),
        raw("multipart empty", "/search", b"", "multipart/form-data; boundary=B"),
        raw("multipart only the end", "/search", b"--B--\r\n", "multipart/form-data; boundary=B"),
        raw("multipart no disposition", "/search", b"--B\r\n\r\nx\r\n--B--\r\n", "multipart/form-data; boundary=B"),
        raw("multipart 40 fields", "/search", b"".join(
            f'--B\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n'.encode() for i in range(40))
            + b"--B--\r\n", "multipart/form-data; boundary=B"),
        raw("multipart field over 1 MB", "/search", b'--B\r\nContent-Disposition: form-data; name="query"\r\n\r\n'
            + b"x" * 1_100_000 + b"\r\n--B--\r\n", "multipart/form-data; boundary=B"),
        raw("multipart to batch", "/search/batch", part + b"--B--\r\n", "multipart/form-data; boundary=B"),
        raw("text/plain", "/search", b"query=x", "text/plain"),
        raw("urlencoded form", "/search", b"query=x&k=3", "application/x-www-form-urlencoded"),
        raw("xml", "/search/batch", b"<requests/>", "application/xml"),
        raw("raw png", "/classify", PNG, "image/png"),
        raw("no content type, not JSON", "/search", b"\x00\x01garbage", None),
        raw("content type of 10 KB", "/search", b"{}", "application/" + "x" * 10_000),
        raw("empty JSON body", "/search", b"", "application/json"),
        raw("blank JSON body", "/search/batch", b" \r\n\t ", "application/json"),
        raw("JSON null", "/search", b"null", "application/json"),
        raw("JSON list", "/classify", b"[]", "application/json"),
        raw("JSON string", "/search/batch", b'"x"', "application/json"),
        raw("JSON empty object", "/search", b"{}", "application/json"),
        raw("JSON NaN k", "/search", b'{"query": "x", "k": NaN}', "application/json"),
        raw("JSON Infinity alpha", "/search", b'{"query": "x", "alpha": Infinity}', "application/json"),
        raw("JSON 1e309 offset", "/search", b'{"query": "x", "offset": 1e309}', "application/json"),
        raw("JSON -1e309 feedback", "/search", b'{"query": "x", "feedback": -1e309}', "application/json"),
        raw("JSON NaN in vector", "/search", b'{"vector": [NaN]}', "application/json"),
        raw("JSON Infinity in sparse", "/search", b'{"sparse": {"pot": Infinity}}', "application/json"),
        raw("JSON k of 5,000 digits", "/search", b'{"query": "x", "k": ' + b"9" * 5000 + b"}", "application/json"),
        *(as_json(f"k={k}", "/search", {"query": "x", "k": k}) for k in (-1, 0, 101, 10**18, 2**64, -(2**63))),
        *(as_json(f"offset={o}", "/search", {"query": "x", "offset": o}) for o in (-1, 1001, 10**30)),
        as_json("batch k=-5", "/search/batch", {"requests": [{"query": "x", "k": -5}]}),
        as_json("batch with image_url", "/search/batch", {"requests": [{"image_url": "http://x/a.png"}]}),
        as_json("unknown field", "/search", {"query": "x", "evil": 1}),
        as_json("unknown batch field", "/search/batch", {"requests": [{"query": "x"}], "parallel": True}),
        as_json("unknown classify field", "/classify", {"image": PNG64, "labels": ["a", "b"], "k": 5}),
        as_json("unknown filter operator", "/search", {"query": "x", "filters": {"colour": {"regex": ".*"}}}),
        as_json("unknown filter field", "/search", {"query": "x", "filters": {"nope": 1}}),
        as_json("like unknown id", "/search", {"like": "nope"}),
    ]


def query_parameters() -> list[Case]:
    long = "9" * 10_000  # a URL of 100 KB never reaches the app: uvicorn refuses it first (its own 400)
    return [Case("thumbnail size of 10 KB", f"/thumbnails/red%2Fcircle?size={long}", {"method": "GET"}),
            Case("thumbnail size word", "/thumbnails/red%2Fcircle?size=abc", {"method": "GET"}),
            Case("document index of 10 KB", f"/documents/red%2Fcircle?index={'y' * 10_000}", {"method": "GET"}),
            Case("document id of 10 KB", f"/documents/{'d' * 10_000}", {"method": "GET"}),
            Case("thumbnail of /etc/passwd", "/thumbnails/%2Fetc%2Fpasswd", {"method": "GET"})]


def all_cases() -> list[Case]:
    return [*reproductions(), *wrong_types(), *form_fields(), *duplicates(), *structure(), *query_parameters()]


# ------------------------------------------------------------------------------------------------ the test


@pytest.fixture(scope="module")
def served(registry) -> Iterator[httpx.Client]:  # noqa: F811
    with serve_in_background(create_app(registry, ServerSettings(reload_interval_s=0))) as url, \
            httpx.Client(base_url=url, timeout=60) as client:
        yield client


def send(client: httpx.Client, case: Case) -> httpx.Response:
    options = dict(case.send)
    return client.request(options.pop("method", "POST"), case.path, **options)


def test_the_four_reported_multipart_500s_answer_422_naming_the_field(served):
    answers = [send(served, case) for case in reproductions()]
    assert [a.status_code for a in answers] == [422] * 4, [a.text[:300] for a in answers]
    details = [a.json()["detail"] for a in answers]
    assert details[0].startswith("field 'rerank.0'") and details[1].startswith("field 'labels.0'")
    assert "'request' nests deeper than" in details[2] and "'filters' nests deeper than" in details[3]


def test_every_hostile_request_answers_a_small_json_4xx_and_the_server_still_searches(served):
    cases = all_cases()
    assert len(cases) > 400 and len({case.name for case in cases}) > 300  # the generated set is not empty
    wrong = []
    for case in cases:
        answer = send(served, case)
        if not refusal(answer):
            wrong.append(f"{case.name}: {answer.status_code} {answer.text[:200]}")
    assert wrong == [], f"{len(wrong)} of {len(cases)} cases:\n" + "\n".join(wrong[:20])
    normal = served.post("/search", json={"query": "a red circle", "mode": "hybrid", "k": 3})
    assert normal.status_code == 200 and len(normal.json()["hits"]) == 3
    counted = server_errors(served.get("/metrics").text)
    assert counted == 0, f"/metrics counts {counted} 5xx answers"


def refusal(answer: httpx.Response) -> bool:
    """A small JSON 4xx naming what is wrong; or, for a batch whose envelope is sound, a 200 in which every
    search is such an error in its place (a search of a batch fails alone)."""
    if answer.headers.get("content-type") != "application/json" or len(answer.content) > MAX_ERROR_BYTES:
        return False
    body = answer.json()
    if answer.status_code == 200 and isinstance(body.get("results"), list) and body["results"]:
        return all(400 <= r.get("status", 0) < 500 and isinstance(r.get("detail"), str) and "hits" not in r
                   for r in body["results"])
    return 400 <= answer.status_code < 500 and isinstance(body.get("detail"), str)


def server_errors(metrics: str) -> float:
    """The 5xx answers /metrics counts, over every route."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith("stair_http_requests_total{") and 'status="5' in line)


def test_validation_answers_are_one_line_naming_the_field_with_a_bounded_list(served):
    answer = served.post("/search", json={"vector": ["a"] * 8192})
    body = answer.json()
    assert answer.status_code == 422 and "\n" not in body["detail"]
    assert body["detail"].startswith("field 'vector.0': Input should be a valid number")
    assert "8191 more" in body["detail"]
    assert len(body["errors"]) == 8 and len(answer.content) < 2000
    echoed = served.get("/thumbnails/red%2Fcircle", params={"size": "9" * 10_000}).json()
    assert echoed["detail"].startswith("query parameter 'size'") and len(echoed["errors"][0]["input"]) < 100


def test_error_answers_name_indexes_by_their_served_names_not_their_folders(served, shapes_index):  # noqa: F811
    folder = str(shapes_index)
    like = served.post("/search", json={"like": "nope"})
    assert like.status_code == 404 and like.json()["detail"] == "no document with id 'nope' in index 'shapes'"
    for answer in (like, served.get("/readyz"), served.get("/thumbnails/nope"), served.get("/documents/nope")):
        assert folder not in answer.text and str(shapes_index.parent) not in answer.text


def test_a_finite_number_check_names_the_form_field(served):
    answer = served.post("/search", files=[("request", (None, b'{"query": "x", "k": 1e309}'))])
    assert answer.status_code == 422 and "'request'" in answer.json()["detail"] and "finite" in answer.json()["detail"]
    assert math.isfinite(float(served.post("/search", json={"query": "x", "k": 1}).json()["hits"][0]["score"]))
