"""Golden test: the exact search behaviour, recorded in tests/golden/search.json, so a refactor that must not change
behaviour can prove it answers every case as the code it replaces did.

Two fixed indexes are built here with the tiny real model, deterministically: ``main`` (24 drawn shapes in 3
shards, metadata colour / shape / background / n, captions for the text route, 2 documents deleted: tombstones)
and ``grounded`` (a grounded variant of the tiny model: ``query_weights`` "idf"); the HTTP app serves ``main``.
Each case is ``CASES[name] = Case(kind, kwargs, on)``; :func:`run_case` is the one place that calls the library
(``search``, ``search_vectors``, ``more_like``) or the HTTP app, and :func:`describe` the one place that turns an
answer into JSON. Ids, ranks, order, modes, decisions, tokens and words compare exactly; floats within
``rel=1e-6, abs=1e-6`` (FAISS / BLAS may differ in the last bits between processes).

Record again (only after a change that is meant to change behaviour):
``python tests/test_golden.py --record`` or ``STAIR_GOLDEN_RECORD=1 python -m pytest tests/test_golden.py``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

if __name__ == "__main__":  # ``python tests/test_golden.py``: the repository root on the path, for ``tests.*``
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stair_search.retrieve import SearchRequest
from tests.conftest import COLOURS, TINY_CONFIG, draw_shape

GOLDEN = Path(__file__).parent / "golden" / "search.json"
RECORD_ENV = "STAIR_GOLDEN_RECORD"
RECORDING = os.environ.get(RECORD_ENV, "") not in ("", "0")
REL, ABS = 1e-6, 1e-6
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ("white", "black")
DELETED = ("red-circle-white", "yellow-triangle-black")  # one in the first shard, one in the last
WORDNET_FIX = "apt-get install wordnet-base"


class Case(NamedTuple):
    kind: str  # search | vectors | more_like | http
    kwargs: dict[str, Any]
    on: str = "main"  # main | grounded (routers) | http (the app serving main)
    needs_wordnet: bool = False  # S^3: skipped (naming the fix) where WordNet is not installed


def hybrid(text: str, **options: Any) -> dict[str, Any]:
    return {"text": text, "mode": "hybrid", "k": 8} | options


RERANKED = {"text": "a green square", "mode": "hybrid", "k": 8, "depth": 12}  # both routes have hits
SPARSE_QUERY = {"pot": 1.0, "define": 0.5, "delhi": 0.8}  # tokens the drawn images' sparse vectors hold

CASES: dict[str, Case] = {
    # ---- modes
    "sparse": Case("search", {"text": "pot", "mode": "sparse", "k": 8}),
    "sparse_explain": Case("search", {"text": "green square", "mode": "sparse", "k": 5, "explain": True}),
    "sparse_image": Case("search", {"image": ("red", "circle"), "mode": "sparse", "k": 6, "explain": True}),
    "dense": Case("search", {"text": "a blue square", "mode": "dense", "k": 6}),
    "hybrid_rrf": Case("search", hybrid("a green triangle")),
    "hybrid_rrf_k10": Case("search", hybrid("pot", rrf_k=10)),
    "hybrid_convex": Case("search", hybrid("a green triangle", fusion="convex", alpha=0.3)),
    "hybrid_convex_sparse_heavy": Case("search", hybrid("pot", fusion="convex", alpha=0.9)),
    "hybrid_explain": Case("search", hybrid("yellow shape", k=5, explain=True)),
    "auto_keyword": Case("search", {"text": "red", "k": 8}),
    "auto_keyword_no_text_route": Case("search", {"text": "red", "k": 8, "use_text": False}),
    "auto_descriptive": Case("search", {"text": "a bright yellow shape", "k": 8}),
    "auto_relational": Case("search", {"text": "a red circle next to a blue square", "k": 8}),
    "auto_explain": Case("search", {"text": "red circle", "k": 6, "explain": True}),
    "text_mode": Case("search", {"text": "yellow triangle", "mode": "text", "k": 8, "explain": True}),
    "text_mode_deleted_doc": Case("search", {"text": "red circles on white", "mode": "text", "k": 5}),
    "text_mode_stop_words_only": Case("search", {"text": "the of", "mode": "text"}),
    "auto_image": Case("search", {"image": ("red", "circle"), "k": 6}),
    "auto_text_and_image": Case("search", {"text": "blue", "image": ("red", "square"), "k": 6}),
    "hybrid_text_and_image": Case("search", {"text": "blue", "image": ("red", "square"), "mode": "hybrid",
                                             "k": 6}),
    "dense_image_black": Case("search", {"image": ("green", "triangle", "black"), "mode": "dense", "k": 5}),
    # ---- filters
    "filter_equality": Case("search", {"text": "a red circle", "mode": "dense", "k": 5,
                                       "filters": {"colour": "red"}}),
    "filter_any_of_list": Case("search", hybrid("pot", filters={"shape": ["circle", "square"]})),
    "filter_range": Case("search", hybrid("a blue square", filters={"n": {"gte": 5, "lt": 15}})),
    "filter_range_past_the_deleted": Case("search", {"text": "a yellow triangle", "mode": "dense", "k": 10,
                                                     "filters": {"n": {"gte": 20}}}),
    "filter_combined_auto": Case("search", {"text": "red", "k": 8,
                                            "filters": {"colour": ["red", "blue"], "background": "black"}}),
    "filter_text_mode": Case("search", {"text": "circle", "mode": "text", "k": 8,
                                        "filters": {"background": "white"}}),
    "filter_unknown_field": Case("search", {"text": "red", "mode": "dense", "filters": {"material": "wood"}}),
    # ---- paging, feedback
    "page_hybrid": Case("search", hybrid("a blue square", k=4, offset=4)),
    "page_dense": Case("search", {"text": "a blue square", "mode": "dense", "k": 3, "offset": 6}),
    "feedback_hybrid": Case("search", hybrid("a green square", feedback=2)),
    "feedback_dense": Case("search", {"text": "a red circle", "mode": "dense", "k": 8, "feedback": 2}),
    "feedback_sparse_refused": Case("search", {"text": "pot", "mode": "sparse", "feedback": 2}),
    # ---- rerankers
    "rerank_bsap": Case("search", RERANKED | {"rerank": ["bsap"]}),
    "rerank_ssp": Case("search", RERANKED | {"rerank": ["ssp"]}),
    "rerank_comclip": Case("search", RERANKED | {"rerank": ["comclip"]}),
    "rerank_s3": Case("search", RERANKED | {"rerank": ["s3"]}, needs_wordnet=True),
    "rerank_s3_sparse_expansion": Case("search", {"text": "pot shape", "mode": "sparse", "k": 6, "rerank": ["s3"],
                                                  "explain": True}, needs_wordnet=True),
    "rerank_several": Case("search", RERANKED | {"rerank": ["bsap", "ssp", "comclip"]}),
    "rerank_all_four": Case("search", RERANKED | {"rerank": ["comclip", "s3", "bsap", "ssp"]}, needs_wordnet=True),
    "rerank_depth_below_k": Case("search", {"text": "a blue square", "mode": "dense", "k": 8, "depth": 4,
                                            "rerank": ["bsap", "ssp"]}),
    "rerank_auto_plus_requested": Case("search", {"text": "a red circle next to a blue square", "k": 6,
                                                  "rerank": ["bsap"], "explain": True}),
    # ---- vectors, more like this
    "vectors_dense": Case("vectors", {"dense_of": "a blue circle", "k": 6}),
    "vectors_sparse": Case("vectors", {"sparse": SPARSE_QUERY, "k": 6, "explain": True}),
    "vectors_both": Case("vectors", {"dense_of": "a blue circle", "sparse": SPARSE_QUERY, "k": 6}),
    "vectors_both_convex_filtered_paged": Case("vectors", {"dense_of": "a blue circle", "sparse": SPARSE_QUERY,
                                                           "fusion": "convex", "alpha": 0.4, "k": 4, "offset": 2,
                                                           "filters": {"background": "black"}}),
    "more_like": Case("more_like", {"doc_id": "blue-square-white", "k": 6}),
    "more_like_dense_filtered": Case("more_like", {"doc_id": "green-circle-black", "k": 5, "mode": "dense",
                                                   "filters": {"shape": "circle"}}),
    "more_like_deleted": Case("more_like", {"doc_id": DELETED[0]}),
    # ---- inference-free sparse queries (query_weights "idf", a grounded model)
    "idf_sparse": Case("search", {"text": "define the killer kong", "mode": "sparse", "k": 6, "explain": True},
                       on="grounded"),
    "idf_hybrid": Case("search", hybrid("define the killer kong", k=6), on="grounded"),
    "idf_auto": Case("search", {"text": "guinea cairo", "k": 6, "explain": True}, on="grounded"),
    "idf_auto_no_sparse_tokens": Case("search", {"text": "red circle", "k": 6}, on="grounded"),
    "idf_sparse_no_sparse_tokens": Case("search", {"text": "red circle", "mode": "sparse"}, on="grounded"),
    # ---- HTTP
    "http_search_text": Case("http", {"path": "/search", "json": {"query": "a green triangle", "mode": "hybrid",
                                                                   "k": 5}}, on="http"),
    "http_search_auto_filtered": Case("http", {"path": "/search", "json": {
        "query": "red", "k": 4, "filters": {"shape": ["circle", "square"], "n": {"lt": 20}}}}, on="http"),
    "http_search_image": Case("http", {"path": "/search", "json": {"image": ("green", "square"), "mode": "hybrid",
                                                                    "k": 4}}, on="http"),
    "http_like": Case("http", {"path": "/search", "json": {"like": "blue-square-white", "k": 4}}, on="http"),
    "http_batch": Case("http", {"path": "/search/batch", "json": {"requests": [
        {"query": "pot", "mode": "sparse", "k": 3},
        {"like": "green-circle-black", "mode": "dense", "k": 3},
        {"query": "a blue square", "mode": "dense", "k": 3, "offset": 2, "filters": {"background": "white"}}]}},
        on="http"),
}


# ------------------------------------------------------------------------------------------------ the one call


def run_case(target: Any, kind: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Run one case on ``target`` (a ``QueryRouter``, or the HTTP app's ``TestClient``) and describe its answer.
    The only place the library's query API is called: a refactor that moves it changes this function alone."""
    options = dict(kwargs)
    if kind == "search":
        if "image" in options:
            options["image"] = drawn(options["image"])
        return describe(target.search(SearchRequest(**options)))
    if kind == "vectors":
        if "dense_of" in options:
            options["dense"] = target.encoder.encode_texts([options.pop("dense_of")]).dense[0]
        return describe(target.search(SearchRequest(**options)))
    if kind == "more_like":
        return describe(target.search(SearchRequest(like=options.pop("doc_id"), **options)))
    if kind == "http":
        body = json.loads(json.dumps(options["json"]))
        for request in body.get("requests", [body]):
            if isinstance(request.get("image"), list):  # a drawn shape, sent as base64 PNG
                request["image"] = png_base64(drawn(request["image"]))
        response = target.post(options["path"], json=body)
        return {"status": response.status_code, "body": without_timings(response.json())}
    raise ValueError(f"unknown case kind {kind!r}")


