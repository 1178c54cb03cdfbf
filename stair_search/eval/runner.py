"""Evaluate search configurations on an index with judged queries, through the public router API only.

Every query goes through :meth:`QueryRouter.search`, exactly as a user's would (encoding, routes, fusion,
rerankers, document lookup), so the figures are what users get, latency included. A *configuration* is a
route setting (``sparse``, ``dense``, ``hybrid-rrf``, ``hybrid-convex`` or ``auto``) combined with a set of
rerankers (none, or names from ``stair_search.rerank.RERANKERS``).

Latency: one untimed warm-up query per configuration (first-use costs such as JVM start and lazy loading are
not per-query costs), then the mean wall time of ``search`` over all judged queries.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stair_search.eval import metrics as m
from stair_search.rerank import RERANKERS, check_names
from stair_search.retrieve import SearchRequest

ROUTES: dict[str, dict[str, str]] = {
    "sparse": {"mode": "sparse"},
    "dense": {"mode": "dense"},
    "hybrid-rrf": {"mode": "hybrid", "fusion": "rrf"},
    "hybrid-convex": {"mode": "hybrid", "fusion": "convex"},
    # The model's own routes only: an index's text route (BM25 over captions) would answer label queries from
    # the captions themselves; "auto+text" and "text" measure it when wanted.
    "auto": {"mode": "auto", "use_text": False},
    "auto+text": {"mode": "auto"},
    "text": {"mode": "text"},
}
DEFAULT_MODES = ("sparse", "dense", "hybrid-rrf", "hybrid-convex", "auto")
# R@1 is recall: with several relevant documents it is capped at 1/|R|; S@1 (success: is the first hit
# relevant?) is printed beside it.
METRICS = ("R@1", "S@1", "R@5", "R@10", "MRR@10", "nDCG@10")


def compute_metrics(run: m.Run, qrels: m.Qrels) -> dict[str, float]:
    """The report's metrics for one run."""
    return {"R@1": m.recall_at_k(run, qrels, 1), "S@1": m.success_at_k(run, qrels, 1),
            "R@5": m.recall_at_k(run, qrels, 5),
            "R@10": m.recall_at_k(run, qrels, 10), "MRR@10": m.mrr_at_k(run, qrels, 10),
            "nDCG@10": m.ndcg_at_k(run, qrels, 10)}


@dataclass
class EvalRow:
    config: str  # e.g. "hybrid-rrf" or "dense+bsap"
    mode: str
    rerank: tuple[str, ...]
    metrics: dict[str, float]
    ms_per_query: float
    queries: int
    run_path: Path | None = None


@dataclass
class EvalReport:
    rows: list[EvalRow]
    k: int = 10
    queries: int = 0  # judged queries evaluated per configuration
    title: str = ""

    def row(self, config: str) -> EvalRow:
        for row in self.rows:
            if row.config == config:
                return row
        raise KeyError(f"no configuration {config!r} in this report; it has {[r.config for r in self.rows]}")

    def to_markdown(self) -> str:
        """A markdown table (metrics in %, latency in ms per query)."""
        lines = [f"**{self.title}**", ""] if self.title else []
        lines += ["| configuration | " + " | ".join(METRICS) + " | ms/query |",
                  "|---|" + "---:|" * (len(METRICS) + 1)]
        for row in self.rows:
            values = " | ".join(f"{100 * row.metrics[name]:.1f}" for name in METRICS)
            lines.append(f"| {row.config} | {values} | {row.ms_per_query:.1f} |")
        lines += ["", f"{self.queries} judged queries, k = {self.k}; metrics in %."]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "k": self.k, "queries": self.queries,
                "rows": [{"config": r.config, "mode": r.mode, "rerank": list(r.rerank), "metrics": r.metrics,
                          "ms_per_query": r.ms_per_query, "queries": r.queries,
                          "run_path": str(r.run_path) if r.run_path else None} for r in self.rows]}


def parse_rerank_sets(values: Sequence[str]) -> list[tuple[str, ...]]:
    """CLI spelling of rerank sets: ``none`` (no reranker), ``each`` (every reranker alone) or ``a,b`` (several,
    fused together)."""
    sets: list[tuple[str, ...]] = []
    for value in values:
        if value.strip().lower() == "none":
            sets.append(())
        elif value.strip().lower() == "each":
            sets += [(name,) for name in RERANKERS]
        else:
            sets.append(tuple(name.strip() for name in value.split(",") if name.strip()))
    return list(dict.fromkeys(sets)) or [()]


def _config_name(route: str, rerank: Sequence[str]) -> str:
    return "+".join([route, *rerank])


def _check_configurations(modes: Sequence[str], rerank_sets: Sequence[Sequence[str]]) -> None:
    unknown = [route for route in modes if route not in ROUTES]
    if unknown:
        raise ValueError(f"unknown mode(s) {unknown}; expected some of {list(ROUTES)}")
    for names in rerank_sets:
        check_names(names)


