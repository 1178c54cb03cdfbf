"""The evaluation runner end to end: a real tiny index of drawn shapes, qrels written here, the public router."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from typer.testing import CliRunner

from stair_search.cli import app
from stair_search.eval.metrics import load_trec_run, mrr_at_k, ndcg_at_k, recall_at_k, write_qrels, write_queries
from stair_search.eval.runner import (
    DEFAULT_MODES,
    ROUTES,
    evaluate_router,
    parse_rerank_sets,
)
from stair_search.index import FeatureRecord, IndexReader, IndexWriter
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import COLOURS, draw_shape

SHAPES = ("circle", "square", "triangle")
QUERIES = {"q-red": "a red circle", "q-blue": "blue square", "q-yellow": "a yellow triangle", "q-green": "green"}
# Relevant: every shape of the colour the query names (3 documents each).
COLOUR_QRELS = {qid: {f"{colour}-{shape}": 1 for shape in SHAPES}
                for qid, colour in (("q-red", "red"), ("q-blue", "blue"), ("q-yellow", "yellow"), ("q-green", "green"))}


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, tiny_encoder):
    path = tmp_path_factory.mktemp("eval") / "shapes"
    items = [(colour, shape) for colour in COLOURS for shape in SHAPES]
    records = [FeatureRecord(id=f"{c}-{s}", source=f"drawn://{c}/{s}", width=64, height=64, caption=f"a {c} {s}")
               for c, s in items]
    with IndexWriter(path, tiny_encoder.record, shard_size=100) as writer:
        writer.add(records, tiny_encoder.encode_images([draw_shape(c, s) for c, s in items]))
        writer.commit()
    return path


@pytest.fixture(scope="module")
def router(index_dir, tiny_encoder) -> QueryRouter:
    return QueryRouter(IndexReader(index_dir), tiny_encoder)


def _direct_run(router: QueryRouter, route: str, k: int = 10) -> dict[str, list[str]]:
    """What a user gets from the public API for each query, asked here without the runner."""
    return {qid: [hit.id for hit in router.search(SearchRequest(text=text, k=k, **ROUTES[route])).hits]
            for qid, text in QUERIES.items()}


def test_metrics_follow_the_judged_position(router):
    # Judge each query's second dense hit relevant: by hand R@1 = 0, R@5 = 1, MRR@10 = 1/2, nDCG@10 = 1/log2(3).
    dense = _direct_run(router, "dense")
    qrels = {qid: {ranked[1]: 1} for qid, ranked in dense.items()}
    row = evaluate_router(router, QUERIES, qrels, modes=["dense"]).row("dense")
    assert row.metrics["R@1"] == 0.0
    assert row.metrics["R@5"] == row.metrics["R@10"] == 1.0
    assert row.metrics["MRR@10"] == pytest.approx(0.5)
    assert row.metrics["nDCG@10"] == pytest.approx(1 / math.log2(3))
    assert row.queries == len(QUERIES) and row.ms_per_query > 0


def test_every_mode_writes_the_run_users_get(router, tmp_path):
    report = evaluate_router(router, QUERIES, COLOUR_QRELS, runs_dir=tmp_path / "runs")
    assert [row.config for row in report.rows] == list(DEFAULT_MODES)
    for row in report.rows:
        run = load_trec_run(row.run_path)
        direct = _direct_run(router, row.config)
        # A query with no hit (sparse: no shared token) has no line in a TREC run file.
        assert run == {qid: ranked for qid, ranked in direct.items() if ranked}
        assert 0 < sum(map(len, run.values())) <= 10 * len(QUERIES)
        expected = {"R@1": recall_at_k(run, COLOUR_QRELS, 1), "R@10": recall_at_k(run, COLOUR_QRELS, 10),
                    "MRR@10": mrr_at_k(run, COLOUR_QRELS, 10), "nDCG@10": ndcg_at_k(run, COLOUR_QRELS, 10)}
        assert {name: row.metrics[name] for name in expected} == pytest.approx(expected)
        for qid in run:  # ordered by score alone (as trec_eval reads it), the file gives the same ranking
            lines = [line.split() for line in row.run_path.read_text().splitlines() if line.split()[0] == qid]
            scores = [float(fields[4]) for fields in lines]
            assert all(a > b for a, b in itertools.pairwise(scores)), (row.config, qid, scores)
            assert [fields[2] for fields in sorted(lines, key=lambda f: -float(f[4]))] == run[qid]
    table = report.to_markdown()
    assert "| configuration | R@1 | S@1 | R@5 | R@10 | MRR@10 | nDCG@10 | ms/query |" in table
    hybrid = report.row("hybrid-rrf")
    assert f"| hybrid-rrf | {100 * hybrid.metrics['R@1']:.1f} |" in table


def test_rerank_sets_each_run_as_a_configuration(router):
    report = evaluate_router(router, QUERIES, COLOUR_QRELS, modes=["dense"], rerank_sets=[(), ("bsap",)])
    assert report.row("dense").rerank == ()
    assert report.row("dense+bsap").rerank == ("bsap",)
    assert parse_rerank_sets(["none", "bsap, ssp", "none"]) == [(), ("bsap", "ssp")]
    assert ("comclip",) in parse_rerank_sets(["each"])


def test_inconsistent_inputs_are_refused(router):
    with pytest.raises(ValueError, match="no text in the queries file"):
        evaluate_router(router, QUERIES, {**COLOUR_QRELS, "q-other": {"red-circle": 1}})
    with pytest.raises(ValueError, match="unknown mode"):
        evaluate_router(router, QUERIES, COLOUR_QRELS, modes=["bm25"])
    with pytest.raises(ValueError, match=r"unknown reranker\(s\) \['magic'\]"):
        evaluate_router(router, QUERIES, COLOUR_QRELS, rerank_sets=[("magic",)])
    with pytest.raises(ValueError, match="judge no document relevant"):
        evaluate_router(router, QUERIES, {"q-red": {"red-circle": 0}})


def test_cli_eval_prints_the_table_and_writes_runs(index_dir, tmp_path):
    queries = write_queries(tmp_path / "queries.tsv", QUERIES)
    qrels = write_qrels(tmp_path / "qrels.txt", COLOUR_QRELS)
    result = CliRunner().invoke(app, ["eval", str(index_dir), str(queries), str(qrels), "--mode", "sparse",
                                      "--mode", "hybrid-convex", "--runs-dir", str(tmp_path / "runs"),
                                      "--json", str(tmp_path / "report.json")])
    assert result.exit_code == 0, result.output
    assert "| sparse |" in result.output and "| hybrid-convex |" in result.output
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["hybrid-convex.trec", "sparse.trec"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert [row["config"] for row in report["rows"]] == ["sparse", "hybrid-convex"]
    assert report["queries"] == len(QUERIES)

    (tmp_path / "bad.txt").write_text("q-red red-circle 1\n")
    result = CliRunner().invoke(app, ["eval", str(index_dir), str(queries), str(tmp_path / "bad.txt")])
    assert result.exit_code != 0 and "expected TREC qrels" in result.output
