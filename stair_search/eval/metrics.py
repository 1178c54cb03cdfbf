"""Ranking metrics and the TREC file formats they are read from and written to.

A *run* maps a query id to its ranked document ids, best first; *qrels* map a query id to ``{doc id: grade}``.
A document is relevant when its grade is above 0. Every metric is averaged over the queries of ``qrels`` that
have at least one relevant document, and a query the run does not answer scores 0: a system cannot look
better by staying silent on hard queries (trec_eval's ``-c`` convention). Repeated documents in a ranking
count once, at their first position.

Definitions (``rel(d)`` the grade, ``R`` the relevant set of a query):

* ``recall_at_k``  = |R ∩ top k| / |R|  (trec_eval ``recall_k``; with one relevant document per query, as in
  known-item search, it is the share of queries whose item is in the top k);
* ``success_at_k`` = 1 if any relevant document is in the top k, else 0;
* ``mrr_at_k``     = 1 / rank of the first relevant document within the top k, else 0;
* ``ndcg_at_k``    = DCG@k / ideal DCG@k, with linear gain ``rel / log2(rank + 1)`` as in trec_eval's
  ``ndcg_cut`` (with binary grades linear and exponential gain agree).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

Run = Mapping[str, Sequence[str]]
Qrels = Mapping[str, Mapping[str, int]]
ScoredRun = Mapping[str, Sequence[tuple[str, float]]]


def _unique(ranking: Iterable[str]) -> list[str]:
    """Ranking with repeats removed (first position kept), so a duplicated hit cannot be counted twice."""
    return list(dict.fromkeys(ranking))


def _relevant(judged: Mapping[str, int]) -> dict[str, int]:
    return {doc: grade for doc, grade in judged.items() if grade > 0}


def _mean_over_judged(run: Run, qrels: Qrels, k: int, score: Callable[[list[str], dict[str, int]], float]) -> float:
    """Mean of ``score(top k, relevant)`` over the queries of ``qrels`` that have a relevant document."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    values = []
    for qid, judged in qrels.items():
        relevant = _relevant(judged)
        if relevant:
            values.append(score(_unique(run.get(qid, ()))[:k], relevant))
    return sum(values) / len(values) if values else 0.0


def recall_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Share of each query's relevant documents found in its top ``k``, averaged over queries."""
    return _mean_over_judged(run, qrels, k, lambda top, rel: sum(doc in rel for doc in top) / len(rel))


def success_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Share of queries with at least one relevant document in the top ``k``."""
    return _mean_over_judged(run, qrels, k, lambda top, rel: float(any(doc in rel for doc in top)))


def mrr_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Mean reciprocal rank of the first relevant document, counting only the top ``k``."""

    def reciprocal_rank(top: list[str], rel: dict[str, int]) -> float:
        return next((1.0 / rank for rank, doc in enumerate(top, start=1) if doc in rel), 0.0)

    return _mean_over_judged(run, qrels, k, reciprocal_rank)


def _dcg(grades: Iterable[int]) -> float:
    return sum(grade / math.log2(rank + 1) for rank, grade in enumerate(grades, start=1))


def ndcg_at_k(run: Run, qrels: Qrels, k: int) -> float:
    """Normalised discounted cumulative gain at ``k`` (graded relevance, linear gain)."""

    def ndcg(top: list[str], rel: dict[str, int]) -> float:
        ideal = _dcg(sorted(rel.values(), reverse=True)[:k])
        return _dcg(rel.get(doc, 0) for doc in top) / ideal

    return _mean_over_judged(run, qrels, k, ndcg)


def judged_queries(qrels: Qrels) -> list[str]:
    """The query ids that metrics average over: those with at least one relevant document."""
    return [qid for qid, judged in qrels.items() if _relevant(judged)]


# ------------------------------------------------------------------------------------------------------------
# Files


