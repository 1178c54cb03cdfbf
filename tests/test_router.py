"""Query router: the ``auto`` decision, and fusion + reranking over a real index (Lucene + FAISS + feature store)
built from images drawn here with a real tiny model. The fusion formulas themselves: tests/test_fusion.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from stair_search.cli import app
from stair_search.index import Candidate, FeatureRecord, IndexReader, IndexWriter
from stair_search.rerank import RERANKERS
from stair_search.retrieve import QueryRouter, SearchRequest
from stair_search.retrieve.plan import KEYWORD_ALPHA, decide, plan_query, plan_vectors
from stair_search.vectors import unit
from tests.conftest import COLOURS, TINY_CONFIG, draw_shape

SHAPES = ("circle", "square", "triangle")


@pytest.mark.parametrize(("text", "mode", "rerank"), [
    ("dog", "hybrid", ()),
    ("red car", "hybrid", ()),
    ("a fluffy white dog and a sleepy cat", "hybrid", ()),
    ("a dog playing on the beach", "hybrid", ("comclip",)),
    ("a red circle left of a blue square", "hybrid", ("comclip",)),
    ("a man holding a cup", "hybrid", ("comclip",)),
])
def test_auto_decides_from_the_query(text, mode, rerank):
    decision = decide(text, None)
    assert (decision.mode, decision.rerank) == (mode, rerank) and decision.reason
    keyword = len(text.split()) <= 2
    assert (decision.fusion, decision.alpha) == (("convex", KEYWORD_ALPHA) if keyword else (None, None))


def test_keyword_queries_lean_sparse_by_the_models_own_weight():
    assert decide("red car", None, keyword_alpha=0.4).alpha == 0.4
    assert decide("a red car parked by the sea", None, keyword_alpha=0.4).alpha is None


def test_auto_gives_feedback_to_keyword_and_descriptive_queries_only():
    assert decide("red car", None, feedback_docs=3).feedback == 3
    assert decide("a fluffy white dog and a sleepy cat", None, feedback_docs=3).feedback == 3
    assert decide("a red circle left of a blue square", None, feedback_docs=3).feedback == 0  # ComCLIP's case
    assert decide(None, draw_shape("red", "circle"), feedback_docs=3).feedback == 0
    assert decide("red car", None).feedback == 0  # a model that sets none


def test_auto_sends_image_queries_to_the_dense_route():
    assert decide(None, draw_shape("red", "circle")).mode == "dense"
    assert decide("red", draw_shape("red", "circle")).mode == "dense"
    with pytest.raises(ValueError, match="text, an image"):
        decide("  ", None)


@pytest.fixture(scope="module")
def router(tmp_path_factory, tiny_encoder):
    items = [(c, s) for c in COLOURS for s in SHAPES]
    images = [draw_shape(c, s) for c, s in items]
    records = [FeatureRecord(id=f"{c}-{s}", source=f"drawn://{c}/{s}", width=64, height=64, caption=f"a {c} {s}")
               for c, s in items]  # sources are not files: reranking must not need them
    index_dir = tmp_path_factory.mktemp("router") / "shapes"
    with IndexWriter(index_dir, tiny_encoder.record, shard_size=5) as writer:
        for start in range(0, len(records), 5):  # three shards: 5 + 5 + 2
            writer.add(records[start : start + 5], tiny_encoder.encode_images(images[start : start + 5]))
        writer.commit()
    return QueryRouter(IndexReader(index_dir), tiny_encoder), images


def test_stored_vectors_come_back_from_faiss(router):
    router, images = router
    candidates = [Candidate(shard, row, 0.0) for shard in range(3) for row in range(2)]
    expected = router.encoder.encode_images([images[shard * 5 + row] for shard in range(3) for row in range(2)])
    np.testing.assert_allclose(unit(router.index.vectors(candidates)), expected.dense, atol=1e-5)


def expected_rrf(first_stage: list[str], hits, names: list[str]) -> dict[str, float]:
    """Hand-computed reranked score: 1/(60 + rank) summed over the first-stage order and each reranker's."""
    orders = [first_stage] + [[h.id for h in sorted(hits, key=lambda h: -h.parts[n])] for n in names]
    return {doc: sum(1.0 / (60 + order.index(doc) + 1) for order in orders) for doc in first_stage}


