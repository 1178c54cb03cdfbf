"""Lucene impact index (through Pyserini) against exact numpy arithmetic on the same quantised weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from stair_search.index.jvm import import_pyserini, jvm_running, start_jvm
from stair_search.index.sparse import SparseShard, concat_csr, quantise, to_csr, write_sparse_shard
from stair_search.vocabulary import Vocabulary


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.load()


def random_vectors(rng, vocab, count, nnz, zipf=1.1):
    """Sparse vectors with Zipf-distributed tokens over the emittable vocabulary (like real word use)."""
    allowed = np.flatnonzero(vocab.emittable)
    ranks = np.arange(1, len(allowed) + 1)
    p = ranks ** -zipf / np.sum(ranks ** -zipf)
    vectors = []
    for _ in range(count):
        ids = rng.choice(allowed, size=nnz, replace=False, p=p)
        vectors.append({vocab.tokens[i]: float(w) for i, w in zip(ids, rng.uniform(0.004, 3.0, nnz), strict=True)})
    return vectors


def test_jvm_starts_and_a_three_document_index_ranks_as_expected(tmp_path, vocab):
    start_jvm()
    assert jvm_running()
    docs = [{"dog": 1.8, "beach": 0.9}, {"dog": 0.5, "cat": 2.0, "##ing": 0.3}, {"cat": 0.7, "beach": 1.5}]
    write_sparse_shard(tmp_path, to_csr(docs, vocab, 100.0), vocab)
    shard = SparseShard(tmp_path, vocab, 100.0)
    assert [h.row for h in shard.search({"dog": 1.0})] == [0, 1]
    hits = shard.search({"beach": 1.0, "cat": 1.0})
    assert [h.row for h in hits] == [2, 1, 0]
    assert [round(h.score, 6) for h in hits] == [2.2, 2.0, 0.9]
    assert shard.explain(2, {"beach": 1.0, "cat": 1.0, "dog": 3.0}) == {"beach": (1.0, 1.5), "cat": (1.0, 0.7)}
    assert [h.row for h in shard.search({"##ing": 1.0})] == [1]  # word-piece suffixes survive Lucene


def test_pyserini_search_module_imports_without_an_openai_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    module = import_pyserini("pyserini.search.lucene")
    assert hasattr(module, "LuceneImpactSearcher")
    import os

    assert "OPENAI_API_KEY" not in os.environ  # the placeholder does not leak


def test_quantisation_never_turns_a_weight_into_zero():
    assert quantise(np.array([0.0001, 0.004, 0.006, 1.234, 1e9]), 100.0).tolist() == [1, 1, 1, 123, 65535]


def test_a_token_present_in_every_document_still_counts(tmp_path, vocab):
    docs = [{"dog": 0.5}, {"dog": 2.0, "cat": 1.0}, {"dog": 1.0}]
    write_sparse_shard(tmp_path, to_csr(docs, vocab, 100.0), vocab)
    assert [h.row for h in SparseShard(tmp_path, vocab, 100.0).search({"dog": 1.0})] == [1, 2, 0]


@pytest.mark.parametrize("threads", [1, 5])  # 5: one collection file per row, three of them empty
def test_documents_without_tokens_keep_the_shard_readable_and_the_row_numbers(tmp_path, vocab, threads):
    """An image whose sparse vector is all zeros: Anserini drops empty documents, the shard must still open."""
    docs = [{}, {"dog": 1.0}, {}, {"dog": 0.5, "cat": 2.0}, {}]
    write_sparse_shard(tmp_path, to_csr(docs, vocab, 100.0), vocab, threads=threads)
    shard = SparseShard(tmp_path, vocab, 100.0)
    assert [(h.row, round(h.score, 2)) for h in shard.search({"dog": 1.0, "cat": 1.0}, 10)] == [(3, 2.5), (1, 1.0)]
    write_sparse_shard(tmp_path / "none", to_csr([{}, {}], vocab, 100.0), vocab)  # no document has a token
    assert SparseShard(tmp_path / "none", vocab, 100.0).batch_search([{"dog": 1.0}, {"cat": 1.0}], 5) == [[], []]


def test_lucene_top10_equals_numpy_brute_force(tmp_path, vocab):
    rng = np.random.default_rng(42)
    docs = random_vectors(rng, vocab, 3000, 64)
    scale = 100.0
    # built from two batches, as the writer does
    csr = concat_csr([to_csr(docs[:1700], vocab, scale), to_csr(docs[1700:], vocab, scale)])
    write_sparse_shard(tmp_path, csr, vocab, threads=3)  # three collection files, indexed in parallel
    shard = SparseShard(tmp_path, vocab, scale)
    matrix = sp.csr_matrix((csr[2].astype(np.int64), csr[1], csr[0]), shape=(len(docs), len(vocab)))
    queries = random_vectors(rng, vocab, 40, 12)
    results = shard.batch_search(queries, k=10, threads=2)
    compared = 0
    for query, hits in zip(queries, results, strict=True):
        q = np.zeros(len(vocab), dtype=np.int64)
        for token, weight in query.items():
            q[vocab.index[token]] = quantise(np.array([weight]), scale)[0]
        exact = matrix @ q
        order = np.argsort(-exact, kind="stable")
        expected_scores = exact[order[:10]] / scale**2
        np.testing.assert_allclose([h.score for h in hits], expected_scores[: len(hits)], rtol=1e-6)
        boundary = exact[order[9]] if len(order) > 9 else -1
        above = {int(r) for r in order[:10] if exact[r] > boundary}  # ties at the cut may go either way
        assert above <= {h.row for h in hits}
        compared += len(above)
    assert compared > 200


def test_missing_shard_file_is_a_clear_error(tmp_path, vocab):
    write_sparse_shard(tmp_path, to_csr([{"dog": 1.0}], vocab, 100.0), vocab)
    (tmp_path / "values.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"values\.npy"):
        SparseShard(tmp_path, vocab, 100.0)


def test_unknown_tokens_are_refused_at_write_and_ignored_in_queries(tmp_path, vocab):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        to_csr([{"notaword123": 1.0}], vocab, 100.0)
    write_sparse_shard(tmp_path, to_csr([{"dog": 1.0}], vocab, 100.0), vocab)
    shard = SparseShard(tmp_path, vocab, 100.0)
    assert shard.search({"notaword123": 1.0}) == []
    assert [h.row for h in shard.search({"notaword123": 1.0, "dog": 1.0})] == [0]
