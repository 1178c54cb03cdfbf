"""The text route: BM25 over captions (sidecar .txt files in folders, caption columns) and chosen metadata fields,
searched alone (mode text) or fused by auto, with the matched words; filters and deletes apply; indexes without
text keep working. Real Lucene indexes of images and captions written here."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

import indexer
from indexer import IndexJob
from indexer.sources import SourceOptions
from server import IndexRegistry, ServerSettings, create_app
from stair_search.index import IndexReader, Manifest
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import draw_shape

CAPTIONS = {"red": "The flag of Lesotho, waving", "blue": "a name badge on a desk", "green": "a green circle",
            "yellow": ""}


@pytest.fixture(scope="module")
def folder_index(tmp_path_factory, tiny_encoder):
    root = tmp_path_factory.mktemp("text")
    (root / "photos").mkdir()
    for colour, caption in CAPTIONS.items():
        draw_shape(colour, "circle").save(root / "photos" / f"{colour}.png")
        if caption:
            (root / "photos" / f"{colour}.txt").write_text(caption)
    indexer.run(IndexJob(root / "photos", root / "index", workers=0), encoder=tiny_encoder, progress=False)
    return root / "index"


@pytest.fixture(scope="module")
def router(folder_index, tiny_encoder):
    return QueryRouter(IndexReader(folder_index), tiny_encoder)


def test_sidecar_captions_are_indexed_for_the_text_route(folder_index, router):
    manifest = Manifest.load(folder_index)
    assert manifest.text_fields == ["caption"] and all(s.text for s in manifest.shards)
    captions = {d["id"]: d["caption"] for d in router.index.documents(
        [c for batch in router.index.live() for c in batch], ["id", "caption"])}
    assert captions == {f"{c}.png": text for c, text in CAPTIONS.items()}
    hits = router.search(SearchRequest(text="Lesotho", mode="text", explain=True)).hits
    assert [h.id for h in hits] == ["red.png"] and hits[0].text_matched == {"lesotho": 1}
    assert hits[0].parts["text"] > 0
    badges = router.search(SearchRequest(text="name badges", mode="text", explain=True)).hits  # stemmed: badges -> badg
    assert badges[0].id == "blue.png" and set(badges[0].text_matched) == {"name", "badg"}
    assert router.search(SearchRequest(text="the of", mode="text")).hits == []  # stop words only


def test_auto_fuses_the_text_route_and_explicit_modes_leave_it_out(router):
    auto = router.search(SearchRequest(text="name badge", explain=True))
    assert auto.mode.endswith("+text") and auto.decision["text"] is True and auto.fusion == "rrf"
    # a keyword query's convex weight does not apply once the text route joins: the decision says what ran
    assert auto.decision["fusion"] == "rrf" and auto.decision["alpha"] is None and "(RRF)" in auto.decision["reason"]
    alone = router.search(SearchRequest(text="name badge", use_text=False))
    assert alone.fusion == "convex" and alone.decision["fusion"] == "convex" and alone.decision["alpha"] > 0
    assert "RRF" not in alone.decision["reason"]
    assert auto.hits[0].id == "blue.png" and "text" in auto.hits[0].parts
    dense = router.search(SearchRequest(text="name badge", mode="dense"))
    assert dense.mode == "dense" and all("text" not in h.parts for h in dense.hits)


def test_concurrent_searches_through_java_answer_what_one_by_one_does(folder_index, tiny_encoder):
    """Text-route searches and their explanations (Lucene through pyjnius) from 8 threads at once, with the sparse
    route on Lucene too (no accelerated searcher): the same answers as one by one (pyjnius could swap the
    receivers of concurrent calls on different Java objects: jvm.JAVA_CALLS)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    copy = folder_index.parent / "lucene-only"
    shutil.copytree(folder_index, copy)
    for folder in copy.glob("shards/*/sparse/accelerated"):
        shutil.rmtree(folder)
    from server.batching import BatchingEncoder

    router = QueryRouter(IndexReader(copy), BatchingEncoder(tiny_encoder))  # encodes one forward at a time, as served
    queries = [text for text in CAPTIONS.values() if text] * 8

    def answer(text):
        response = router.search(SearchRequest(text=text, explain=True, k=4))
        sparse = router.search(SearchRequest(text=text, mode="sparse", k=4, explain=True))
        return ([(h.id, h.text_matched, sorted(h.matched or {})) for h in response.hits],
                [(h.id, round(h.score, 6)) for h in sparse.hits])

    alone = [answer(text) for text in queries]
    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(answer, queries)) == alone


def test_filters_and_deletes_apply_to_the_text_route(folder_index, tiny_encoder, tmp_path):
    import shutil

    copy = tmp_path / "index"
    shutil.copytree(folder_index, copy)
    router = QueryRouter(IndexReader(copy), tiny_encoder)
    router.index.delete(["red.png"])
    assert router.search(SearchRequest(text="Lesotho", mode="text")).hits == []
    assert router.search(SearchRequest(text="badge", mode="text")).hits[0].id == "blue.png"


def test_chosen_metadata_fields_join_the_text(tmp_path, tiny_encoder):
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for colour, tags in (("red", ["fire engine", "siren"]), ("blue", ["ocean"]), ("green", ["forest"])):
        draw_shape(colour, "square").save(images / f"{colour}.png")
        rows.append({"id": colour, "path": str(images / f"{colour}.png"), "caption": f"a {colour} square",
                     "tags": tags, "group": "things"})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "items.parquet")
    options = SourceOptions(id_column="id", metadata_columns=("tags", "group"))
    indexer.run(IndexJob(tmp_path / "items.parquet", tmp_path / "index", workers=0, options=options,
                         text_fields=["caption", "tags"]), encoder=tiny_encoder, progress=False)
    router = QueryRouter(IndexReader(tmp_path / "index"), tiny_encoder)
    assert [h.id for h in router.search(SearchRequest(text="siren", mode="text")).hits] == ["red"]
    assert router.search(SearchRequest(text="things", mode="text")).hits == []  # 'group' was not chosen
    filtered = router.search(SearchRequest(text="square", mode="text", k=3, filters={"tags": "ocean"}))
    assert [h.id for h in filtered.hits] == ["blue"]
    with TestClient(create_app(IndexRegistry({"items": tmp_path / "index"}), ServerSettings(reload_interval_s=0))) as c:
        hit = c.post("/search", json={"query": "fire engine", "mode": "text"}).json()["hits"][0]
        assert hit["id"] == "red" and hit["text_matched"] == {"fire": 1, "engin": 1}


def test_an_index_without_text_keeps_working(tmp_path, tiny_encoder):
    images = tmp_path / "images"
    images.mkdir()
    for colour in ("red", "blue"):
        draw_shape(colour, "circle").save(images / f"{colour}.png")
        (images / f"{colour}.txt").write_text(f"a {colour} circle")
    indexer.run(IndexJob(images, tmp_path / "index", workers=0, text_fields=None), encoder=tiny_encoder, progress=False)
    router = QueryRouter(IndexReader(tmp_path / "index"), tiny_encoder)
    assert Manifest.load(tmp_path / "index").text_fields is None and not router.index.has_text
    text = router.search(SearchRequest(text="red circle", mode="text"))
    assert text.hits == [] and "no text route" in text.decision["note"]
    auto = router.search(SearchRequest(text="red circle"))
    assert "text" not in auto.mode and len(auto.hits) == 2
