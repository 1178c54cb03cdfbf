"""build_lucene (Lucene IndexWriter, impact = term frequency) against exact CSR scoring of the same rows."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest

from stair_search.index import sparse
from stair_search.index.sparse import MAX_IMPACT, SparseHit, SparseShard, index_dtype, write_sparse_shard
from stair_search.vocabulary import Vocabulary

SCALE = 100.0
PUNCTUATION = ["|", "%", "#", "+", "\\", "~", "##s", "[UNK]", "—", "×"]  # spelled %7C, %25, #, %2B, ...
EMPTY_ROWS = (0, 157)


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.load()


def random_csr(vocab: Vocabulary, rows: int = 300):
    """Rows over a small token pool (so queries hit many rows and scores tie), two rows without tokens,
    impacts 1..500 with some 1s, and one 65535 in every 25th row."""
    rng = np.random.default_rng(11)
    pool = [vocab.index[t] for t in PUNCTUATION] + rng.choice(len(vocab), 70, replace=False).tolist()
    pool = np.unique(pool)
    indptr, indices, values = [0], [], []
    for row in range(rows):
        count = 0 if row in EMPTY_ROWS else int(rng.integers(1, 25))
        ids = np.sort(rng.choice(pool, count, replace=False))
        impacts = rng.integers(1, 500, count)
        impacts[rng.random(count) < 0.1] = 1
        if count and row % 25 == 3:
            impacts[0] = MAX_IMPACT
        indices.extend(ids.tolist())
        values.extend(impacts.tolist())
        indptr.append(len(indices))
    csr = (np.asarray(indptr, np.int64), np.asarray(indices, index_dtype(len(vocab))), np.asarray(values, np.uint16))
    return csr, pool


def queries(vocab: Vocabulary, pool: np.ndarray) -> list[dict[str, float]]:
    """1-token queries for every punctuation token and a few others, then 2- and 8-token ones; weights give
    query impacts 1..200, so every score (< 2**24) is exact in Lucene's float."""
    rng = np.random.default_rng(5)
    out = [{t: 1.0} for t in PUNCTUATION] + [{vocab.tokens[i]: 0.37} for i in pool[:10]]
    for size in (2, 8):
        for _ in range(20):
            ids = rng.choice(pool, size, replace=False)
            out.append({vocab.tokens[i]: float(w) for i, w in zip(ids, rng.uniform(0.01, 2.0, size), strict=True)})
    out.append({vocab.tokens[pool[0]]: 0.005, "|": 2.0})  # a weight that quantises to impact 1
    return out


def units(hit: SparseHit) -> int:
    """A hit's score in Lucene's units, an integer (query impacts times document impacts). Pyserini's searcher
    reports the n-th of tied scores lowered by n * 1e-6 (Anserini's ScoreTiesAdjusterReranker): rounding
    undoes that, and the check below that it stays under 1e-3 keeps it honest."""
    return round(hit.score * SCALE**2)


def mismatch(hits: list[SparseHit], exact: list[SparseHit], k: int) -> str | None:
    """Why Lucene's top-k differs from exact scoring (all matching rows, best first), else None: scores equal
    in order; per score, ids are rows with that exact score, and all of them unless the score is the cut."""
    if [units(h) for h in hits] != [units(h) for h in exact[:k]]:
        return f"scores {[units(h) for h in hits]} != exact {[units(h) for h in exact[:k]]}"
    if any(abs(h.score * SCALE**2 - units(h)) > 1e-3 for h in hits):
        return f"scores {[h.score for h in hits]} are not whole Lucene units"
    exact_rows, got = defaultdict(set), defaultdict(list)
    for h in exact:
        exact_rows[units(h)].add(h.row)
    for h in hits:
        got[units(h)].append(h.row)
    for score, rows in got.items():
        at_cut = len(hits) == k and score == units(hits[-1])
        if len(set(rows)) != len(rows) or not set(rows) <= exact_rows[score] or (
                not at_cut and set(rows) != exact_rows[score]):
            return f"rows {sorted(rows)} at score {score}, exact rows {sorted(exact_rows[score])}"
    return None


@pytest.mark.parametrize("threads, block_rows", [(1, None), (3, 16)])  # 16: 19 blocks over 3 writer threads
def test_lucene_search_equals_exact_csr_scoring(tmp_path, vocab, monkeypatch, threads, block_rows):
    if block_rows:
        monkeypatch.setattr(sparse, "_BLOCK_ROWS", block_rows)
    csr, pool = random_csr(vocab)
    assert csr[2].min() == 1 and csr[2].max() == MAX_IMPACT
    write_sparse_shard(tmp_path, csr, vocab, threads=threads)
    shard = SparseShard(tmp_path, vocab, SCALE)
    assert shard.open_searcher().num_docs == len(csr[0]) - 1 - len(EMPTY_ROWS)  # and the shard's own check passed
    qs = queries(vocab, pool)
    rows = np.arange(len(shard))
    for k in (10, 40):
        results = shard.batch_search(qs, k=k, threads=2)
        assert not getattr(shard, "accelerated", lambda: None)()  # Lucene answered, not an in-process searcher
        compared = 0
        for query, hits in zip(qs, results, strict=True):
            exact = shard.search_rows(query, rows, k=len(rows))
            assert exact, query
            assert mismatch(hits, exact, k) is None, (query, mismatch(hits, exact, k))
            assert not {h.row for h in hits} & set(EMPTY_ROWS)
            compared += len(hits)
        assert compared > 20 * k
    # the largest impact is in the index as such (a query impact of 1 scores it 65535)
    top = shard.search({vocab.tokens[int(csr[1][csr[0][3]])]: 0.01}, k=1)
    assert top[0].row % 25 == 3 and top[0].score == MAX_IMPACT / SCALE**2
    shard.close()


def test_impacts_out_of_range_are_refused(tmp_path, vocab):
    csr = (np.array([0, 1], np.int64), np.array([vocab.index["dog"]], np.uint16), np.array([0], np.uint16))
    with pytest.raises(ValueError, match="Impacts must be"):
        write_sparse_shard(tmp_path, csr, vocab)