@pytest.mark.parametrize("name", RERANKERS)
def test_each_reranker_is_fused_with_the_first_stage_order_by_rrf(router, name):
    router, _ = router
    plain = router.search(SearchRequest(text="a red circle", mode="hybrid", k=12, depth=12))
    reranked = router.search(SearchRequest(text="a red circle", mode="hybrid", k=12, depth=12, rerank=[name]))
    assert {h.id for h in reranked.hits} == {h.id for h in plain.hits}  # reranking only reorders
    expected = expected_rrf([h.id for h in plain.hits], reranked.hits, [name])
    assert [h.score for h in reranked.hits] == pytest.approx([expected[h.id] for h in reranked.hits])
    assert [h.score for h in reranked.hits] == sorted(expected.values(), reverse=True)
    assert reranked.decision == {"mode": "hybrid", "rerank": [name], "reason": "requested"} | (
        {"expanded": reranked.decision["expanded"]} if "expanded" in reranked.decision else {})


def test_only_the_top_depth_candidates_are_reranked_and_every_reranker_votes(router):
    router, _ = router
    response = router.search(SearchRequest(text="a blue square", mode="dense", k=8, depth=4, rerank=["bsap", "ssp"]))
    head, tail = response.hits[:4], response.hits[4:]
    assert all({"bsap", "ssp", "dense"} <= set(h.parts) for h in head)
    assert all(set(h.parts) == {"dense"} for h in tail)
    plain = router.search(SearchRequest(text="a blue square", mode="dense", k=8))
    expected = expected_rrf([h.id for h in plain.hits[:4]], head, ["bsap", "ssp"])
    assert [h.score for h in head] == pytest.approx(sorted(expected.values(), reverse=True))
    assert [h.id for h in tail] == [h.id for h in plain.hits[4:]]


def test_feedback_moves_the_dense_query_toward_the_top_hits_and_fuses_again(router):
    """Rocchio on the dense side: query + mean(top hits' stored embeddings), the dense route run again with it,
    fused with the same sparse list by RRF; checked against a hand computation over every stored vector."""
    router, _ = router
    text = "a red circle"
    plain = router.search(SearchRequest(text=text, mode="hybrid", k=12, depth=12))
    moved = router.search(SearchRequest(text=text, mode="hybrid", k=12, depth=12, feedback=2))
    assert moved.decision["feedback"] == 2 and "feedback" not in plain.decision
    ids = [f"{c}-{s}" for c in COLOURS for s in SHAPES]
    vectors = dict(zip(ids, unit(router.index.vectors([router.index.find(i) for i in ids])), strict=True))
    query = router.encoder.embed_texts([text])[0] + np.mean([vectors[h.id] for h in plain.hits[:2]], axis=0)
    cosine = {i: float(v @ query) / float(np.linalg.norm(query)) for i, v in vectors.items()}
    dense_order = sorted(ids, key=lambda i: -cosine[i])
    sparse_order = [h.id for h in router.search(SearchRequest(text=text, mode="sparse", k=12, depth=12)).hits]
    expected = {i: 1 / (61 + dense_order.index(i)) + (1 / (61 + sparse_order.index(i)) if i in sparse_order else 0)
                for i in ids}
    assert {h.id: h.score for h in moved.hits} == pytest.approx(expected)
    assert {h.id: h.parts["dense"] for h in moved.hits} == pytest.approx(cosine, abs=1e-5)
    unmoved = {h.id: h.parts["dense"] for h in plain.hits}
    assert max(abs(cosine[i] - unmoved[i]) for i in ids) > 0.01  # the query did move


def test_convex_fusion_normalises_a_complete_sparse_list_from_zero(router):
    """100 candidates asked of a 12-image index: the sparse list holds every match, so its scores are normalised
    from 0 (the score of every image outside it); the dense list from its own last score."""
    router, _ = router
    found = router.index.find("red-circle")
    words = router.index.sparse_vectors([found])[0]
    response = router.search(SearchRequest(dense=router.index.vectors([found])[0], sparse=dict(sorted(
        words.items(), key=lambda item: -item[1])[:3]), mode="hybrid", fusion="convex", alpha=0.4, k=12))
    sparse = {h.id: h.parts["sparse"] for h in response.hits if "sparse" in h.parts}
    dense = {h.id: h.parts["dense"] for h in response.hits}
    low, high = min(dense.values()), max(dense.values())
    expected = {i: 0.4 * sparse.get(i, 0.0) / max(sparse.values()) + 0.6 * (d - low) / (high - low)
                for i, d in dense.items()}
    assert {h.id: h.score for h in response.hits} == pytest.approx(expected)
    assert min(sparse.values()) > 0