def describe(response: Any) -> dict[str, Any]:
    """What a ``SearchResponse`` pins: mode, fusion, decision, the query's tokens and words, and every hit."""
    return {"mode": response.mode, "fusion": response.fusion, "decision": response.decision,
            "query_tokens": response.query_tokens, "query_words": response.query_words,
            "hits": [hit.to_dict() | {"matched_words": hit.matched_words} for hit in response.hits]}


def outcome(target: Any, case: Case, folders: dict[str, str]) -> Any:
    """The case's answer as JSON data, or the error it raised (type and message, with this run's folders written
    as their ``folders`` names: refusals are behaviour too)."""
    try:
        answer = run_case(target, case.kind, case.kwargs)
    except Exception as exc:  # recorded, and compared like any answer
        message = str(exc)
        for name, folder in folders.items():
            message = message.replace(folder, name)
        answer = {"error": type(exc).__name__, "message": message}
    return jsonable(answer)


def drawn(spec: tuple[str, ...] | list[str]) -> Any:
    """A case's query image: (colour, shape) or (colour, shape, background)."""
    colour, shape, *background = spec
    return draw_shape(colour, shape, background=background[0] if background else "white")


def png_base64(image: Any) -> str:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def without_timings(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: without_timings(v) for k, v in data.items() if k != "took_ms"}
    if isinstance(data, list):
        return [without_timings(v) for v in data]
    return data