def _judged_texts(queries: Mapping[str, str], qrels: m.Qrels) -> dict[str, str]:
    """Texts of the judged queries; refuses qrels whose queries have no text (files from different sets)."""
    judged = m.judged_queries(qrels)
    if not judged:
        raise ValueError("the qrels judge no document relevant for any query; nothing to evaluate")
    missing = [qid for qid in judged if qid not in queries]
    if missing:
        raise ValueError(f"{len(missing)} of {len(judged)} judged queries have no text in the queries file "
                         f"(e.g. {missing[:3]}); are the queries and qrels from the same split and kind?")
    return {qid: queries[qid] for qid in judged}


def _run_configuration(router: Any, texts: Mapping[str, str], route: str, rerank: tuple[str, ...], k: int,
                       options: Mapping[str, Any]) -> tuple[dict[str, list[tuple[str, float]]], float]:
    """Search every query; return the scored run and the mean milliseconds per query."""
    request = SearchRequest(**ROUTES[route], k=k, rerank=rerank, **options)
    router.search(replace(request, text=next(iter(texts.values()))))  # warm-up, untimed
    run: dict[str, list[tuple[str, float]]] = {}
    elapsed = 0.0
    for qid, text in texts.items():
        started = time.perf_counter()
        response = router.search(replace(request, text=text))
        elapsed += time.perf_counter() - started
        run[qid] = [(hit.id, float(hit.score)) for hit in response.hits]
    return run, 1000.0 * elapsed / len(texts)


def evaluate_router(router: Any, queries: Mapping[str, str], qrels: m.Qrels, modes: Sequence[str] = DEFAULT_MODES,
                    rerank_sets: Sequence[Sequence[str]] = ((),), k: int = 10, alpha: float = 0.5,
                    depth: int | None = None, runs_dir: str | Path | None = None, title: str = "") -> EvalReport:
    """Evaluate every (mode, rerank set) configuration with an open :class:`QueryRouter`.

    ``depth`` (candidates fetched before fusion and reranking) is passed only when given. ``runs_dir``, when
    given, receives one TREC run file per configuration, ``<configuration>.trec``.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rerank_sets = [tuple(names) for names in rerank_sets] or [()]
    _check_configurations(modes, rerank_sets)
    texts = _judged_texts(queries, qrels)
    options: dict[str, Any] = {"alpha": alpha}
    if depth is not None:
        options["depth"] = depth
    if runs_dir is not None:
        Path(runs_dir).mkdir(parents=True, exist_ok=True)
    report = EvalReport(rows=[], k=k, queries=len(texts), title=title)
    for route in modes:
        for rerank in rerank_sets:
            name = _config_name(route, rerank)
            run_options = options if ROUTES[route].get("fusion") == "convex" else _without_alpha(options)
            scored, ms = _run_configuration(router, texts, route, rerank, k, run_options)
            run_path = m.write_trec_run(Path(runs_dir) / f"{name}.trec", scored, tag=name) if runs_dir else None
            ranked = {qid: [doc for doc, _ in hits] for qid, hits in scored.items()}
            report.rows.append(EvalRow(config=name, mode=ROUTES[route]["mode"], rerank=rerank,
                                       metrics=compute_metrics(ranked, qrels), ms_per_query=ms,
                                       queries=len(texts), run_path=run_path))
    return report


def _without_alpha(options: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in options.items() if key != "alpha"}


def evaluate(index_dir: str | Path, queries: str | Path | Mapping[str, str], qrels: str | Path | m.Qrels,
             modes: Sequence[str] = DEFAULT_MODES, rerank_sets: Sequence[Sequence[str]] = ((),), k: int = 10,
             model: str | None = None, alpha: float = 0.5, depth: int | None = None,
             runs_dir: str | Path | None = None) -> EvalReport:
    """Open ``index_dir`` with its recorded model (or ``model``) and evaluate it; see :func:`evaluate_router`.

    ``queries`` is a ``qid<TAB>text`` file or a dict, ``qrels`` a TREC qrels file or a dict.
    """
    from stair_search.retrieve import open_router

    query_texts = m.load_queries(queries) if isinstance(queries, str | Path) else dict(queries)
    judgements = m.load_qrels(qrels) if isinstance(qrels, str | Path) else qrels
    title = f"{Path(index_dir).name}: " + (Path(qrels).name if isinstance(qrels, str | Path) else "qrels")
    router = open_router(index_dir, model)
    return evaluate_router(router, query_texts, judgements, modes=modes, rerank_sets=rerank_sets, k=k,
                           alpha=alpha, depth=depth, runs_dir=runs_dir, title=title)
