"""Indexing embeddings computed elsewhere (indexer/embeddings.py): clip-retrieval's exact layout written here by a
small open_clip CLIP saved locally, the same dense hits as indexing the images, sparse vectors equal to the concept
vectors of those embeddings under the collection's calibration, kill -9 and resume, and one-line errors.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import indexer
from indexer import IndexJob
from indexer.embeddings import (
    NOT_FINITE,
    ZERO,
    collection_bank,
    image_tower_released,
    open_source,
    release_image_tower,
)
from stair_search.cli import app
from stair_search.encode import Encoder
from stair_search.index import IndexReader, Manifest
from stair_search.index.export import export
from stair_search.models import create_model
from stair_search.models.checkpoint import text_fingerprint
from stair_search.models.concepts import (
    MIN_Z,
    PROMPTS,
    Z_SCALE,
    concept_ids,
    save_concept_texts,
    texts_cache_name,
    top_columns,
)
from stair_search.paths import concepts_dir
from stair_search.retrieve import QueryRouter, SearchRequest
from stair_search.vectors import unit
from tests.conftest import draw_shape, save_tiny_clip
from tests.test_cli_errors import cli_error
from tests.test_indexer_jobs import CLI, JOB_ENV, REPO_ROOT, job_dir_of, wait_for

CONCEPTS = 1500
SHAPES = [(c, s) for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")]


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory) -> Path:
    """A config for an open_clip CLIP whose weights are a local open_clip checkpoint file (no STAIR heads)."""
    torch.manual_seed(0)
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(autouse=True)
def data_home(tmp_path_factory, monkeypatch, clip_spec):
    """The tiny CLIP's concept word embeddings go to a folder of this module's, not the user's data cache, seeded
    with the first ``CONCEPTS`` concept words through its text tower (all ~21k take a minute on 2 cores; the bank
    is built from whatever words the cache holds, so every equality below holds as it would with all of them)."""
    home = tmp_path_factory.getbasetemp() / "embeddings-data"
    monkeypatch.setenv("STAIR_DATA", str(home))
    path = concepts_dir() / texts_cache_name(text_fingerprint(create_model(str(clip_spec), device="cpu")))
    if not path.is_file():
        encoder = Encoder(str(clip_spec), batch_size=64)
        ids = np.asarray(concept_ids(encoder.model.vocabulary)[:CONCEPTS], np.int64)
        names = [encoder.model.vocabulary.tokens[i] for i in ids]
        embedded = encoder.embed_texts([p.format(n) for p in PROMPTS for n in names], 256).astype(np.float64)
        embedded = unit(embedded.reshape(len(PROMPTS), len(names), -1).mean(axis=0))
        save_concept_texts(path, ids, unit(embedded - embedded.mean(axis=0)))


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for colour, shape in SHAPES:
        draw_shape(colour, shape).save(folder / f"{colour}-{shape}.png")
    return folder


def clip_retrieval_folder(root: Path, rows: list[dict], vectors: np.ndarray, parts: int) -> Path:
    """clip-retrieval inference's output: img_emb/img_emb_N.npy beside metadata/metadata_N.parquet."""
    (root / "img_emb").mkdir(parents=True)
    (root / "metadata").mkdir()
    for n, chosen in enumerate(np.array_split(np.arange(len(rows)), parts)):
        np.save(root / "img_emb" / f"img_emb_{n}.npy", vectors[chosen].astype(np.float16 if n % 2 else np.float32))
        pq.write_table(pa.Table.from_pylist([rows[i] for i in chosen]), root / "metadata" / f"metadata_{n}.parquet")
    return root


def image_embeddings(encoder: Encoder, folder: Path) -> tuple[list[Path], np.ndarray]:
    paths = sorted(folder.glob("*.png"))
    pixels = torch.stack([encoder.preprocess(Image.open(p).convert("RGB")) for p in paths])
    return paths, encoder.encode_pixels(pixels).dense


