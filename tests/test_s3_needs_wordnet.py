"""S^3 without WordNet files is refused, naming the fix, on every surface (library, CLI, API): it never quietly
becomes the plain dense score. WordNet is made missing by pointing ``STAIR_WORDNET`` at an empty folder."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from server import ServerSettings, create_app
from stair_search.cli import main
from stair_search.index import IndexReader
from stair_search.query import wordnet
from stair_search.rerank.s3 import classify
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import draw_shape
from tests.test_server import png_bytes, registry, shapes_index  # noqa: F401 - the API tests' fixtures

FIX = "apt-get install wordnet-base"


@pytest.fixture
def no_wordnet(tmp_path, monkeypatch):
    monkeypatch.setenv("STAIR_WORDNET", str(tmp_path / "empty"))
    assert not wordnet.available()


def test_the_library_refuses_s3_and_names_the_fix(no_wordnet, shapes_index, tiny_encoder):  # noqa: F811
    with pytest.raises(wordnet.WordNetMissing, match=FIX):
        wordnet.synonyms("car")
    router = QueryRouter(IndexReader(shapes_index), tiny_encoder)
    with pytest.raises(wordnet.WordNetMissing, match=FIX):
        router.search(SearchRequest(text="a red circle", mode="dense", rerank=["s3"]))
    with pytest.raises(wordnet.WordNetMissing, match=FIX):
        classify(tiny_encoder, draw_shape("red", "circle"), ["red circle", "blue square"])
    # the label alone stays possible, when asked for by name
    assert classify(tiny_encoder, draw_shape("red", "circle"), ["red circle", "blue square"], source=lambda _: [])
    plain = router.search(SearchRequest(text="a red circle", mode="dense",
                                        k=3))  # other rerankers and plain searches still run
    assert len(plain.hits) == 3


def test_the_cli_and_the_api_refuse_s3_in_one_line(no_wordnet, shapes_index, registry, tiny_config_path,  # noqa: F811
                                                   capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["search", str(shapes_index), "a red circle", "--rerank", "s3", "--model", str(tiny_config_path)])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and err.count("\n") == 0 and FIX in err, err
    with TestClient(create_app(registry, ServerSettings(reload_interval_s=0))) as client:
        search = client.post("/search", json={"query": "a red circle", "mode": "dense", "rerank": ["s3"]})
        assert search.status_code == 501 and FIX in search.json()["detail"]
        files = {"image": ("q.png", png_bytes(draw_shape("red", "circle")), "image/png")}
        classified = client.post("/classify", data={"labels": ["red circle", "blue square"]}, files=files)
        assert classified.status_code == 501 and FIX in classified.json()["detail"]
        assert client.post("/search", json={"query": "a red circle", "mode": "dense"}).status_code == 200
