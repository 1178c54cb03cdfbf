"""The four training-free rerankers: each formula against a small hand-computed example, the query parser, the
WordNet synonyms, sparse query expansion and zero-shot classification with a real tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from stair_search.cli import app
from stair_search.query import wordnet
from stair_search.query.expand import expand_sparse
from stair_search.query.parse import parse_query
from stair_search.rerank import RERANKERS, check_names, make_reranker
from stair_search.rerank.base import RerankInput
from stair_search.rerank.bsap import balanced_similarity, bsap_scores
from stair_search.rerank.comclip import ComCLIP, component_weights, compose, entity_subimages, spatial_agreement
from stair_search.rerank.s3 import (
    classify,
    default_epsilon,
    local_centre_scores,
    query_variants,
    rips_component,
)
from stair_search.rerank.ssp import choose_rank, project, projector_matrix, ssp_scores, subspace_basis
from tests.conftest import draw_shape

E = np.eye(4)


# ---------------------------------------------------------------------------------------------------- BSAP

SIMS = np.array([[0.3, 0.1, 0.1, 0.1],   # image 0: query column 0, three auxiliary prompts
                 [0.5, 0.5, 0.5, 0.5],   # image 1: scores high against everything (the bias BSAP removes)
                 [0.2, 0.0, 0.2, 0.4]])


def test_bsap_balanced_similarity_matches_the_hand_computed_softmax():
    expected = [math.exp(3) / (math.exp(3) + 3 * math.exp(1)),
                0.25,
                math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(2) + math.exp(4))]
    np.testing.assert_allclose(balanced_similarity(SIMS, logit_scale=10.0), expected, rtol=1e-12)


def test_bsap_hybrid_demotes_the_image_that_matches_everything():
    raw_order = np.argsort(-SIMS[:, 0])
    scores = bsap_scores(SIMS[:, 0], SIMS[:, 1:], logit_scale=10.0, weight=0.5)
    np.testing.assert_allclose(scores[1], 0.5 * 0.25 + 0.5 * 0.5)
    assert raw_order[0] == 1 and np.argmax(scores) == 0
    np.testing.assert_allclose(bsap_scores(SIMS[:, 0], SIMS[:, 1:], 10.0, weight=0.0), SIMS[:, 0])
    with pytest.raises(ValueError, match="λ"):
        bsap_scores(SIMS[:, 0], SIMS[:, 1:], 10.0, weight=1.5)


# ----------------------------------------------------------------------------------------------------- SSP

def test_ssp_projector_is_idempotent_symmetric_and_equals_least_squares(rng):
    features = rng.normal(size=(3, 6))
    p = projector_matrix(features)
    np.testing.assert_allclose(p @ p, p, atol=1e-12)
    np.testing.assert_allclose(p, p.T, atol=1e-12)
    x = rng.normal(size=6)
    coefficients, *_ = np.linalg.lstsq(features.T, x, rcond=None)  # min ||Fᵀβ − x||
    np.testing.assert_allclose(p @ x, features.T @ coefficients, atol=1e-12)
    np.testing.assert_allclose(project(x, subspace_basis(features)), p @ x, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 5, 7), (12, 4)])  # n < D (Gram F Fᵀ) and n > D (Fᵀ F)
def test_ssp_basis_from_the_gram_matrix_equals_the_svd_projector(rng, shape):
    features = rng.normal(size=shape)
    _, _, vt = np.linalg.svd(features, full_matrices=False)
    for rank in (None, 2):
        r = choose_rank(shape[-2], shape[-1], rank)
        basis = subspace_basis(features, rank)
        np.testing.assert_allclose(np.swapaxes(basis, -1, -2) @ basis,
                                   np.swapaxes(vt[..., :r, :], -1, -2) @ vt[..., :r, :], atol=1e-10)
        identity = np.broadcast_to(np.eye(r), (*basis.shape[:-2], r, r))  # orthonormal rows
        np.testing.assert_allclose(basis @ np.swapaxes(basis, -1, -2), identity, atol=1e-10)


def test_ssp_rank_rule_and_rank_deficient_stacks():
    assert choose_rank(9, 256) == 9 and choose_rank(2000, 1024) == 950 and choose_rank(9, 256, rank=4) == 4
    stacked = np.array([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 0]])  # a zero row (a document without local features)
    np.testing.assert_allclose(projector_matrix(stacked), np.diag([1.0, 1.0, 0.0]), atol=1e-12)
    np.testing.assert_allclose(projector_matrix(stacked, rank=1), np.diag([0.0, 1.0, 0.0]), atol=1e-12)


def test_ssp_score_on_a_hand_computed_example():
    # One candidate: global e1, local features e1 and e2; query (e1 + e3)/√2.
    query, vectors, local = (E[0] + E[2]) / math.sqrt(2), E[:1], np.stack([[E[0], E[1]]])
    raw = 1 / math.sqrt(2)
    # Language projector: P q = e1/√2, cos with P v = e1 -> 1. Vision projector: the query subspace is spanned by
    # the patch e1 (similarity 1/√2) and 10 q, i.e. by e1 and e3; P_q v = e1, cos with P_q q = q -> 1/√2.
    np.testing.assert_allclose(ssp_scores(query, vectors, local, alpha=1.0, beta=0.0), (raw + 1.0) / 2)
    np.testing.assert_allclose(ssp_scores(query, vectors, local, alpha=0.0, beta=1.0), (raw + raw) / 2)
    np.testing.assert_allclose(ssp_scores(query, vectors, local, alpha=0.0, beta=0.0), raw)


# ------------------------------------------------------------------------------------------------- ComCLIP

def test_comclip_weights_normalise_clamp_and_softmax():
    np.testing.assert_allclose(component_weights(np.array([[1.0, 3.0]])), [[0.25, 0.75]])
    np.testing.assert_allclose(component_weights(np.array([[-1.0, 2.0]])), [[0.0, 1.0]])
    np.testing.assert_allclose(component_weights(np.array([[-1.0, 0.0]])), [[0.5, 0.5]])
    soft = [math.exp(1) / (math.exp(1) + math.exp(3)), math.exp(3) / (math.exp(1) + math.exp(3))]
    np.testing.assert_allclose(component_weights(np.array([[1.0, 3.0]]), "softmax", temperature=1.0), [soft])
    with pytest.raises(ValueError, match="weighting"):
        component_weights(np.array([[1.0]]), "max")


def test_comclip_composition_on_known_vectors():
    composed = compose(E[None, 0], np.stack([[E[1], E[2]]]), np.array([[0.25, 0.75]]))
    expected = np.array([1.0, 0.25, 0.75, 0.0]) / math.sqrt(1 + 0.25**2 + 0.75**2)
    np.testing.assert_allclose(composed[0], expected)


def test_comclip_picks_the_patches_of_each_entity():
    local = np.stack([[E[2], E[0], E[1], E[3]]])  # patch 1 is the "red circle" (e1), patch 2 the "blue square"
    chosen, vectors = entity_subimages(local, np.stack([E[0], E[1]]), top=1)
    assert chosen.tolist() == [[[1], [2]]]
    np.testing.assert_allclose(vectors[0], [E[0], E[1]])


def _two_object_input(text: str, mirrored: bool) -> RerankInput:
    """Two candidates with the same patches (e1 = red circle, e2 = blue square); the second is mirrored."""
    local = np.stack([[E[0], E[1]], [E[0], E[1]]])
    left_right = np.array([[0.2, 0.5], [0.8, 0.5]])
    positions = np.stack([left_right, left_right[::-1] if mirrored else left_right])
    phrases = {"red circle": E[0], "blue square": E[1],
               "red circle left of blue square": (E[0] + E[1]) / math.sqrt(2)}
    query = (E[0] + E[1] + E[2]) / math.sqrt(3)
    vectors = np.stack([(E[0] + E[3]) / math.sqrt(2)] * 2)
    return RerankInput(query, vectors, local, positions, 100.0, text, phrases)


def test_comclip_spatial_check_separates_a_relation_swap_only_when_enabled():
    inputs = _two_object_input("a red circle left of a blue square", mirrored=True)
    plain = ComCLIP(patches_per_entity=1).score(inputs)
    assert plain[0] == pytest.approx(plain[1]) and plain[0] > inputs.raw[0]  # same patches, better than raw
    spatial = ComCLIP(patches_per_entity=1, spatial_weight=1.0).score(inputs)
    assert spatial[0] > plain[0] > spatial[1]
    chosen = np.array([[[0], [1]], [[0], [1]]])
    agreement = spatial_agreement(inputs.positions, chosen, parse_query(inputs.text))
    np.testing.assert_allclose(agreement, [math.tanh(10 * 0.6), -math.tanh(10 * 0.6)])


def test_comclip_score_on_a_hand_computed_example():
    inputs = _two_object_input("a red circle left of a blue square", mirrored=False)
    comclip = ComCLIP(patches_per_entity=1)
    # The relation is the whole query: its key text is the query's own embedding, not a re-embedded phrase.
    assert comclip.phrases(inputs.text) == ["red circle", "blue square"]
    q, v = inputs.query, inputs.vectors[0]
    relation = (E[0] + E[1]) / math.sqrt(2)  # union of the subject's patch e1 and the object's patch e2
    sims = np.array([1.0, 1.0, relation @ q])  # red circle . e1, blue square . e2, relation sub-image . query
    weights = sims / sims.sum()
    composed = v + weights[0] * E[0] + weights[1] * E[1] + weights[2] * relation
    expected = composed @ q / np.linalg.norm(composed)
    np.testing.assert_allclose(comclip.score(inputs), [expected, expected])


def test_comclip_one_entity_query_needs_no_phrase_embedding():
    assert ComCLIP().phrases("a red circle") == []  # the entity is the whole query
    v = (E[0] + E[3]) / math.sqrt(2)
    inputs = RerankInput(E[0], v[None], np.stack([[E[1], E[0]]]), np.zeros((1, 2, 2)), 100.0, "a red circle", {})
    composed = v + E[0]  # the one entity's best patch (e1) with weight 1
    np.testing.assert_allclose(ComCLIP(patches_per_entity=1).score(inputs), [composed[0] / np.linalg.norm(composed)])


def test_comclip_without_entities_keeps_the_raw_similarity():
    inputs = _two_object_input("the", mirrored=False)
    np.testing.assert_allclose(ComCLIP().score(inputs), inputs.raw)


def test_parser_finds_entities_attributes_and_relations():
    parsed = parse_query("A big red dog on top of the small table, next to a chair")
    assert [(e.noun, e.attributes) for e in parsed.entities] == [("dog", ("big", "red")), ("table", ("small",)),
                                                                 ("chair", ())]
    assert parsed.triples() == [("big red dog", "on", "small table")]  # the comma ends the relation chain
    assert parse_query("a man holding a cup").triples() == [("man", "holding", "cup")]
    assert parse_query("a blue triangle is to the left of a yellow diamond").triples() == [
        ("blue triangle", "left of", "yellow diamond")]
    assert parse_query("grinning face").triples() == [] and parse_query("").entities == []


# ----------------------------------------------------------------------------------------------------- S^3

def _line(*xs: float) -> np.ndarray:
    return np.array([[x, 0.0] for x in xs])


def test_s3_rips_component_keeps_the_largest_cluster_across_a_known_gap():
    points = _line(0.0, 0.1, 0.25, 1.0, 1.1)
    assert rips_component(points, epsilon=0.2).tolist() == [0, 1, 2]
    assert rips_component(points, epsilon=0.05).tolist() == [0]  # all singletons: the label's wins the tie
    assert rips_component(points, epsilon=0.75).tolist() == [0, 1, 2, 3, 4]
    assert rips_component(_line(0.0, 5.0, 5.1), epsilon=0.2).tolist() == [1, 2]
    assert default_epsilon(_line(0.0, 1.0, 3.0)) == pytest.approx(2.0)  # distances 1, 3, 2


def test_s3_local_centre_score_on_known_vectors():
    space = np.stack([E[0], E[1], (E[0] + E[1]) / math.sqrt(2)])
    assert local_centre_scores(E[None, 0], space, k=1)[0] == pytest.approx(1.0)
    centre = (E[0] + (E[0] + E[1]) / math.sqrt(2)) / 2
    assert local_centre_scores(E[None, 0], space, k=2)[0] == pytest.approx(centre[0] / np.linalg.norm(centre))


def test_s3_query_variants_replace_one_content_word_at_a_time_round_robin():
    table = {"red": ["crimson", "scarlet"], "car": ["auto", "automobile", "motorcar"]}
    source = lambda word: table.get(word, [])  # noqa: E731
    assert query_variants("A red car", limit=8, source=source) == [
        "A red car", "a crimson car", "a red auto", "a scarlet car", "a red automobile", "a red motorcar"]
    # A short limit still varies every word: the first synonym of each comes before any second one.
    assert query_variants("A red car", limit=2, source=source) == ["A red car", "a crimson car", "a red auto"]
    assert query_variants("of the", source=source) == ["of the"]


def test_s3_reranker_scores_against_the_component_of_the_query_and_its_variants():
    crimson = (E[0] + 0.2 * E[1]) / math.sqrt(1.04)  # close to the query e1; "bolshevik" (e4) is another sense
    s3 = make_reranker("s3", epsilon=0.5, k=3, weight=0.5, source=lambda w: ["crimson", "bolshevik"])
    assert s3.phrases("red") == ["crimson", "bolshevik"]  # the query itself is inputs.query, not re-embedded
    vectors = np.stack([E[0], E[1]])
    inputs = RerankInput(E[0], vectors, np.zeros((2, 1, 4)), np.zeros((2, 1, 2)), 100.0, "red",
                         {"crimson": crimson, "bolshevik": E[3]})
    centre = (E[0] + crimson) / 2  # the kept component {query, crimson}; k = 3 takes both
    cosines = vectors @ centre / np.linalg.norm(centre)
    np.testing.assert_allclose(s3.score(inputs), 0.5 * (vectors @ E[0]) + 0.5 * cosines)


def test_s3_sparse_expansion_adds_single_piece_synonyms_down_weighted(tiny_encoder):
    vocabulary = tiny_encoder.model.vocabulary
    synonyms = ["automobile", "motorcar", "auto"]
    single = [s for s in synonyms if len(vocabulary.token_ids(s)) == 1]
    assert single, "the BERT vocabulary has some of these as one word-piece"
    expanded, added = expand_sparse({"car": 2.0, "red": 1.0}, "a red car", vocabulary, expansion=0.25,
                                    source=lambda w: synonyms if w == "car" else [])
    assert added == {s: "car" for s in single}
    assert expanded == {"car": 2.0, "red": 1.0, **{s: 0.5 for s in single}}


@pytest.mark.skipif(not wordnet.available(), reason="Debian wordnet-base is not installed")
def test_wordnet_synonyms_come_from_the_debian_files():
    assert "automobile" in wordnet.synonyms("car")
    assert wordnet.synonyms("xyzzyq") == []


def test_classify_with_label_only_spaces_is_the_cosine_to_the_label(tiny_encoder):
    image = draw_shape("red", "circle")
    labels = ["red circle", "blue square", "green triangle"]
    result = classify(tiny_encoder, image, labels, source=lambda _: [])
    image_vector = tiny_encoder.encode_images([image]).dense[0]
    expected = {label: float(tiny_encoder.encode_texts([label]).dense[0] @ image_vector) for label in labels}
    assert [label for label, _ in result] == sorted(labels, key=lambda label: -expected[label])
    for label, score in result:
        assert score == pytest.approx(expected[label], abs=1e-5)
    with pytest.raises(ValueError, match="at least one label"):
        classify(tiny_encoder, image, [" ", ""])


def test_cli_classify_prints_every_label(tiny_config_path, tmp_path):
    path = tmp_path / "shape.png"
    draw_shape("blue", "square").save(path)
    result = CliRunner().invoke(app, ["classify", str(path), "--labels", "square,circle", "--model",
                                      str(tiny_config_path), "--no-wordnet", "--json"])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("{")]
    assert sorted(json.loads(r)["label"] for r in rows) == ["circle", "square"]
    bad = CliRunner().invoke(app, ["classify", str(tmp_path / "missing.png"), "--labels", "a"])
    assert bad.exit_code != 0 and "missing.png" in bad.output


def test_reranker_names_are_checked():
    assert check_names(["ssp", "bsap", "ssp"]) == ["ssp", "bsap"]
    assert [make_reranker(n).name for n in RERANKERS] == list(RERANKERS)
    with pytest.raises(ValueError, match="bsap, ssp, comclip, s3"):
        check_names(["bm25"])
