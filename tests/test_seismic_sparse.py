"""The in-process Seismic sparse searcher (index/seismic.py) against exact CSR scoring and Lucene.

One real shard (CSR + Lucene through ``write_sparse_shard``, then ``build_seismic`` as the writer runs it)
of random rows, some empty. Queries of 1 and 2 tokens take the exact postings path and must equal exact
scoring in rows and scores; 8- and 16-token queries take Seismic and must reach recall@10 >= 0.99 against
exact scoring (ties at the 10th score count as hits), every returned score exact. Lucene gives the same scores.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from stair_search.index import seismic as acc
from stair_search.index.sparse import DEFAULT_SCALE, SparseShard, quantise, write_sparse_shard
from stair_search.vocabulary import Vocabulary

pytest.importorskip("seismic")

ROWS, POOL, K = 3000, 400, 10
LENGTHS = (1, 2, 8, 16)


@pytest.fixture(scope="module")
def vocab():
    return Vocabulary.load()


def random_csr(rng: np.random.Generator, vocab: Vocabulary):
    pool = rng.choice(np.flatnonzero(vocab.emittable), POOL, replace=False)
    lengths = rng.integers(1, 40, ROWS)
    lengths[rng.random(ROWS) < 0.05] = 0  # images whose sparse vector is all zeros
    lengths[:3] = 0
    indices = [np.sort(rng.choice(pool, n, replace=False)) for n in lengths]
    indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    values = quantise(rng.lognormal(-0.3, 0.6, int(indptr[-1])), DEFAULT_SCALE)
    return (indptr, np.concatenate(indices).astype(np.uint16), values), pool


@pytest.fixture(scope="module")
def shard_data(tmp_path_factory, vocab):
    rng = np.random.default_rng(7)
    csr, pool = random_csr(rng, vocab)
    folder = tmp_path_factory.mktemp("shard") / "sparse"
    write_sparse_shard(folder, csr, vocab, threads=2)
    assert acc.build_seismic(folder, *csr, len(vocab.tokens), threads=2)
    queries = {n: [{vocab.tokens[t]: float(w) for t, w in zip(rng.choice(pool, n, replace=False),
                                                              rng.lognormal(-0.3, 0.6, n), strict=True)}
                   for _ in range(50)] for n in LENGTHS}
    return folder, csr, queries


def hits(results):
    return [(h.row, h.score) for h in results]


def matches_exact(got, exact) -> bool:
    """Same scores, and the same rows apart from the order and choice among rows tied at the last score."""
    if [s for _, s in got] != [s for _, s in exact]:
        return False
    last = exact[-1][1] if exact else None
    return {r for r, s in got if s != last} == {r for r, s in exact if s != last}


def test_seismic_equals_exact_scoring_and_lucene(shard_data, vocab):
    folder, _, queries = shard_data
    shard = SparseShard(folder, vocab, DEFAULT_SCALE)
    assert shard.seismic() is not None and shard.seismic().seismic is not None
    everything = np.arange(len(shard))
    recall = {}
    for n, qs in queries.items():
        got = shard.batch_search(qs, K)
        assert shard._searcher is None  # answered in process: no JVM
        found = total = 0
        for q, result in zip(qs, got, strict=True):
            exact = hits(shard.search_rows(q, everything, K))
            mine = hits(result)
            assert all(r not in (0, 1, 2) for r, _ in mine)  # empty rows never match
            # every returned score is the exact dot product of that row
            assert all(hits(shard.search_rows(q, np.asarray([r]), 1)) == [(r, s)] for r, s in mine)
            if n <= acc.SHORT_QUERY:  # exact path: identical, ties broken by row
                assert mine == exact, (n, q)
            last = exact[-1][1] if exact else 0
            found += sum(s >= last for _, s in mine)
            total += len(exact)
        recall[n] = found / total
    assert min(recall.values()) >= 0.99, recall
    assert recall[1] == recall[2] == 1.0

    seismic = shard.seismic()
    shard._seismic = None  # force the Lucene route on the same shard
    for n, qs in queries.items():
        for q, theirs in zip(qs, shard.batch_search(qs, K, threads=2), strict=True):
            assert matches_exact(hits(theirs), hits(shard.search_rows(q, everything, K))), (n, q)
    shard._seismic = seismic
    shard.close()


def test_same_results_through_lucene_without_the_seismic_files(shard_data, vocab, tmp_path):
    folder, _, queries = shard_data
    copy = tmp_path / "sparse"
    shutil.copytree(folder, copy)
    fast = SparseShard(folder, vocab, DEFAULT_SCALE)
    shutil.rmtree(copy / acc.ACCELERATED_DIR)  # an index written before the accelerated searcher existed
    old = SparseShard(copy, vocab, DEFAULT_SCALE)
    assert old.seismic() is None
    for qs in queries.values():
        for a, b in zip(fast.batch_search(qs, K), old.batch_search(qs, K, threads=2), strict=True):
            assert matches_exact(hits(a), hits(b))
    assert old._searcher is not None
    old.close()
    fast.close()


@pytest.mark.parametrize("damage", ["truncate", "meta", "postings"])
def test_a_damaged_seismic_index_falls_back_to_lucene(shard_data, vocab, tmp_path, damage):
    folder, _, queries = shard_data
    copy = tmp_path / "sparse"
    shutil.copytree(folder, copy)
    target = copy / acc.ACCELERATED_DIR
    if damage == "truncate":
        data = (target / acc.SEISMIC_FILE).read_bytes()
        (target / acc.SEISMIC_FILE).write_bytes(data[: len(data) // 3])
    elif damage == "meta":
        (target / acc.META_FILE).write_text("{not json", encoding="utf-8")
    else:
        np.save(target / "postings_rows.npy", np.zeros(5, np.int32))
    shard = SparseShard(copy, vocab, DEFAULT_SCALE)
    assert shard.seismic() is None
    qs = queries[1] + queries[16]
    everything = np.arange(len(shard))
    for q, result in zip(qs, shard.batch_search(qs, K), strict=True):
        assert matches_exact(hits(result), hits(shard.search_rows(q, everything, K)))
    shard.close()


def test_edge_cases(shard_data, vocab, tmp_path):
    folder, _, queries = shard_data
    shard = SparseShard(folder, vocab, DEFAULT_SCALE)
    absent = next(t for t in vocab.tokens if t not in set(shard.document_vector(0)) and
                  int(shard.seismic().ptr[vocab.index[t]]) == int(shard.seismic().ptr[vocab.index[t] + 1]))
    assert shard.search({absent: 1.0}) == []
    long = dict(list(queries[16][0].items())[:15])
    long[absent] = 5.0  # a token no document has, in a Seismic query (16 tokens: still accelerated)
    assert hits(shard.search(long)) == hits(shard.search(dict(list(queries[16][0].items())[:15])))
    assert shard.batch_search([{}, queries[1][0]], K)[0] == []
    deep = shard.batch_search(queries[2][:3], acc.MAX_K)  # deeper than 10: still exact
    everything = np.arange(len(shard))
    assert [hits(d) for d in deep] == [hits(shard.search_rows(q, everything, acc.MAX_K)) for q in queries[2][:3]]
    assert shard.batch_search(queries[8][:2], K) == shard.batch_search(queries[8][:2], K)  # deterministic
    assert shard._searcher is None  # Lucene never opened
    longer = {**queries[16][0], **queries[16][1], **queries[16][2]}  # over MAX_QUERY_TOKENS: Lucene, exact
    assert len(longer) > acc.MAX_QUERY_TOKENS
    for query, k in ((longer, K), (queries[2][0], acc.MAX_K + 50)):
        assert matches_exact(hits(shard.search(query, k)), hits(shard.search_rows(query, everything, k)))
    assert shard._searcher is not None
    shard.close()

    empty = tmp_path / "empty"
    empty_csr = (np.zeros(4, np.int64), np.zeros(0, np.uint16), np.zeros(0, np.uint16))
    write_sparse_shard(empty, empty_csr, vocab)
    assert acc.build_seismic(empty, *empty_csr, len(vocab.tokens))
    nothing = SparseShard(empty, vocab, DEFAULT_SCALE)
    assert nothing.seismic() is not None and nothing.seismic().seismic is None
    assert nothing.batch_search([queries[1][0], queries[16][0]], K) == [[], []]
