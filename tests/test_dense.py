"""DenseShard against real FAISS: exactness of flat, recall of HNSW / IVF-PQ, persistence and edge cases."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

pytest.importorskip("faiss", reason="FAISS is not installed")

from stair_search.index.dense import FAISS_MISSING, DenseShard, DenseSpec, choose_spec

DIM = 64
HNSW_SPEC = {"M": 32, "ef_construction": 200, "ef_search": 128}
# Isotropic noise around the centres is the hardest case for PQ: 4 or 2 dims per sub-quantiser give recall@10
# of ~0.6 / ~0.85 here, so the test uses one 8-bit code per dimension (m = dim), as the brief allows.
IVFPQ_SPEC = {"nlist": 64, "m": DIM, "nbits": 8, "nprobe": 16}
IVFPQ_TRAIN_ROWS = 10_000  # >= 39 * 256 points for the PQ k-means; the rest goes in through add()


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_unit(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return unit(np.random.default_rng(seed).standard_normal((n, dim)))


def brute_force(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product in numpy (stable sort, so ties keep the lower row first)."""
    sims = q @ x.T
    rows = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, rows, axis=1), rows


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.fixture(scope="module")
def clustered() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """20k unit vectors around 200 random centres (+ Gaussian noise), 200 queries drawn the same way,
    and the exact top-10 rows of each query."""
    rng = np.random.default_rng(42)
    centres = unit(rng.standard_normal((200, DIM)))

    def draw(n: int) -> np.ndarray:
        return unit(centres[rng.integers(0, len(centres), n)] + 0.1 * rng.standard_normal((n, DIM)))

    x, q = draw(20_000), draw(200)
    return x, q, brute_force(x, q, 10)[1]


@pytest.fixture(scope="module")
def ivfpq_index(clustered) -> DenseShard:
    """Trained on the first 10k vectors (keeps the PQ k-means under ~10 s on 2 cores), the rest added."""
    x = clustered[0]
    index = DenseShard.build(x[:IVFPQ_TRAIN_ROWS], DenseSpec("ivfpq", dict(IVFPQ_SPEC)), use_gpu=False)
    index.add(x[IVFPQ_TRAIN_ROWS:])
    return index


@pytest.fixture(scope="module")
def hnsw_index(clustered) -> DenseShard:
    return DenseShard.build(clustered[0], DenseSpec("hnsw", dict(HNSW_SPEC)), use_gpu=False)


# ----------------------------------------------------------------------------- exactness and recall
def test_flat_matches_numpy_brute_force():
    x, q = random_unit(2_000), random_unit(50, seed=1)
    index = DenseShard.build(x, use_gpu=False)
    assert index.spec.kind == "flat" and index.ntotal == 2_000 and index.dim == DIM
    scores, rows = index.search(q, 10)
    want_scores, want_rows = brute_force(x, q, 10)
    assert scores.dtype == np.float32 and rows.dtype == np.int64 and rows.shape == (50, 10)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(scores, want_scores, atol=1e-5)


def test_hnsw_recall(hnsw_index, clustered):
    _, q, truth = clustered
    assert hnsw_index.spec.to_dict() == {"kind": "hnsw", "params": HNSW_SPEC}
    assert recall_at_k(hnsw_index.search(q, 10)[1], truth) >= 0.95


def test_ivfpq_recall(ivfpq_index, clustered):
    _, q, truth = clustered
    assert ivfpq_index.spec.to_dict() == {"kind": "ivfpq", "params": IVFPQ_SPEC}
    assert ivfpq_index.ntotal == 20_000
    assert recall_at_k(ivfpq_index.search(q, 10)[1], truth) >= 0.95


def test_set_search_params_updates_index_and_spec(hnsw_index, ivfpq_index, clustered):
    q = clustered[1][:20]
    ivfpq_index.set_search_params(nprobe=1, ef_search=7)  # ef_search does not apply to IVF-PQ: ignored
    narrow = ivfpq_index.search(q, 10)[1]
    assert ivfpq_index.spec.params["nprobe"] == 1 and "ef_search" not in ivfpq_index.spec.params
    ivfpq_index.set_search_params(nprobe=IVFPQ_SPEC["nprobe"])
    assert not np.array_equal(narrow, ivfpq_index.search(q, 10)[1])  # nprobe really reached FAISS
    hnsw_index.set_search_params(ef_search=256)
    assert hnsw_index.spec.params["ef_search"] == 256
    hnsw_index.set_search_params(ef_search=HNSW_SPEC["ef_search"])
    with pytest.raises(ValueError, match="nprobe"):
        ivfpq_index.set_search_params(nprobe=0)