def load_qrels(path: str | Path) -> dict[str, dict[str, int]]:
    """Read TREC qrels (``qid iteration docid grade`` per line; blank lines and ``#`` comments skipped)."""
    path = Path(path)
    qrels: dict[str, dict[str, int]] = {}
    for number, line in enumerate(_read_lines(path, "qrels"), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 4 or not _is_int(fields[3]):
            raise ValueError(f"{path}:{number}: expected TREC qrels 'qid 0 docid grade' (grade an integer), "
                             f"got {line.strip()!r}")
        qrels.setdefault(fields[0], {})[fields[2]] = int(fields[3])
    return qrels


def load_queries(path: str | Path) -> dict[str, str]:
    """Read a query file: ``qid<TAB>text`` per line (the text may contain spaces, not tabs)."""
    path = Path(path)
    queries: dict[str, str] = {}
    for number, line in enumerate(_read_lines(path, "queries"), start=1):
        if not line.strip():
            continue
        qid, sep, text = line.rstrip("\r\n").partition("\t")
        if not sep or not qid.strip() or not text.strip():
            raise ValueError(f"{path}:{number}: expected 'qid<TAB>text', got {line.rstrip()!r}")
        if qid in queries:
            raise ValueError(f"{path}:{number}: query id {qid!r} appears twice; query ids must be unique")
        queries[qid] = text.strip()
    return queries


def write_queries(path: str | Path, queries: Mapping[str, str]) -> Path:
    """Write ``qid<TAB>text`` lines; refuses ids or texts that would not read back the same."""
    path = Path(path)
    lines = []
    for qid, text in queries.items():
        if not qid or any(c.isspace() for c in qid) or "\t" in text or "\n" in text or not text.strip():
            raise ValueError(f"query {qid!r}: ids must be non-empty without spaces, texts one line without tabs")
        lines.append(f"{qid}\t{text}\n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


def write_qrels(path: str | Path, qrels: Qrels) -> Path:
    """Write TREC qrels (``qid 0 docid grade``), queries and documents in the given order."""
    path = Path(path)
    _check_tokens(path, [*qrels, *(doc for judged in qrels.values() for doc in judged)])
    lines = [f"{qid} 0 {doc} {grade}\n" for qid, judged in qrels.items() for doc, grade in judged.items()]
    path.write_text("".join(lines), encoding="utf-8")
    return path


SCORE_STEP = 1e-6  # the score column's precision: a tie is broken by this much


def write_trec_run(path: str | Path, run: ScoredRun, tag: str = "stair-search") -> Path:
    """Write a TREC run file: ``qid Q0 docid rank score tag``, ranks from 1 in the given order.

    trec_eval and its family sort by the score column and break ties by docid, not by rank; our rankings hold
    real ties (integer impacts, equal RRF sums, identical images). So the written scores strictly decrease
    with rank: a score that is not below the one above it (at the written precision) is written
    ``SCORE_STEP`` below it. Any tool then reads the order the printed metrics were computed on.
    """
    path = Path(path)
    _check_tokens(path, [tag, *run, *(doc for ranked in run.values() for doc, _ in ranked)])
    lines = [f"{qid} Q0 {doc} {rank} {score:.6f} {tag}\n" for qid, ranked in run.items()
             for rank, (doc, score) in enumerate(zip((d for d, _ in ranked), strictly_decreasing(
                 [s for _, s in ranked]), strict=True), start=1)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


def strictly_decreasing(scores: Sequence[float], step: float = SCORE_STEP) -> list[float]:
    """``scores`` (best first), each lowered just enough to be ``step`` below the one before, rounded to it."""
    out: list[float] = []
    for score in scores:
        value = round(score / step) * step
        if out and value > out[-1] - step / 2:
            value = out[-1] - step
        out.append(value)
    return out


def load_trec_run(path: str | Path) -> dict[str, list[str]]:
    """Read a TREC run file back into qid -> doc ids, ordered by the rank column."""
    path = Path(path)
    ranked: dict[str, list[tuple[int, str]]] = {}
    for number, line in enumerate(_read_lines(path, "run"), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 6 or not _is_int(fields[3]):
            raise ValueError(f"{path}:{number}: expected 'qid Q0 docid rank score tag', got {line.strip()!r}")
        ranked.setdefault(fields[0], []).append((int(fields[3]), fields[2]))
    return {qid: [doc for _, doc in sorted(pairs)] for qid, pairs in ranked.items()}


def _read_lines(path: Path, kind: str) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"{kind} file not found: {path}")
    return path.read_text(encoding="utf-8").splitlines()


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _check_tokens(path: Path, tokens: Iterable[str]) -> None:
    """TREC files are whitespace separated: an id with a space in it would silently shift every column."""
    for token in tokens:
        if not token or any(c.isspace() for c in token):
            raise ValueError(f"cannot write {path}: id {token!r} is empty or contains whitespace")
