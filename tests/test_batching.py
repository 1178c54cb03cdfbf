"""Dynamic batching of query encodes (server/batching.py): concurrent calls share forwards and each caller gets
exactly what encoding its own items alone gives; a failing item fails only its own call; the service's
concurrent searches answer what the library answers one by one."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server import IndexRegistry, ServerSettings, create_app
from server.batching import BatchingEncoder
from stair_search.index import IndexReader
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import draw_shape
from tests.test_server import shapes_index  # noqa: F401 - the API tests' index

TEXTS = [f"a {c} {s} number {i}" for i, (c, s) in enumerate(
    [(c, s) for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "star")])]


def concurrently(function, items: list, workers: int = 16) -> list:
    """``function(item)`` for every item from ``workers`` threads released together."""
    start = threading.Barrier(workers)

    def run(item):
        start.wait()
        return function(item)

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(run, items))


def assert_same(batched, alone) -> None:
    np.testing.assert_allclose(batched.dense, alone.dense, atol=1e-5)
    assert [set(s) for s in batched.sparse] == [set(s) for s in alone.sparse]
    for mine, theirs in zip(batched.sparse, alone.sparse, strict=True):
        assert mine == pytest.approx(theirs, abs=1e-5)


def test_concurrent_encodes_share_forwards_and_equal_one_by_one(tiny_encoder):
    batcher = BatchingEncoder(tiny_encoder, max_wait_s=0.005)
    try:
        results = concurrently(lambda text: batcher.encode_texts([text]), TEXTS)
        for text, result in zip(TEXTS, results, strict=True):
            assert_same(result, tiny_encoder.encode_texts([text]))
        assert batcher.calls == len(TEXTS) and batcher.batches < len(TEXTS)  # some forwards served several
        images = [draw_shape(c, s) for c in ("red", "blue") for s in ("circle", "square")] * 4
        encoded = concurrently(lambda image: batcher.encode_images([image]), images)
        for image, result in zip(images, encoded, strict=True):
            alone = tiny_encoder.encode_images([image])
            assert_same(result, alone)
            np.testing.assert_allclose(result.local, alone.local, atol=1e-3)
        embedded = concurrently(lambda text: batcher.embed_texts([text, text.upper()]), TEXTS)
        for text, result in zip(TEXTS, embedded, strict=True):
            np.testing.assert_allclose(result, tiny_encoder.embed_texts([text, text.upper()]), atol=1e-5)
    finally:
        batcher.close()


def test_a_failing_item_fails_only_its_own_call(tiny_encoder):
    batcher = BatchingEncoder(tiny_encoder, max_wait_s=0.005)
    items = [draw_shape("red", "circle"), "not an image", draw_shape("blue", "square"), draw_shape("red", "star")] * 3

    def encode(item):
        try:
            return batcher.encode_images([item])
        except Exception as exc:
            return exc

    try:
        results = concurrently(encode, items, workers=len(items))
        for item, result in zip(items, results, strict=True):
            if isinstance(item, str):
                assert isinstance(result, Exception)
            else:
                assert_same(result, tiny_encoder.encode_images([item]))
    finally:
        batcher.close()


def test_unbatched_runs_each_call_alone(tiny_encoder):
    batcher = BatchingEncoder(tiny_encoder, enabled=False)
    results = concurrently(lambda text: batcher.encode_texts([text]), TEXTS[:6], workers=6)
    for text, result in zip(TEXTS, results, strict=False):
        assert_same(result, tiny_encoder.encode_texts([text]))
    assert batcher.batches == 0


@pytest.mark.parametrize("batching", [True, False])
def test_concurrent_searches_answer_what_the_library_answers(shapes_index, tiny_encoder, batching):  # noqa: F811
    library = QueryRouter(IndexReader(shapes_index), tiny_encoder)
    queries = [(text, mode) for text in TEXTS[:8] for mode in ("sparse", "dense", "hybrid")]
    expected = [[h.id for h in library.search(SearchRequest(text=t, mode=m, k=5)).hits] for t, m in queries]
    registry = IndexRegistry({"shapes": shapes_index}, batching=batching)
    with TestClient(create_app(registry, ServerSettings(reload_interval_s=0, search_threads=8))) as client:
        answers = concurrently(lambda q: client.post("/search", json={"query": q[0], "mode": q[1], "k": 5}).json(),
                               queries, workers=12)
    assert [[h["id"] for h in a["hits"]] for a in answers] == expected
    encoder = registry.current("shapes").router.encoder
    assert (encoder.batches < encoder.calls) if batching else encoder.batches == 0