# ----------------------------------------------------------------------------- choose_spec / DenseSpec
def test_choose_spec_kinds():
    assert choose_spec(1_000, 512).kind == "flat"
    hnsw = choose_spec(200_000, 512)
    assert hnsw == DenseSpec("hnsw", {"M": 32, "ef_construction": 200, "ef_search": 128})
    ivfpq = choose_spec(200_000, 512, memory_budget_bytes=100 * 2**20)
    assert ivfpq.kind == "ivfpq"
    p = ivfpq.params
    assert p["nlist"] & (p["nlist"] - 1) == 0 and 100_000 // p["nlist"] >= 39  # power of 2, trainable
    assert p["m"] == 128 and 512 % p["m"] == 0 and p["nbits"] == 8 and p["nprobe"] == 16
    # a budget the HNSW estimate (n*dim*4 + n*M*2*4) exactly fits keeps HNSW
    assert choose_spec(200_000, 512, 200_000 * 512 * 4 + 200_000 * 64 * 4).kind == "hnsw"
    assert choose_spec(200_000, 30, 1).params["m"] == 6  # largest divisor of 30 that is <= 30 // 4


def test_spec_round_trip():
    for spec in (choose_spec(1_000, 64), choose_spec(200_000, 512), choose_spec(200_000, 512, 1)):
        assert DenseSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="kind"):
        DenseSpec("annoy")
    with pytest.raises(ValueError, match="kind"):
        DenseSpec.from_dict({"params": {}})


def test_ivfpq_with_too_few_vectors_falls_back_to_flat():
    x = random_unit(500)
    requested = DenseSpec("ivfpq", {"nlist": 16, "m": 16, "nbits": 8, "nprobe": 4})
    index = DenseShard.build(x, requested, use_gpu=False)
    assert index.spec.kind == "flat" and index.spec.params["fallback"] == "too few vectors"
    assert requested.kind == "ivfpq"  # the caller's spec is left alone
    np.testing.assert_array_equal(index.search(x[:5], 1)[1][:, 0], np.arange(5))


def test_invalid_ivfpq_params():
    with pytest.raises(ValueError, match="divide"):
        DenseShard.build(random_unit(100), DenseSpec("ivfpq", {"m": 7}), use_gpu=False)


# ----------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(kind, mmap, tmp_path, clustered, hnsw_index, ivfpq_index):
    q = clustered[1]
    index = {"flat": DenseShard.build(random_unit(3_000), use_gpu=False), "hnsw": hnsw_index,
             "ivfpq": ivfpq_index}[kind]
    path = tmp_path / "sub" / "dense.faiss"
    index.save(path)
    assert path.stat().st_size == index.nbytes() and not (tmp_path / "sub" / "dense.faiss.tmp").exists()
    loaded = DenseShard.load(path, DenseSpec.from_dict(index.spec.to_dict()), use_gpu=False, mmap=mmap)
    assert loaded.spec == index.spec and loaded.ntotal == index.ntotal and loaded.dim == index.dim
    for got, want in zip(loaded.search(q, 10), index.search(q, 10), strict=True):
        np.testing.assert_array_equal(got, want)
    loaded.save(tmp_path / "again.faiss")  # a mapped index must still save a self-contained file
    path.unlink()
    again = DenseShard.load(tmp_path / "again.faiss", index.spec, use_gpu=False)
    np.testing.assert_array_equal(again.search(q, 10)[1], index.search(q, 10)[1])


def test_load_applies_spec_search_params(tmp_path, ivfpq_index, clustered):
    q = clustered[1][:20]
    ivfpq_index.save(tmp_path / "ivf.faiss")
    spec = DenseSpec("ivfpq", {**IVFPQ_SPEC, "nprobe": 1})
    loaded = DenseShard.load(tmp_path / "ivf.faiss", spec, use_gpu=False)
    ivfpq_index.set_search_params(nprobe=1)
    try:
        np.testing.assert_array_equal(loaded.search(q, 10)[1], ivfpq_index.search(q, 10)[1])
    finally:
        ivfpq_index.set_search_params(nprobe=IVFPQ_SPEC["nprobe"])


def test_load_errors(tmp_path):
    missing = tmp_path / "nowhere" / "dense.faiss"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        DenseShard.load(missing, DenseSpec("flat"))
    garbage = tmp_path / "garbage.faiss"
    garbage.write_bytes(b"this is not a faiss index" * 10)
    with pytest.raises(ValueError, match=r"garbage\.faiss"):
        DenseShard.load(garbage, DenseSpec("flat"))
    empty = tmp_path / "empty.faiss"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.faiss"):
        DenseShard.load(empty, DenseSpec("flat"), mmap=True)
    DenseShard.build(random_unit(10), use_gpu=False).save(tmp_path / "flat.faiss")
    with pytest.raises(ValueError, match="spec says 'hnsw'"):
        DenseShard.load(tmp_path / "flat.faiss", DenseSpec("hnsw"))


