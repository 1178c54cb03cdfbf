"""Fusion of ranked lists against hand-computed examples: RRF (k = 60) and the min-max normalised convex mix,
both keeping each route's raw score as a part."""

from __future__ import annotations

import pytest

from stair_search.retrieve.fusion import RRF_K, convex, rrf

SPARSE = [("a", 5.0), ("b", 3.0), ("c", 1.0)]  # Lucene impact scores
DENSE = [("b", 0.9), ("d", 0.7), ("c", 0.5)]  # cosine similarities


def test_rrf_matches_the_hand_computed_sums():
    fused = rrf({"sparse": SPARSE, "dense": DENSE})
    # a: sparse rank 1; b: sparse 2 + dense 1; c: sparse 3 + dense 3; d: dense 2.
    expected = {"a": 1 / 61, "b": 1 / 62 + 1 / 61, "c": 1 / 63 + 1 / 63, "d": 1 / 62}
    assert RRF_K == 60
    assert [f.key for f in fused] == ["b", "c", "a", "d"]
    assert {f.key: f.score for f in fused} == pytest.approx(expected, rel=1e-15)
    assert fused[0].parts == {"sparse": 3.0, "dense": 0.9} and fused[3].parts == {"dense": 0.7}


def test_rrf_constant_changes_the_balance_between_depth_and_agreement():
    # k = 0 rewards the top ranks: a (1/1) now beats c (1/3 + 1/3), which led with k = 60.
    fused = rrf({"sparse": SPARSE, "dense": DENSE}, k=0)
    assert [(f.key, f.score) for f in fused] == [("b", pytest.approx(1.5)), ("a", pytest.approx(1.0)),
                                                 ("c", pytest.approx(2 / 3)), ("d", pytest.approx(0.5))]


def test_convex_matches_the_hand_computed_min_max_mix():
    fused = convex({"sparse": SPARSE, "dense": DENSE}, alpha=0.25)
    # sparse normalised: a 1, b 0.5, c 0; dense: b 1, d 0.5, c 0; absent from a route = 0 there.
    expected = {"a": 0.25 * 1.0, "b": 0.25 * 0.5 + 0.75 * 1.0, "c": 0.0, "d": 0.75 * 0.5}
    assert {f.key: f.score for f in fused} == pytest.approx(expected)
    assert [f.key for f in fused] == ["b", "d", "a", "c"]
    assert fused[0].parts == {"sparse": 3.0, "dense": 0.9} and fused[2].parts == {"sparse": 5.0}


def test_convex_normalises_a_complete_list_from_its_floor():
    # Every document outside the sparse list scores 0 there: a 5/5, b 3/5, c 1/5 (c still beats no match).
    fused = convex({"sparse": SPARSE, "dense": DENSE}, alpha=0.25, floors={"sparse": 0.0})
    expected = {"a": 0.25, "b": 0.25 * 0.6 + 0.75, "c": 0.25 * 0.2, "d": 0.75 * 0.5}
    assert {f.key: f.score for f in fused} == pytest.approx(expected)
    assert convex({"sparse": SPARSE, "dense": DENSE}, alpha=0.25, floors={"sparse": 2.0})[-1].key == "c"  # min wins


def test_convex_alpha_ends_are_the_single_routes():
    sparse_only = convex({"sparse": SPARSE, "dense": DENSE}, alpha=1.0)
    assert {f.key: f.score for f in sparse_only} == pytest.approx({"a": 1.0, "b": 0.5, "c": 0.0, "d": 0.0})
    dense_only = convex({"sparse": SPARSE, "dense": DENSE}, alpha=0.0)
    assert {f.key: f.score for f in dense_only} == pytest.approx({"a": 0.0, "b": 1.0, "c": 0.0, "d": 0.5})


def test_convex_gives_a_list_of_equal_scores_full_weight():
    # One candidate (or all tied): max = min, so every one of them normalises to 1, not 0/0.
    fused = convex({"sparse": [("a", 2.0)], "dense": [("a", 0.3), ("b", 0.3)]}, alpha=0.5)
    assert {f.key: f.score for f in fused} == pytest.approx({"a": 1.0, "b": 0.5})


def test_fusion_of_empty_lists_is_empty():
    assert rrf({"sparse": [], "dense": []}) == [] and convex({"sparse": [], "dense": []}) == []


def test_convex_refuses_bad_weights_and_more_than_two_routes():
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        convex({"sparse": SPARSE, "dense": DENSE}, alpha=1.5)
    with pytest.raises(ValueError, match="two routes"):
        convex({"sparse": SPARSE, "dense": DENSE, "other": DENSE})