def jsonable(data: Any) -> Any:
    """Plain JSON types (numpy scalars to Python numbers, tuples to lists), floats kept exact (repr)."""
    if isinstance(data, dict):
        return {str(k): jsonable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [jsonable(v) for v in data]
    if isinstance(data, np.ndarray):
        return jsonable(data.tolist())
    if isinstance(data, np.bool_):
        return bool(data)
    if isinstance(data, np.integer):
        return int(data)
    if isinstance(data, np.floating):
        return float(data)
    return data


# ------------------------------------------------------------------------------------------------ comparing


def differences(expected: Any, actual: Any, path: str) -> list[str]:
    """Where ``actual`` departs from ``expected``: floats within REL/ABS, everything else exactly."""
    number = (int, float)
    if (isinstance(expected, float) or isinstance(actual, float)) and isinstance(expected, number) \
            and isinstance(actual, number) and not isinstance(expected, bool) and not isinstance(actual, bool):
        return [] if actual == pytest.approx(expected, rel=REL, abs=ABS) else [
            f"{path}: expected {expected!r}, got {actual!r}"]
    if isinstance(expected, dict) and isinstance(actual, dict):
        found = [f"{path}: missing key {k!r} (expected {expected[k]!r})" for k in expected if k not in actual]
        found += [f"{path}: unexpected key {k!r} (got {actual[k]!r})" for k in actual if k not in expected]
        for key in expected:
            if key in actual:
                found += differences(expected[key], actual[key], f"{path}.{key}")
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        ids = [[h.get("id") for h in x if isinstance(h, dict)] for x in (expected, actual)]
        found = [f"{path}: {len(expected)} items expected, got {len(actual)}"
                 + (f" (ids expected {ids[0]}, got {ids[1]})" if any(ids) else "")] \
            if len(expected) != len(actual) else []
        for i, (e, a) in enumerate(zip(expected, actual, strict=False)):
            found += differences(e, a, f"{path}[{i}]")
        return found
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: expected {expected!r}, got {actual!r}"]
    return []


# ------------------------------------------------------------------------------------------------ fixtures


def build_index(folder: Path, encoder: Any, items: list[tuple[str, str, str]], shard_size: int,
                deleted: tuple[str, ...] = ()) -> Path:
    """Drawn shapes through the public writer: captions (the text route) and metadata, ``shard_size`` documents a
    shard (whole batches of that size), then ``deleted`` removed by the writer's delete (tombstones)."""
    from stair_search.index import FeatureRecord, IndexWriter, delete_documents

    records = [FeatureRecord(id=f"{c}-{s}-{bg}", source=f"drawn://{c}/{s}/{bg}", width=64, height=64,
                             caption=f"a {c} {s} on {bg}",
                             metadata={"colour": c, "shape": s, "background": bg, "n": n})
               for n, (c, s, bg) in enumerate(items)]
    images = [draw_shape(c, s, background=bg) for c, s, bg in items]
    with IndexWriter(folder, encoder.record, shard_size=shard_size) as writer:
        for start in range(0, len(records), shard_size):
            writer.add(records[start : start + shard_size],
                       encoder.encode_images(images[start : start + shard_size]))
        writer.commit()
    if deleted:
        result = delete_documents(folder, deleted)
        assert sorted(result.deleted) == sorted(deleted) and not result.unknown
    return folder


@pytest.fixture(scope="module")
def main_index(tmp_path_factory, tiny_encoder) -> Path:
    """24 drawn shapes (4 colours x 3 shapes x white / black), 3 shards of 8, 2 deleted."""
    items = [(c, s, bg) for bg in BACKGROUNDS for c in COLOURS for s in SHAPES]
    return build_index(tmp_path_factory.mktemp("golden") / "main", tiny_encoder, items, 8, DELETED)


@pytest.fixture(scope="module")
def grounded_router(tmp_path_factory) -> Any:
    """The tiny model made grounded (a text query's sparse vector holds only its own word-pieces): its router
    weighs sparse queries by the index's idf. 12 drawn shapes in 2 shards."""
    from stair_search.encode import Encoder
    from stair_search.index import IndexReader
    from stair_search.models import create_model
    from stair_search.retrieve import QueryRouter

    root = tmp_path_factory.mktemp("golden-grounded")
    config = root / "test-grounded.json"
    config.write_text(json.dumps(TINY_CONFIG | {"name": "test-grounded", "ground_text": True}))
    encoder = Encoder(create_model(str(config), device="cpu"), batch_size=4)
    items = [(c, s, "white") for c in COLOURS for s in SHAPES]
    router = QueryRouter(IndexReader(build_index(root / "index", encoder, items, 6)), encoder, query_weights="idf")
    yield router
    router.close()


@pytest.fixture(scope="module")
def targets(main_index, tiny_encoder, grounded_router, tmp_path_factory) -> Iterator[dict[str, Any]]:
    from fastapi.testclient import TestClient

    from server import IndexRegistry, ServerSettings, create_app
    from stair_search.index import IndexReader
    from stair_search.retrieve import QueryRouter

    router = QueryRouter(IndexReader(main_index), tiny_encoder)
    with TestClient(create_app(IndexRegistry({"golden": main_index}), ServerSettings(reload_interval_s=0))) as client:
        yield {"main": router, "grounded": grounded_router, "http": client,
               "folders": {"<main index>": str(main_index), "<tmp>": str(tmp_path_factory.getbasetemp())}}
    router.close()


def load_golden() -> dict[str, Any]:
    return json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}