def test_auto_mode_reports_its_decision_and_applies_comclip(router):
    router, images = router
    response = router.search(SearchRequest(text="a red circle left of a blue square", mode="auto", k=5, use_text=False))
    assert response.mode == "hybrid" and response.decision["rerank"] == ["comclip"]
    assert "relational" in response.decision["reason"] and all("comclip" in h.parts for h in response.hits)
    with_text = router.search(SearchRequest(text="a red circle left of a blue square", mode="auto",
                                            k=5))  # the index has captions
    assert with_text.mode == "hybrid+text" and with_text.fusion == "rrf" and with_text.decision["text"] is True
    keyword = router.search(SearchRequest(text="yellow", mode="auto", k=3, use_text=False))
    leaning = router.search(SearchRequest(text="yellow", mode="hybrid", fusion="convex", alpha=KEYWORD_ALPHA, k=3))
    assert keyword.mode == "hybrid" and keyword.fusion == "convex" and keyword.decision["alpha"] == KEYWORD_ALPHA
    assert [(h.id, h.score) for h in keyword.hits] == [(h.id, h.score) for h in leaning.hits]
    by_image = router.search(SearchRequest(image=images[0], mode="auto", k=1))
    assert by_image.mode == "dense" and by_image.hits[0].id == "red-circle"


def test_a_query_whose_words_the_model_never_emits_goes_dense_in_auto_and_is_explained(tmp_path):
    """A grounded model limited to a few emitted word-pieces: 'xylophone' has an empty sparse vector."""
    from stair_search.encode import Encoder
    from stair_search.models import create_model

    config = tmp_path / "grounded.json"
    config.write_text(json.dumps(TINY_CONFIG | {"ground_text": True, "emit_tokens": ["red", "blue", "circle"]}))
    encoder = Encoder(create_model(str(config), device="cpu"), batch_size=4)
    records = [FeatureRecord(id=f"{c}-{s}", source="", width=64, height=64) for c in ("red", "blue") for s in SHAPES]
    with IndexWriter(tmp_path / "index", encoder.record) as writer:
        writer.add(records, encoder.encode_images([draw_shape(c, s) for c in ("red", "blue") for s in SHAPES]))
        writer.commit()
    router = QueryRouter(IndexReader(tmp_path / "index"), encoder, query_weights="model")
    assert router.encoder.encode_texts(["xylophone"]).sparse == [{}]
    sparse = router.search(SearchRequest(text="xylophone", mode="sparse", k=3))
    assert sparse.hits == [] and "none of the query's word-pieces" in sparse.decision["note"]
    auto = router.search(SearchRequest(text="xylophone", mode="auto", k=3))
    dense = router.search(SearchRequest(text="xylophone", mode="dense", k=3))
    assert auto.mode == "dense" and "dense only" in auto.decision["note"]
    assert [(h.id, h.score) for h in auto.hits] == [(h.id, h.score) for h in dense.hits] and len(auto.hits) == 3
    for words in ("red", "blue", "circle", "red circle", "blue circle"):  # auto goes dense exactly when empty
        has_tokens = bool(encoder.encode_texts([words]).sparse[0])
        response = router.search(SearchRequest(text=words, mode="auto", k=3))
        assert (response.mode, "note" in response.decision) == (("hybrid", False) if has_tokens else ("dense", True))
    free = QueryRouter(IndexReader(tmp_path / "index"), encoder, query_weights="idf")  # the lookup: words images hold
    assert free.search(SearchRequest(text="xylophone", mode="auto", k=3)).mode == "dense"
    for words in ("red", "blue", "circle", "red circle", "xylophone circle"):
        has_tokens = bool(free.search(SearchRequest(text=words, mode="sparse", k=1)).query_tokens)
        response = free.search(SearchRequest(text=words, mode="auto", k=3))
        assert (response.mode, "note" in response.decision) == (("hybrid", False) if has_tokens else ("dense", True))