def test_a_clip_retrieval_folder_indexes_as_its_images_do(clip_spec, photos, tmp_path):
    encoder = Encoder(str(clip_spec), batch_size=8)
    paths, dense = image_embeddings(encoder, photos)
    rows = [{"image_path": str(p), "caption": f"a {p.stem.replace('-', ' ')}", "shade": p.stem.split("-")[0]}
            for p in paths]
    folder = clip_retrieval_folder(tmp_path / "emb", rows, dense.astype(np.float32), parts=3)
    from_images, from_embeddings = tmp_path / "images-index", tmp_path / "emb-index"
    indexer.run(IndexJob(photos, from_images, model=str(clip_spec), workers=0), encoder=encoder, progress=False)
    original = encoder.encode_pixels, encoder.encode_dense
    encoder.encode_pixels = encoder.encode_dense = None  # the image tower is never run (nor calibrated on photos)
    summary = indexer.run(IndexJob(folder, from_embeddings, model=str(clip_spec), embeddings=True),
                          encoder=encoder, progress=False)
    encoder.encode_pixels, encoder.encode_dense = original
    assert summary.indexed == len(paths)
    manifest = Manifest.load(from_embeddings)
    assert manifest.calibration["calibrated_on"] == "collection embeddings"
    assert manifest.calibration["sample"] == len(paths)
    by_source = {}
    for index in (from_images, from_embeddings):
        router = QueryRouter(IndexReader(index), encoder)
        hits = router.search(SearchRequest(text="a red circle", mode="dense", k=5)).hits
        by_source[index] = [(h.source, round(h.score, 3)) for h in hits]
    assert by_source[from_images] == by_source[from_embeddings]  # same images ranked the same, same scores
    reader = IndexReader(from_embeddings)
    bank, _ = collection_bank(encoder, open_source(folder))
    stored = np.concatenate([np.load(folder / "img_emb" / f"img_emb_{n}.npy").astype(np.float32) for n in range(3)])
    top_k = encoder.model.config.image_top_k
    expected = bank.image_vectors(stored / np.linalg.norm(stored, axis=1, keepdims=True), top_k)
    indptr, tokens, weights = bank.image_csr(stored / np.linalg.norm(stored, axis=1, keepdims=True), top_k)
    z = bank.z_scores(stored / np.linalg.norm(stored, axis=1, keepdims=True))  # float64, every concept
    for row, vector in enumerate(expected):  # float32 scoring picks the words a float64 full sort picks
        best = [c for c in np.argsort(-z[row], kind="stable")[:top_k] if z[row, c] >= MIN_Z]
        assert list(vector) == [encoder.model.vocabulary.tokens[bank.token_ids[c]] for c in best]
        np.testing.assert_allclose(list(vector.values()), z[row, best] / Z_SCALE, atol=1e-5)
    for row, vector in enumerate(expected):  # what the job writes (CSR, no dicts): the same words and weights
        words = tokens[indptr[row] : indptr[row + 1]]
        assert words.tolist() == sorted(words.tolist())
        named = [encoder.model.vocabulary.tokens[t] for t in words]
        assert dict(zip(named, weights[indptr[row] : indptr[row + 1]].tolist(), strict=True)) == vector
    for row, path in enumerate(paths):
        candidate = reader.find(str(path))
        assert candidate is not None
        got = reader.sparse_vectors([candidate])[0]
        assert set(got) == set(expected[row])  # the concept vector of that embedding, quantised
        assert all(abs(got[k] - expected[row][k]) < 0.01 for k in got)
        document = reader.documents([candidate])[0]
        assert document["caption"] == rows[row]["caption"]
        assert json.loads(document["metadata"]) == {"shade": rows[row]["shade"]} if isinstance(
            document["metadata"], str) else document["metadata"] == {"shade": rows[row]["shade"]}
    with pytest.raises(ValueError, match="ssp read local image features, and this index was built from embeddings"):
        QueryRouter(reader, encoder).search(SearchRequest(text="a red circle", rerank=("ssp",), k=3))
    for request in (SearchRequest(text="a red circle", rerank=("bsap",), k=3),  # no local features needed
                    SearchRequest(text="a red circle to the left of a blue square", mode="auto", k=3)):
        assert len(QueryRouter(reader, encoder).search(request).hits) == 3
    text_hits = QueryRouter(reader, encoder).search(SearchRequest(text="triangle", mode="text", k=9)).hits
    assert {Path(h.source).stem.split("-")[1] for h in text_hits} == {"triangle"}  # captions: the text route
    export(from_images, tmp_path / "export.parquet")  # export, then index the export: the same documents back
    again = tmp_path / "again-index"
    indexer.run(IndexJob(tmp_path / "export.parquet", again, model=str(clip_spec), embeddings=True),
                encoder=encoder, progress=False)
    first, second = IndexReader(from_images), IndexReader(again)
    assert sorted(first.ids()) == sorted(second.ids())
    for doc_id in first.ids():
        a, b = first.find(doc_id), second.find(doc_id)
        assert first.sparse_vectors([a]) == second.sparse_vectors([b])
        np.testing.assert_allclose(first.vectors([a]), second.vectors([b]), atol=1e-6)
        fields = ("id", "source", "caption", "metadata", "width", "height")
        assert [first.documents([a])[0][f] for f in fields] == [second.documents([b])[0][f] for f in fields]
        assert first.documents([a])[0]["width"] > 0  # the image's size came back, not 0 (unknown)