@pytest.fixture(scope="module")
def golden() -> Iterator[dict[str, Any]]:
    """The recorded answers; when recording, the dict the cases write into (saved at the module's end, merged
    with what was recorded before: a partial run, or one without WordNet, keeps the other cases)."""
    recorded = load_golden()
    if not RECORDING:
        yield recorded
        return
    fresh: dict[str, Any] = {}
    yield fresh
    merged = recorded | fresh
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps({name: merged[name] for name in CASES if name in merged}, indent=1,
                                 ensure_ascii=False) + "\n")


def wordnet_installed() -> bool:
    folder = Path(os.environ.get("STAIR_WORDNET", "/usr/share/wordnet"))
    return (folder / "data.noun").is_file()


# ------------------------------------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", list(CASES))
def test_search_answers_as_recorded(name, targets, golden):
    case = CASES[name]
    if case.needs_wordnet and not wordnet_installed():
        pytest.skip(f"S^3 needs WordNet: {WORDNET_FIX} (or set STAIR_WORDNET)")
    actual = outcome(targets[case.on], case, targets["folders"])
    if RECORDING:
        golden[name] = actual
        return
    assert name in golden, f"case {name!r} has no recorded answer in {GOLDEN}: record it (python {__file__} --record)"
    found = differences(golden[name], actual, name)
    assert not found, (f"golden case {name!r} differs from {GOLDEN.name} in {len(found)} place(s):\n  "
                       + "\n  ".join(found[:30]) + ("\n  ..." if len(found) > 30 else ""))