def test_s3_expands_the_sparse_query_with_synonym_tokens(router, tiny_encoder):
    index = router[0].index
    s3_router = QueryRouter(index, tiny_encoder, reranker_knobs={"s3": {"source": lambda w: ["automobile"]}})
    response = s3_router.search(SearchRequest(text="car", mode="sparse", k=3, rerank=["s3"]))
    assert response.decision["expanded"] == {"automobile": "car"}
    base = tiny_encoder.encode_texts(["car"]).sparse[0]
    expected = 0.3 * base.get("car", max(base.values()))
    assert response.query_tokens["automobile"] == pytest.approx(expected)


def test_reranker_phrases_get_the_full_encoders_dense_vectors_and_stay_cached(router, tiny_encoder):
    router, _ = router
    texts = ["a red circle", "a blue square left of a green triangle", "an icon"]
    np.testing.assert_allclose(tiny_encoder.embed_texts(texts), tiny_encoder.encode_texts(texts).dense, atol=1e-6)
    assert tiny_encoder.embed_texts([]).shape == (0, tiny_encoder.model.embed_dim)
    router.search(SearchRequest(text="a red circle", mode="dense", k=3, rerank=["bsap", "comclip"]))
    wanted = [*router.rerankers["bsap"].phrases("a red circle"), *router.rerankers["comclip"].phrases("a red circle")]
    cached = np.stack([router._phrases[p] for p in wanted])
    np.testing.assert_allclose(cached, tiny_encoder.encode_texts(wanted).dense, atol=1e-6)


def test_cli_search_reports_the_auto_decision_and_reranks(router):
    index_dir = str(router[0].index.dir)
    result = CliRunner().invoke(app, ["search", index_dir, "a red circle left of a blue square", "--mode", "auto",
                                      "-k", "3", "--depth", "6"])
    assert result.exit_code == 0, result.output
    assert "auto: hybrid, rerank ['comclip'] (relational phrase" in result.output
    hits = CliRunner().invoke(app, ["search", index_dir, "a red circle", "--rerank", "bsap, ssp", "--depth", "6",
                                    "-k", "6", "--json"])
    assert hits.exit_code == 0, hits.output
    plain = CliRunner().invoke(app, ["search", index_dir, "a red circle", "--depth", "6", "-k", "6", "--json"])
    rows, first_stage = ([json.loads(line) for line in out.output.splitlines() if line.startswith("{")]
                         for out in (hits, plain))
    assert len(rows) == 6 and all({"bsap", "ssp"} <= set(row["parts"]) for row in rows)
    reranked = [SimpleNamespace(id=row["id"], parts=row["parts"]) for row in rows]
    expected = expected_rrf([row["id"] for row in first_stage], reranked, ["bsap", "ssp"])
    assert [row["score"] for row in rows] == pytest.approx([expected[row["id"]] for row in rows])
    bad = CliRunner().invoke(app, ["search", index_dir, "red", "--rerank", "colbert"])
    assert bad.exit_code != 0 and "unknown reranker(s) ['colbert']" in bad.output


def test_bad_router_arguments_are_clear_errors(router):
    router, _ = router
    with pytest.raises(ValueError, match="choose from bsap, ssp, comclip, s3"):
        router.search(SearchRequest(text="red", rerank=["colbert"]))
    with pytest.raises(ValueError, match="mode must be one of"):
        router.search(SearchRequest(text="red", mode="lexical"))
    with pytest.raises(ValueError, match="depth"):
        router.search(SearchRequest(text="red", depth=0))
    with pytest.raises(ValueError, match="feedback must be 0 or more"):
        router.search(SearchRequest(text="red", feedback=-1))
    with pytest.raises(ValueError, match="use mode dense, hybrid or auto, not 'sparse'"):
        router.search(SearchRequest(text="red", mode="sparse", feedback=3))