def test_bad_rows_are_skipped_and_reported_and_urls_are_sources(clip_spec, tmp_path):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(10, 32)).astype(np.float32)
    vectors[3] = np.nan
    vectors[7] = 0
    rows = [{"url": f"https://example.org/{i}.jpg", "caption": f"photo {i}", "key": f"{i:09d}"} for i in range(10)]
    folder = clip_retrieval_folder(tmp_path / "laion", rows, vectors, parts=2)
    result = CliRunner().invoke(app, ["index", str(folder), "--out", str(tmp_path / "index"), "--embeddings",
                                      "--model", str(clip_spec)])
    assert result.exit_code == 0, result.output
    reader = IndexReader(tmp_path / "index")
    assert sorted(reader.ids()) == [f"{i:09d}" for i in range(10) if i not in (3, 7)]
    assert reader.documents([reader.find("000000001")])[0]["source"] == "https://example.org/1.jpg"
    skipped = pq.read_table(tmp_path / "index" / "skipped.parquet").to_pylist()
    assert {(s["id"], s["reason"]) for s in skipped} == {("000000003", NOT_FINITE), ("000000007", ZERO)}


def test_a_parquet_of_ids_and_vectors_then_an_npy_with_its_ids_appended(clip_spec, tmp_path):
    vectors = np.random.default_rng(1).normal(size=(6, 32)).astype(np.float32)
    table = pa.table({"id": [f"d{i}" for i in range(6)], "embedding": pa.array(list(vectors), pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "vectors.parquet")
    np.save(tmp_path / "plain.npy", vectors[:4])
    (tmp_path / "plain.txt").write_text("".join(f"e{i}\n" for i in range(4)))
    out = tmp_path / "index"
    indexer.run(IndexJob(tmp_path / "vectors.parquet", out, model=str(clip_spec), embeddings=True), progress=False)
    calibration = Manifest.load(out).calibration
    assert (out / calibration["file"]).is_file()
    indexer.run(IndexJob(tmp_path / "plain.npy", out, model=str(clip_spec), embeddings=True, append=True),
                progress=False)
    reader = IndexReader(out)
    assert sorted(reader.ids()) == [f"d{i}" for i in range(6)] + [f"e{i}" for i in range(4)]
    assert Manifest.load(out).calibration == calibration  # the index's calibration is the first job's
    encoder = Encoder(str(clip_spec))
    units = vectors[:4] / np.linalg.norm(vectors[:4], axis=1, keepdims=True)
    top_k = encoder.model.config.image_top_k
    indexed_as = collection_bank(encoder, open_source(tmp_path / "vectors.parquet"))[0].image_vectors(units, top_k)
    own_sample = collection_bank(encoder, open_source(tmp_path / "plain.npy"))[0].image_vectors(units, top_k)
    assert indexed_as != own_sample  # the two calibrations differ, so the check below tells them apart
    appended = reader.sparse_vectors([reader.find(f"e{i}") for i in range(4)])
    for got, want in zip(appended, indexed_as, strict=True):  # the append is calibrated as the index was
        assert set(got) == set(want) and all(abs(got[k] - want[k]) < 0.01 for k in got)
    hits = QueryRouter(reader, encoder).search(SearchRequest(text="a photo", mode="dense", k=3)).hits
    assert len(hits) == 3  # built by jobs that freed their image tower: the index records the full model


def test_a_job_s_encoder_holds_no_image_tower_weights_and_writes_the_same_vectors(clip_spec, tmp_path):
    vectors = np.random.default_rng(4).normal(size=(5, 32)).astype(np.float32)
    table = pa.table({"id": [f"d{i}" for i in range(5)], "embedding": pa.array(list(vectors), pa.list_(pa.float32()))})
    pq.write_table(table, tmp_path / "vectors.parquet")
    full, text_side = Encoder(str(clip_spec)), Encoder(str(clip_spec))
    release_image_tower(text_side)
    assert image_tower_released(text_side) and not image_tower_released(full)
    assert text_side.fingerprint == full.fingerprint and text_side.record.embed_dim == full.record.embed_dim
    np.testing.assert_array_equal(text_side.embed_texts(["a red circle"]), full.embed_texts(["a red circle"]))
    with pytest.raises((NotImplementedError, RuntimeError)):  # it cannot encode an image any more
        text_side.encode_images([draw_shape("red", "circle")])
    for encoder, out in ((full, tmp_path / "full"), (text_side, tmp_path / "text-side")):
        indexer.run(IndexJob(tmp_path / "vectors.parquet", out, model=str(clip_spec), embeddings=True),
                    encoder=encoder, progress=False)
    a, b = IndexReader(tmp_path / "full"), IndexReader(tmp_path / "text-side")
    rows_a, rows_b = [a.find(f"d{i}") for i in range(5)], [b.find(f"d{i}") for i in range(5)]
    assert a.sparse_vectors(rows_a) == b.sparse_vectors(rows_b)
    np.testing.assert_array_equal(a.vectors(rows_a), b.vectors(rows_b))


def test_width_mismatch_and_misaligned_rows_are_one_line(clip_spec, tmp_path, capsys):
    rows = [{"image_path": f"/x/{i}.png"} for i in range(4)]
    wide = clip_retrieval_folder(tmp_path / "wide", rows, np.ones((4, 48), np.float32), parts=1)
    line = cli_error(["index", str(wide), "--out", str(tmp_path / "i1"), "--embeddings", "--model", str(clip_spec)],
                     capsys)
    assert "48-wide but model" in line and "embeds 32" in line
    misaligned = clip_retrieval_folder(tmp_path / "misaligned", rows, np.ones((4, 32), np.float32), parts=2)
    pq.write_table(pa.Table.from_pylist(rows[:1]), misaligned / "metadata" / "metadata_1.parquet")
    line = cli_error(["index", str(misaligned), "--out", str(tmp_path / "i2"), "--embeddings", "--model",
                      str(clip_spec)], capsys)
    assert "img_emb_1.npy has 2 rows but" in line and "metadata_1.parquet has 1" in line and "row-aligned" in line
    assert not (tmp_path / "i1").exists() and not (tmp_path / "i2").exists()


def test_a_job_killed_mid_run_resumes_without_losing_or_repeating_documents(clip_spec, tmp_path):
    count = 600
    vectors = np.random.default_rng(2).normal(size=(count, 32)).astype(np.float32)
    rows = [{"image_path": f"/photos/{i}.jpg", "caption": f"photo number {i}"} for i in range(count)]
    folder = clip_retrieval_folder(tmp_path / "emb", rows, vectors, parts=3)
    out, log = tmp_path / "index", tmp_path / "job.log"
    args = ["index", str(folder), "--out", str(out), "--embeddings", "--model", str(clip_spec), "--batch-size", "50",
            "--shard-size", "200"]
    env = {**JOB_ENV, "STAIR_DATA": os.environ["STAIR_DATA"]}
    with open(log, "w") as log_file:
        process = subprocess.Popen([*CLI, *args], env=env, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def a_shard_written() -> bool:
            job = job_dir_of(out)
            journal = job / "journal.json" if job else None
            return bool(journal and journal.is_file() and json.loads(journal.read_text())["shards"])

        wait_for(a_shard_written, "a shard", process, log)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert not out.exists()
    done = subprocess.run([*CLI, *args], env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    ids = IndexReader(out).ids()
    assert len(ids) == len(set(ids)) == count
    assert job_dir_of(out) is None


def test_top_columns_are_a_full_sort_s_top_k_above_the_floor():
    rng = np.random.default_rng(3)
    for trial in range(60):
        rows, width, k = int(rng.integers(1, 30)), int(rng.integers(1, 2500)), int(rng.integers(1, 80))
        scores = (rng.normal(size=(rows, width)) * rng.uniform(0.3, 3)).astype(np.float32)
        if trial % 3 == 0:
            scores = np.round(scores, 1)  # ties: the lower column first
        floor = float(rng.choice([-9.0, 1.0, 2.5]))
        counts, columns, values = top_columns(scores, k, floor)
        at = 0
        for row in range(rows):
            ranked = sorted(range(width), key=lambda c: (-scores[row, c], c))[:k]
            want = [c for c in ranked if scores[row, c] >= floor]
            assert columns[at : at + counts[row]].tolist() == want
            assert values[at : at + counts[row]].tolist() == scores[row, want].tolist()
            at += counts[row]