def test_every_recorded_case_is_still_a_case():
    if RECORDING:
        pytest.skip("recording")
    stale = sorted(set(load_golden()) - set(CASES))
    assert not stale, f"{GOLDEN.name} holds cases no longer in CASES: {stale} (record again to drop them)"


def test_the_comparison_reports_what_differs():
    """The comparator itself: ids and order exact, floats within tolerance, each difference named by path."""
    expected = {"hits": [{"id": "a", "score": 0.5}, {"id": "b", "score": 0.25}], "mode": "hybrid"}
    assert differences(expected, {"hits": [{"id": "a", "score": 0.5 + 1e-9}, {"id": "b", "score": 0.25}],
                                  "mode": "hybrid"}, "c") == []
    swapped = differences(expected, {"hits": [{"id": "b", "score": 0.5}, {"id": "a", "score": 0.25}],
                                     "mode": "hybrid"}, "c")
    assert swapped == ["c.hits[0].id: expected 'a', got 'b'", "c.hits[1].id: expected 'b', got 'a'"]
    assert differences(expected, {"hits": expected["hits"][:1], "mode": "dense"}, "c") == [
        "c.hits: 2 items expected, got 1 (ids expected ['a', 'b'], got ['a'])",
        "c.mode: expected 'hybrid', got 'dense'"]
    assert differences({"x": 1.0}, {"x": 1.001}, "c") == ["c.x: expected 1.0, got 1.001"]
    assert differences({"x": None}, {"x": 0.0}, "c") == ["c.x: expected None, got 0.0"]


if __name__ == "__main__":
    if "--record" in sys.argv[1:]:
        os.environ[RECORD_ENV] = "1"
    sys.exit(pytest.main([__file__, "-q", *[a for a in sys.argv[1:] if a != "--record"]]))
