"""Ranking metrics against values computed by hand, and the TREC file formats they read and write."""

from __future__ import annotations

import math

import pytest

from stair_search.eval.metrics import (
    judged_queries,
    load_qrels,
    load_queries,
    load_trec_run,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    strictly_decreasing,
    success_at_k,
    write_qrels,
    write_queries,
    write_trec_run,
)

# Three judged queries (q4 has only a non-relevant judgement, so it is not averaged over):
#   q1: d1 grade 2, d3 grade 1             run: d3 d2 d1 d4
#   q2: d5 grade 1                          run: d6 d6 d7 d8 d9 d5   (d6 repeated: counts once, so d5 is rank 5)
#   q3: d9 grade 1, d8 grade 0              run: none (the system did not answer: scores 0)
QRELS = {"q1": {"d1": 2, "d3": 1}, "q2": {"d5": 1}, "q3": {"d9": 1, "d8": 0}, "q4": {"d2": 0}}
RUN = {"q1": ["d3", "d2", "d1", "d4"], "q2": ["d6", "d6", "d7", "d8", "d9", "d5"], "q4": ["d2"]}
BINARY = {qid: {doc: min(grade, 1) for doc, grade in judged.items()} for qid, judged in QRELS.items()}


def test_only_queries_with_a_relevant_document_are_averaged():
    assert judged_queries(QRELS) == ["q1", "q2", "q3"]


def test_recall_and_success_by_hand():
    # R@1: q1 finds d3 of {d1, d3} -> 1/2; q2 0; q3 0            -> (0.5 + 0 + 0) / 3
    assert recall_at_k(RUN, QRELS, 1) == pytest.approx(0.5 / 3)
    # R@3: q1 finds both -> 1; q2 (d6 d7 d8) 0; q3 0              -> 1 / 3
    assert recall_at_k(RUN, QRELS, 3) == pytest.approx(1 / 3)
    # R@5: q1 1; q2 d5 at rank 5 -> 1; q3 0                       -> 2 / 3
    assert recall_at_k(RUN, QRELS, 5) == pytest.approx(2 / 3)
    # S@1: q1 has a relevant document at rank 1 -> 1; others 0   -> 1 / 3
    assert success_at_k(RUN, QRELS, 1) == pytest.approx(1 / 3)


def test_mrr_by_hand():
    # q1: first relevant at rank 1 -> 1; q2: rank 5 -> 0.2; q3: 0  -> 1.2 / 3 = 0.4
    assert mrr_at_k(RUN, QRELS, 10) == pytest.approx(0.4)
    # @3 cuts q2's rank-5 hit                                      -> 1 / 3
    assert mrr_at_k(RUN, QRELS, 3) == pytest.approx(1 / 3)


def test_ndcg_graded_by_hand():
    # q1: DCG = 1/log2(2) (d3, grade 1) + 2/log2(4) (d1, grade 2) = 1 + 1 = 2
    #     ideal = 2/log2(2) + 1/log2(3) = 2 + 0.630930 = 2.630930      -> 0.760188
    # q2: DCG = 1/log2(6) = 0.386853, ideal = 1                         -> 0.386853
    # q3: 0                                                             -> mean 0.382347
    assert ndcg_at_k(RUN, QRELS, 10) == pytest.approx((0.760188 + 0.386853) / 3, abs=1e-6)
    assert ndcg_at_k(RUN, QRELS, 10) == pytest.approx(0.382347, abs=1e-6)


def test_ndcg_binary_by_hand():
    # q1 with both grades 1: DCG = 1 + 1/log2(4) = 1.5, ideal = 1 + 1/log2(3) = 1.630930 -> 0.919721
    # q2 0.386853, q3 0                                                   -> mean 0.435525
    assert ndcg_at_k(RUN, BINARY, 10) == pytest.approx(0.435525, abs=1e-6)
    # @1: q1's rank-1 doc has grade 1, ideal 1 -> 1; the others 0         -> 1 / 3
    assert ndcg_at_k(RUN, BINARY, 1) == pytest.approx(1 / 3)


def test_ndcg_of_the_ideal_ranking_is_one():
    ideal = {"q1": ["d1", "d3"], "q2": ["d5"], "q3": ["d9"]}
    assert ndcg_at_k(ideal, QRELS, 10) == pytest.approx(1.0)
    assert ndcg_at_k({"q1": ["d3", "d1"]}, {"q1": QRELS["q1"]}, 10) == pytest.approx(
        (1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k must be at least 1"):
        recall_at_k(RUN, QRELS, 0)


def test_trec_files_round_trip(tmp_path):
    run = {"q1": [("google/1f600", 3.5), ("twitter/1f600", 1.25)], "q2": [("d9", 0.5)]}
    path = write_trec_run(tmp_path / "run.trec", run, tag="dense")
    assert path.read_text().splitlines()[1] == "q1 Q0 twitter/1f600 2 1.250000 dense"
    assert load_trec_run(path) == {"q1": ["google/1f600", "twitter/1f600"], "q2": ["d9"]}

    assert load_qrels(write_qrels(tmp_path / "qrels.txt", QRELS)) == QRELS
    queries = {"q1": "grinning face", "q2": "keycap: #"}
    assert load_queries(write_queries(tmp_path / "queries.tsv", queries)) == queries


def test_bad_files_are_named_with_their_line(tmp_path):
    bad = tmp_path / "qrels.txt"
    bad.write_text("q1 0 d1 1\nq2 0 d2 relevant\n")
    with pytest.raises(ValueError, match=r"qrels.txt:2: expected TREC qrels"):
        load_qrels(bad)
    queries = tmp_path / "queries.tsv"
    queries.write_text("q1\tcat\nq1\tdog\n")
    with pytest.raises(ValueError, match=r"queries.tsv:2: query id 'q1' appears twice"):
        load_queries(queries)
    queries.write_text("q1 cat\n")
    with pytest.raises(ValueError, match=r"expected 'qid<TAB>text'"):
        load_queries(queries)
    with pytest.raises(FileNotFoundError, match="qrels file not found"):
        load_qrels(tmp_path / "missing.txt")


def test_ids_with_whitespace_are_refused(tmp_path):
    with pytest.raises(ValueError, match="contains whitespace"):
        write_trec_run(tmp_path / "run.trec", {"q1": [("my photo.jpg", 1.0)]})
    with pytest.raises(ValueError, match="contains whitespace"):
        write_qrels(tmp_path / "qrels.txt", {"q 1": {"d1": 1}})


def test_run_files_break_ties_so_any_tool_reads_the_ranked_order(tmp_path):
    """Tied scores (integer impacts, equal RRF sums) in rank order; docids sorted against it on purpose."""
    run = {"q1": [("z", 3.0), ("b", 3.0), ("a", 3.0), ("c", 2.0000004), ("d", 2.0)]}
    path = write_trec_run(tmp_path / "run.trec", run)
    rows = [line.split() for line in path.read_text().splitlines()]
    assert [float(r[4]) for r in rows] == [3.0, 2.999999, 2.999998, 2.0, 1.999999]
    by_score_then_docid = sorted(rows, key=lambda r: (-float(r[4]), r[2]))  # trec_eval's reading
    assert [r[2] for r in by_score_then_docid] == ["z", "b", "a", "c", "d"]
    assert strictly_decreasing([1.0, 5.0]) == [1.0, 0.999999]  # never above the one before either