def test_mmap_index_is_read_only(tmp_path):
    x = random_unit(100)
    DenseShard.build(x, use_gpu=False).save(tmp_path / "flat.faiss")
    loaded = DenseShard.load(tmp_path / "flat.faiss", DenseSpec("flat"), use_gpu=False, mmap=True)
    with pytest.raises(RuntimeError, match="read-only"):
        loaded.add(x[:1])  # FAISS itself would abort the process here
    assert loaded.ntotal == 100


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "dense.faiss"
    DenseShard.build(random_unit(10), use_gpu=False).save(path)
    DenseShard.build(random_unit(20), use_gpu=False).save(path)
    assert DenseShard.load(path, DenseSpec("flat")).ntotal == 20


# ----------------------------------------------------------------------------- edges and validation
def test_k_larger_than_ntotal_pads():
    x = random_unit(5)
    scores, rows = DenseShard.build(x, use_gpu=False).search(x[:2], 8)
    assert rows.shape == scores.shape == (2, 8)
    assert sorted(rows[0, :5]) == list(range(5)) and (rows[:, 5:] == -1).all()
    assert np.isneginf(scores[:, 5:]).all() and np.isfinite(scores[:, :5]).all()


def test_empty_index_returns_only_padding():
    scores, rows = DenseShard.build(np.zeros((0, 8), np.float32), use_gpu=False).search(np.ones(8), 3)
    assert (rows == -1).all() and np.isneginf(scores).all()


def test_one_dimensional_query():
    x = random_unit(50)
    index = DenseShard.build(x, use_gpu=False)
    scores, rows = index.search(x[7], 3)
    assert rows.shape == (1, 3) and rows[0, 0] == 7 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)


def test_inputs_are_normalised_and_not_mutated():
    x = random_unit(50) * 3.0  # not unit length: stored unit, so scores are cosines
    before = x.copy()
    index = DenseShard.build(x.astype(np.float64), use_gpu=False)
    scores, rows = index.search(x[3] * 10, 1)
    assert rows[0, 0] == 3 and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_rejected(bad):
    x = random_unit(20)
    poisoned = x.copy()
    poisoned[3, 5] = bad
    with pytest.raises(ValueError, match="row 3"):
        DenseShard.build(poisoned, use_gpu=False)
    index = DenseShard.build(x, use_gpu=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.search(poisoned, 2)
    with pytest.raises(ValueError, match="NaN or infinite"):
        index.add(poisoned)
    assert index.ntotal == 20


def test_shape_and_type_validation():
    index = DenseShard.build(random_unit(20), use_gpu=False)
    with pytest.raises(ValueError, match="2-D"):
        DenseShard.build(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="dtype"):
        DenseShard.build(np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="float32"):
        DenseShard.build(np.ones((2, 2), dtype=np.complex64))
    with pytest.raises(ValueError, match="NaN or infinite"):
        DenseShard.build(np.full((2, 2), 1e300))  # overflows float32
    with pytest.raises(ValueError, match="dimension 32"):
        index.search(random_unit(2, dim=32), 3)
    with pytest.raises(ValueError, match="k must be"):
        index.search(random_unit(1), 0)


def test_add_appends_rows():
    """Rows of added vectors continue after the existing ones, for every kind."""
    base, extra = random_unit(1_000), random_unit(30, seed=9)
    flat = DenseShard.build(base, use_gpu=False)
    flat.add(extra)
    assert flat.ntotal == 1_030
    np.testing.assert_array_equal(flat.search(extra, 1)[1][:, 0], np.arange(1_000, 1_030))
    hnsw = DenseShard.build(base, DenseSpec("hnsw", {"M": 16, "ef_construction": 100}), use_gpu=False)
    hnsw.add(extra)
    np.testing.assert_array_equal(hnsw.search(extra, 1)[1][:, 0], np.arange(1_000, 1_030))


def test_ivfpq_add_rows_are_found(ivfpq_index, clustered):
    """The fixture added rows 10k..20k after training; each finds itself (PQ codes, so top-3)."""
    x = clustered[0]
    probe = np.arange(IVFPQ_TRAIN_ROWS, 20_000, 500)
    rows = ivfpq_index.search(x[probe], 3)[1]
    assert all(p in r for p, r in zip(probe, rows, strict=True))


def test_use_gpu_true_without_gpu_is_clear():
    import faiss

    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is available")
    with pytest.raises(RuntimeError, match="use_gpu=True"):
        DenseShard.build(random_unit(10), use_gpu=True)


def test_missing_faiss_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` raise ImportError
    with pytest.raises(ImportError) as info:
        DenseShard.build(random_unit(10))
    assert str(info.value) == FAISS_MISSING