def split_word_index(tmp_path) -> QueryRouter:
    """A grounded tiny model's index of three drawn images whose sparse vectors are written by hand: one holds
    ``ham``, one ``cage``, one both; searched through the idf lookup, as the default model is."""
    from stair_search.encode import Encoder
    from stair_search.models import create_model

    config = tmp_path / "grounded.json"
    config.write_text(json.dumps(TINY_CONFIG | {"ground_text": True}))
    encoder = Encoder(create_model(str(config), device="cpu"), batch_size=4)
    batch = encoder.encode_images([draw_shape(c, "circle") for c in ("red", "blue", "green")])
    batch.sparse = [{"ham": 1.0}, {"cage": 0.5}, {"ham": 0.4, "cage": 0.9}]
    records = [FeatureRecord(id=i, source="", width=64, height=64) for i in ("meat", "empty-cage", "pet-cage")]
    with IndexWriter(tmp_path / "index", encoder.record) as writer:
        writer.add(records, batch)
        writer.commit()
    return QueryRouter(IndexReader(tmp_path / "index"), encoder, query_weights="idf")


def test_a_split_query_word_is_searched_by_its_first_piece_and_explained_as_a_piece_of_it(tmp_path, capsys,
                                                                                         monkeypatch):
    """"hamster" is ``ham ##ster`` to the vocabulary: the sparse route searches ``ham``, and each hit that matched
    it says the match is of the piece of "hamster" (in the API's dicts and the CLI's table), never the word ham."""
    from stair_search.cli.printing import print_response

    router = split_word_index(tmp_path)
    response = router.search(SearchRequest(text="hamster cage", mode="sparse", k=3, explain=True))
    assert set(response.query_tokens) == {"ham", "cage"} and response.query_words == {"ham": "hamster"}
    hits = {h.id: h for h in response.hits}
    assert set(hits) == {"meat", "empty-cage", "pet-cage"}
    assert hits["meat"].matched_words == {"ham": "hamster"} and hits["empty-cage"].matched_words == {}
    matched = hits["pet-cage"].to_dict()["matched"]
    assert matched["ham"]["of"] == "hamster" and set(matched["cage"]) == {"query", "document"}
    assert "matched_words" not in hits["pet-cage"].to_dict()
    monkeypatch.setenv("COLUMNS", "200")
    print_response(response, explain=True)
    printed = capsys.readouterr().out
    assert printed.count("ham (of hamster)") == 2 and "cage" in printed
    typed = router.search(SearchRequest(text="ham hamster", mode="sparse", k=3,
                                        explain=True))  # the word itself: no piece
    assert typed.query_words == {} and all(h.matched_words == {} for h in typed.hits)


def test_the_plan_is_decided_from_the_request_alone():
    """No index, no model: the routes, fusion, rerankers and feedback of a request (``retrieve/plan.py``)."""
    facts = {"default_depth": 100, "keyword_alpha": 0.7, "feedback_docs": 3}
    keyword = plan_query(SearchRequest(text="red car"), has_text=False, **facts)
    assert (keyword.routes, keyword.fusion, keyword.alpha, keyword.decision.feedback) == (
        ("dense", "sparse"), "convex", 0.7, 3)
    with_text = plan_query(SearchRequest(text="red car"), has_text=True, **facts)
    assert (with_text.routes, with_text.fusion, with_text.label) == (("dense", "sparse", "text"), "rrf", "hybrid+text")
    assert with_text.decision.reason.endswith("fused by rank (RRF)")
    assert plan_query(SearchRequest(text="red car", use_text=False), has_text=True, **facts).routes == (
        "dense", "sparse")
    empty = keyword.without_sparse()  # the query's sparse vector came out empty: auto goes dense
    assert (empty.routes, empty.decision.mode, empty.fused_by) == (("dense",), "dense", None)
    asked = plan_query(SearchRequest(text="red car", mode="sparse", rerank=["bsap"], depth=7), has_text=True, **facts)
    assert (asked.routes, asked.rerank, asked.fetch(5), asked.without_sparse().routes) == (
        ("sparse",), ("bsap",), 7, ("sparse",))
    assert plan_vectors(SearchRequest(dense=[1.0]), ("dense",), 100).routes == ("dense",)
    for request, message in ((SearchRequest(text="x", like="y"), "one kind of query"),
                             (SearchRequest(text="x", mode="sparse", feedback=2), "feedback refines"),
                             (SearchRequest(text="x", offset=-1), "offset"),
                             (SearchRequest(text="x", rerank=["nope"]), "unknown reranker")):
        with pytest.raises(ValueError, match=message):
            _ = request.kind
            plan_query(request, has_text=True, **facts)
    with pytest.raises(ValueError, match="needs dense and sparse"):
        plan_vectors(SearchRequest(dense=[1.0], mode="hybrid"), ("dense",), 100)
