"""Inference-free sparse queries (query/weights.py): a grounded model's sparse-route query weighted by the index's
idf runs no text tower, searches exactly that lookup vector, and other modes still use the model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import indexer
from indexer import IndexJob
from server.batching import BatchingEncoder
from stair_search.encode import Encoder
from stair_search.index import IndexReader
from stair_search.models import create_model
from stair_search.query.weights import idf_table, lookup_query
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import TINY_CONFIG, draw_shape
from tests.test_server import COLOURS, OPTIONS, SHAPES, shapes_index, write_source  # noqa: F401 - its index


@pytest.fixture(scope="module")
def grounded(tmp_path_factory):
    """A tiny model whose query vectors hold only their own word-pieces, and an index of drawn shapes."""
    root = tmp_path_factory.mktemp("grounded")
    config = root / "grounded.json"
    config.write_text(json.dumps({**TINY_CONFIG, "name": "test-grounded", "ground_text": True, "text_floor": 0.3}))
    encoder = Encoder(create_model(str(config)))
    source = write_source(root / "images", [(c, s) for c in COLOURS for s in SHAPES])
    indexer.run(IndexJob(source, root / "index", options=OPTIONS), encoder=encoder)
    return encoder, IndexReader(root / "index")


def test_idf_is_positive_and_larger_for_rarer_tokens():
    table = idf_table(np.array([10, 5, 1, 0]), documents=10)
    assert np.all(table[:3] > 0) and np.all(np.diff(table[:3]) > 0)
    assert table[3] == 0  # held by no document: can match nothing, left out of queries


def held_words(index: IndexReader, count: int) -> list[str]:
    """Whole words the indexed images' vectors hold, most frequent first (the random heads emit such tokens)."""
    frequencies, _ = index.document_frequencies()
    vocabulary = index.vocabulary
    order = np.argsort(-frequencies, kind="stable")
    held = [vocabulary.tokens[i] for i in order if frequencies[i] and vocabulary.tokens[i].isalpha()
            and vocabulary.token_ids(vocabulary.tokens[i]) == [int(i)]]
    return held[:count]


def test_a_sparse_query_runs_no_text_tower_and_searches_the_lookup_vector(grounded):
    encoder, index = grounded
    common, rare = held_words(index, 40)[0], held_words(index, 40)[-1]
    text = f"the {common} and {rare}"
    counting = BatchingEncoder(encoder, enabled=False)
    free = QueryRouter(index, counting, query_weights="idf")
    response = free.search(SearchRequest(text=text, mode="sparse", k=5, explain=True))
    assert counting.calls == 0  # no encode call at all: neither the text tower nor the image tower
    frequencies, documents = index.document_frequencies()
    expected = lookup_query(index.vocabulary, text, idf_table(frequencies, documents))
    assert set(expected) == {common, rare} and response.query_tokens == expected  # "the", "and" left out
    assert expected[rare] > expected[common]  # the rarer word counts more
    exact = free.search(SearchRequest(sparse=expected, mode="sparse", k=5))
    assert response.hits and [(h.id, pytest.approx(h.score)) for h in response.hits] == [
        (h.id, h.score) for h in exact.hits]
    assert all(h.matched and set(h.matched) <= set(expected) for h in response.hits)
    assert QueryRouter(index, counting).query_weights == "idf"  # auto, for a grounded model
    model = QueryRouter(index, counting, query_weights="model").search(SearchRequest(text=text, mode="sparse", k=5))
    assert counting.calls == 1 and set(model.query_tokens) >= set(expected)  # the model path runs the tower


def test_every_mode_takes_the_lookup_and_the_towers_dense_embedding(grounded):
    encoder, index = grounded
    free, model = QueryRouter(index, encoder, query_weights="idf"), QueryRouter(index, encoder, query_weights="model")
    text = "a " + " ".join(held_words(index, 3))
    lookup = free.search(SearchRequest(text=text, mode="sparse", k=5)).query_tokens
    dense = encoder.embed_texts([text])[0]
    assert [h.id for h in free.search(SearchRequest(text=text, mode="dense", k=4)).hits] == \
           [h.id for h in model.search(SearchRequest(text=text, mode="dense", k=4)).hits]  # the same dense embedding
    hybrid = free.search(SearchRequest(text=text, mode="hybrid", k=6))
    by_vectors = free.search(SearchRequest(dense=dense, sparse=lookup, mode="hybrid", k=6))
    assert hybrid.query_tokens == lookup and [h.id for h in hybrid.hits] == [h.id for h in by_vectors.hits]
    assert [h.score for h in hybrid.hits] == pytest.approx([h.score for h in by_vectors.hits])
    reranked = free.search(SearchRequest(text=text, mode="sparse", k=4, rerank=["bsap"]))
    assert reranked.query_tokens == lookup and len(reranked.hits) == 4
    both = free.search(SearchRequest(text=text, image=draw_shape("red", "circle"), mode="hybrid", k=3))
    image_sparse = encoder.encode_images([draw_shape("red", "circle")]).sparse[0]
    assert set(both.query_tokens) == set(lookup) | set(image_sparse)  # a text-refined image query


def test_idf_weights_need_a_grounded_model(shapes_index, tiny_encoder):  # noqa: F811
    assert QueryRouter(IndexReader(shapes_index), tiny_encoder).query_weights == "model"  # auto, ungrounded
    with pytest.raises(ValueError, match="needs a grounded model"):
        QueryRouter(IndexReader(shapes_index), tiny_encoder, query_weights="idf")
    with pytest.raises(ValueError, match="query_weights must be one of"):
        QueryRouter(IndexReader(shapes_index), tiny_encoder, query_weights="bm25")

