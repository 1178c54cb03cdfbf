"""Training-free sparse vectors (models/concepts.py) for a model without trained heads, never random ones.

A small open_clip CLIP saved locally as a checkpoint file stands for a user's real CLIP (no network), and
stair-lite's own dense towers stand for a pretrained one whose words can be checked on real photos.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

import indexer
from indexer import IndexJob
from stair_search.encode import Encoder
from stair_search.index import IndexMismatchError, IndexReader, Manifest
from stair_search.models import create_model
from stair_search.models.checkpoint import dense_fingerprint
from stair_search.models.concepts import query_vector, reference_images
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import draw_shape, sample_photo, save_tiny_clip

ROOT = Path(__file__).resolve().parents[1]


# A process of its own encodes the images named after the config: prints their sparse vectors as JSON
ENCODE_IN_A_PROCESS = ("import json, sys; from PIL import Image; from stair_search.encode import Encoder; "
                       "e = Encoder(sys.argv[1]); images = [Image.open(p).convert('RGB') for p in sys.argv[2:]]; "
                       "print(json.dumps(e.encode_images(images).sparse))")


class FirstRun(NamedTuple):
    """What a first process left in an empty data folder: the sparse vectors it printed, the images it encoded."""

    home: Path
    vectors: list[dict[str, float]]
    images: list[Path]
    banks: list[Path]  # the concept bank files in the folder once it had run
    texts: list[Path]  # the word embedding files


@pytest.fixture(scope="module")
def foreign_clip(tmp_path_factory) -> Path:
    """A config for an open_clip CLIP with its weights in a local open_clip checkpoint file, no STAIR heads: the
    same weights in every run, whatever ran before in this process (the alignment tests' margins depend on them)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return save_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def first_run(foreign_clip, tmp_path_factory) -> FirstRun:
    """The tiny CLIP's concept bank built from nothing by a process of its own, as a user's first run builds it
    (its ~21k words through the text tower, then their calibration), while it encodes two drawn shapes. The
    module's tests read that bank back: building it again in each would cost tens of seconds on 2 cores."""
    folder = tmp_path_factory.mktemp("two-shapes")
    images = [folder / f"{i}.png" for i in range(2)]
    draw_shape("green", "triangle").save(images[0])
    draw_shape("yellow", "circle", background="black").save(images[1])
    home = tmp_path_factory.mktemp("stair-data")
    done = subprocess.run([sys.executable, "-c", ENCODE_IN_A_PROCESS, str(foreign_clip), *map(str, images)],
                          env={**os.environ, "STAIR_DATA": str(home)}, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    written = list((home / "concepts").glob("*.npz"))
    return FirstRun(home, json.loads(done.stdout), images, banks(home / "concepts"),
                    [path for path in written if path.name.startswith("texts-")])


@pytest.fixture(autouse=True)
def data_home(request, monkeypatch):
    """The throwaway tiny CLIP's banks go to the folder of its first run (``first_run``), not the user's data
    cache; the shipped models' bank is the shared one (built once per machine, ~100 s on 2 cores, and reused by
    the other tests)."""
    if "foreign_clip" in request.fixturenames:
        monkeypatch.setenv("STAIR_DATA", str(request.getfixturevalue("first_run").home))


def test_a_model_without_trained_heads_never_writes_random_sparse_vectors(foreign_clip, tmp_path):
    model = create_model(str(foreign_clip), device="cpu")
    assert model.sparse_source == "concepts"  # built from a config: its heads are untrained
    encoder = Encoder(model, batch_size=8)
    images = [draw_shape(c, s) for c in ("red", "blue") for s in ("circle", "square")]
    vectors = encoder.encode_images(images).sparse
    bank = encoder.concepts()
    concept_tokens = {model.vocabulary.tokens[i] for i in bank.token_ids.tolist()}
    for vector in vectors:
        assert vector and set(vector) <= concept_tokens and all(w > 0 for w in vector.values())
        # the weights are the calibrated similarities, not a head's output
        z = bank.z_scores(encoder.encode_images(images[:1]).dense)[0]
        assert z.max() / 4.0 == pytest.approx(max(vectors[0].values()), abs=1e-5)
        break
    heads = encoder.model.image_head  # the untrained head exists, and its words are not what was written
    assert heads is not None
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    indexer.run(IndexJob(folder, tmp_path / "index", workers=0), encoder=encoder, progress=False)
    assert Manifest.load(tmp_path / "index").sparse == "concepts"
    router = QueryRouter(IndexReader(tmp_path / "index"), encoder)
    for hit in router.search(SearchRequest(text="red circle", mode="sparse", k=4, explain=True)).hits:
        assert set(hit.matched) <= {"red", "circle"}  # matched words are the query's own words, really in the image
    trained = Encoder(create_model("stair-tiny", device="cpu"))
    with pytest.raises(IndexMismatchError):  # an encoder whose sparse vectors come from elsewhere is refused
        Manifest.load(tmp_path / "index").check_model(trained.record)


def test_queries_keep_their_own_concept_words_weighted_by_rarity(foreign_clip):
    vocabulary = create_model(str(foreign_clip), device="cpu").vocabulary
    vector = query_vector(vocabulary, "the harpsichord and a dog on the beach")
    assert set(vector) == {"harpsichord", "dog", "beach"}
    assert vector["harpsichord"] > max(vector["dog"], vector["beach"]) > 0  # a rare word weighs more
    assert query_vector(vocabulary, "tabby") == {}  # split into tab ##by: no word of its own, never a wrong one


def banks(folder: Path) -> list[Path]:
    """The concept bank files in a cache folder (not the ``texts-`` files of word embeddings they share)."""
    return [path for path in folder.glob("*.npz") if not path.name.startswith("texts-")]


def test_training_free_vectors_are_the_same_in_two_processes_and_read_back_from_the_cache(foreign_clip, first_run):
    """The first process (``first_run``) built the bank and its words in an empty folder; a second one reads the
    bank back, never rebuilding it, and writes the same vectors."""
    assert len(first_run.banks) == 1 and len(first_run.texts) == 1  # what the first process wrote: the bank, its words
    built = first_run.banks[0].stat().st_mtime_ns
    second = subprocess.run([sys.executable, "-c", ENCODE_IN_A_PROCESS, str(foreign_clip), *map(str, first_run.images)],
                            env={**os.environ, "STAIR_DATA": str(first_run.home)}, cwd=ROOT, capture_output=True,
                            text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads(second.stdout) == first_run.vectors and first_run.vectors[0]
    assert first_run.banks[0].stat().st_mtime_ns == built  # the second process read the bank, it did not rebuild it


def test_warming_an_encoder_makes_its_concept_bank_before_the_first_image(foreign_clip, first_run, tmp_path,
                                                                          monkeypatch, caplog):
    """What a server does when it loads a model: a first image query must not wait for the bank's build. The build
    says so in one line (a first run with an empty data folder is otherwise slow without a word); reading the bank
    back says nothing. The data folder holds no bank, only the words' embeddings of the first run (the text
    tower's part, cached apart: ``first_run`` built them from nothing), so the build here is the calibration."""
    (tmp_path / "empty-cache" / "concepts").mkdir(parents=True)
    for words in first_run.texts:
        shutil.copy2(words, tmp_path / "empty-cache" / "concepts" / words.name)
    monkeypatch.setenv("STAIR_DATA", str(tmp_path / "empty-cache"))
    encoder = Encoder(create_model(str(foreign_clip), device="cpu"), batch_size=8)
    with caplog.at_level(logging.WARNING, logger="stair_search.encode"):
        encoder.warm()
    said = [r.getMessage() for r in caplog.records if "concept bank" in r.getMessage()]
    assert len(said) == 1 and "once" in said[0] and str(tmp_path / "empty-cache" / "concepts") in said[0]
    cache = banks(tmp_path / "empty-cache" / "concepts")
    assert len(cache) == 1
    built = cache[0].stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="stair_search.encode"):
        assert encoder.encode_images([draw_shape("red", "circle")]).sparse[0]
        Encoder(create_model(str(foreign_clip), device="cpu"), batch_size=8).concepts()
    assert [r for r in caplog.records if "concept bank" in r.getMessage()] == []
    assert cache[0].stat().st_mtime_ns == built and len(banks(cache[0].parent)) == 1


def test_a_pretrained_dual_encoder_gets_words_related_to_real_photos():
    """stair-lite's dense towers used as if they were a foreign CLIP (its trained heads ignored)."""
    model = create_model("stair-lite", device="cpu")
    model.sparse_source = "concepts"
    encoder = Encoder(model, batch_size=4)
    photos = [sample_photo(name) for name in ("coffee.png", "chelsea.png", "rocket.jpg")]
    vectors = encoder.encode_images(photos).sparse
    top = [list(v)[:12] for v in vectors]
    assert "coffee" in top[0] and "cat" in top[1] and "missile" in top[2], top
    assert np.isfinite([w for v in vectors for w in v.values()]).all()


def test_heads_plus_concepts_adds_the_training_free_weights_to_the_trained_heads(tmp_path):
    """stair-lite-3 is stair-lite-2's weights (StairConfig.weights) with sparse "heads+concepts": each image word
    weighs its head weight plus concept_weight x its training-free weight, queries come from the text head, and an
    index records the source and refuses stair-lite-2's encoder (another fingerprint)."""
    from stair_search.models.heads import top_k_sparse

    mixed, heads = Encoder("stair-lite-3", batch_size=4), Encoder("stair-lite-2", batch_size=4)
    assert mixed.sparse_source == "heads+concepts" and heads.sparse_source == "heads"
    state, reference = mixed.model.state_dict(), heads.model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert mixed.fingerprint != heads.fingerprint  # but the same dense side: one cached concept bank
    assert dense_fingerprint(mixed.model) == dense_fingerprint(heads.model) != dense_fingerprint(
        create_model("stair-tiny", device="cpu"))
    photos = [sample_photo(name) for name in ("coffee.png", "chelsea.png", "rocket.jpg")]
    pixels = torch.stack([mixed.preprocess(p) for p in photos])
    got = mixed.encode_pixels(pixels)
    with torch.inference_mode():
        out = heads.model.encode_image(pixels)
    beta, k = mixed.model.config.concept_weight, mixed.model.config.image_top_k
    expected = out.sparse + beta * torch.from_numpy(mixed.concepts().image_weights(got.dense))
    expected = torch.where(out.keep, expected, top_k_sparse(expected, k)) if out.keep is not None else \
        top_k_sparse(expected, k)
    tokens = mixed.model.vocabulary.tokens
    for vector, row in zip(got.sparse, expected, strict=True):
        want = {tokens[i]: float(row[i]) for i in row.nonzero().flatten().tolist()}
        assert set(vector) == set(want)
        np.testing.assert_allclose([vector[t] for t in want], list(want.values()), rtol=1e-3, atol=1e-3)
    plain = heads.encode_pixels(pixels).sparse
    assert any(set(a) != set(b) for a, b in zip(got.sparse, plain, strict=True))  # the concepts changed words
    assert "cat" in sorted(got.sparse[1], key=got.sparse[1].get)[-12:]
    texts = ["dog", "a red heart"]
    assert mixed.encode_texts(texts).sparse == heads.encode_texts(texts).sparse
    images = tmp_path / "images"
    images.mkdir()
    for photo, name in zip(photos, ("coffee", "chelsea", "rocket"), strict=True):
        photo.save(images / f"{name}.png")
    indexer.run(IndexJob(images, tmp_path / "index", workers=0), encoder=mixed, progress=False)
    assert Manifest.load(tmp_path / "index").sparse == "heads+concepts"
    with pytest.raises(IndexMismatchError, match="sparse vectors from heads != index heads\\+concepts"):
        IndexReader(tmp_path / "index").manifest.check_model(heads.record)
    hits = QueryRouter(IndexReader(tmp_path / "index"), mixed).search(SearchRequest(text="cat", mode="sparse", k=1,
                                                                                    explain=True)).hits
    assert hits[0].id.endswith("chelsea.png") and "cat" in hits[0].matched


def shapes_parquet(folder: Path) -> Path:
    """Real drawn shapes and their captions as training pairs (image_path, caption)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for colour in ("red", "blue", "green", "yellow"):
        for shape in ("circle", "square", "triangle"):
            path = folder / f"{colour}-{shape}.png"
            draw_shape(colour, shape).save(path)
            rows.append({"image_path": str(path), "caption": f"a {colour} {shape}"})
    pq.write_table(pa.Table.from_pylist(rows), folder / "pairs.parquet")
    return folder / "pairs.parquet"


def test_an_alignment_trained_on_captions_puts_images_nearer_their_words(foreign_clip, tmp_path):
    """fit_map, against the bank's concept words, lowers its loss on real drawn shapes, starts from the identity
    (0 epochs: the training-free bank), and the aligned bank ranks each image's caption words higher than the
    training-free one does."""
    from stair_search.train.alignment import caption_concepts, fit_map, map_loss
    from stair_search.train.trainer import load_pairs

    pairs = load_pairs(shapes_parquet(tmp_path / "shapes"))
    encoder = Encoder(create_model(str(foreign_clip), device="cpu"), batch_size=8)
    bank = encoder.concepts()
    dense = encoder.encode_images([Image.open(p).convert("RGB") for p, _ in pairs]).dense
    targets = caption_concepts(bank, encoder.model.vocabulary, [c for _, c in pairs])
    words = {encoder.model.vocabulary.tokens[int(bank.token_ids[r])] for t in targets for r in t}
    assert words == {"red", "blue", "green", "yellow", "circle", "square", "triangle"}
    words_of, centre = bank.embeddings, bank.image_mean
    np.testing.assert_array_equal(fit_map(dense, words_of, targets, centre, epochs=0), np.eye(dense.shape[1]))
    align = fit_map(dense, words_of, targets, centre, epochs=30, lr=1e-2)
    identity = np.eye(dense.shape[1])
    assert map_loss(dense, words_of, targets, align, centre) < map_loss(dense, words_of, targets, identity,
                                                                        centre) - 0.5
    reference = encoder.encode_images(reference_images()).dense  # the bank's own calibration images
    same = bank.aligned(identity, reference)
    np.testing.assert_allclose(same.z_scores(dense), bank.z_scores(dense), atol=1e-5)  # identity: no change

    def mean_rank(b):
        z = b.z_scores(dense)
        ranks = (-z).argsort(axis=1).argsort(axis=1)
        return np.mean([ranks[i, r] for i, t in enumerate(targets) for r in t])

    assert mean_rank(bank.aligned(align, reference)) < mean_rank(same) / 2


def test_a_model_with_a_concept_alignment_reads_its_words_through_it(foreign_clip, tmp_path):
    """`stair-search align` writes the map; a config naming it gets its own bank (derived from the training-free
    one), another fingerprint, one that follows the file's content, and a clear error when the file is missing."""
    pairs = shapes_parquet(tmp_path / "shapes")
    out = tmp_path / "align.npy"
    done = subprocess.run([sys.executable, "-m", "stair_search.cli", "align", str(pairs), "--model", str(foreign_clip),
                           "--out", str(out), "--epochs", "30", "--lr", "1e-2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "aligned" in done.stdout and "on 12 pairs" in done.stdout and out.is_file()
    before, after = (float(x) for x in done.stdout.split("loss ")[1].split(";")[0].split(" -> "))
    assert after < before
    config = json.loads(foreign_clip.read_text()) | {"name": "tiny-clip-aligned", "concept_alignment": str(out)}
    aligned_config = tmp_path / "tiny-clip-aligned.json"
    aligned_config.write_text(json.dumps(config))
    plain, aligned = (Encoder(create_model(str(c), device="cpu")) for c in (foreign_clip, aligned_config))
    assert aligned.concepts().image_map is not None and plain.concepts().image_map is None
    np.testing.assert_array_equal(aligned.concepts().embeddings, plain.concepts().embeddings)
    assert aligned.fingerprint != plain.fingerprint
    image = [draw_shape("red", "circle")]
    assert aligned.encode_images(image).sparse != plain.encode_images(image).sparse
    first = aligned.fingerprint
    np.save(out, np.load(out) * 2.0)  # another map under the same path: another model
    assert Encoder(create_model(str(aligned_config), device="cpu")).fingerprint != first
    out.unlink()
    with pytest.raises(FileNotFoundError, match="stair-search align"):
        Encoder(create_model(str(aligned_config), device="cpu")).concepts()


def test_stair_lite_4_reads_stair_lite_3s_words_through_its_shipped_alignment():
    """stair-lite-4 is stair-lite-3 (stair-lite-2's weights, heads+concepts) with the shipped concept alignment and
    concept_weight 1.0: the same dense vectors, other image words, its own fingerprint and concept bank."""
    aligned, base = Encoder("stair-lite-4", batch_size=4), Encoder("stair-lite-3", batch_size=4)
    assert aligned.model.config.concept_weight == 1.0 and aligned.sparse_source == "heads+concepts"
    assert aligned.concepts().image_map is not None and base.concepts().image_map is None
    state, reference = aligned.model.state_dict(), base.model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert aligned.fingerprint != base.fingerprint and dense_fingerprint(aligned.model) == dense_fingerprint(base.model)
    photos = [sample_photo(name) for name in ("coffee.png", "chelsea.png")]
    got, plain = aligned.encode_images(photos), base.encode_images(photos)
    np.testing.assert_array_equal(got.dense, plain.dense)
    assert all(set(a) != set(b) for a, b in zip(got.sparse, plain.sparse, strict=True))
    assert "coffee" in sorted(got.sparse[0], key=got.sparse[0].get)[-12:]
    assert "cat" in sorted(got.sparse[1], key=got.sparse[1].get)[-12:]


def test_a_dense_alignment_maps_every_dense_vector_and_is_its_own_model(foreign_clip, tmp_path, monkeypatch):
    """`stair-search align --target dense` trains a map that puts each drawn shape nearer its own caption; a config
    naming it maps the dense vectors and the local features alike, is another model (another dense fingerprint, one
    that follows the file's content, its own concept bank calibrated without embedding a word again: the same text
    tower), and a missing or misshapen file is a clear error."""
    pairs = shapes_parquet(tmp_path / "shapes")
    out = tmp_path / "dense.npy"
    done = subprocess.run([sys.executable, "-m", "stair_search.cli", "align", str(pairs), "--model", str(foreign_clip),
                           "--target", "dense", "--out", str(out), "--epochs", "40", "--lr", "1e-2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "(dense) on 12 pairs" in done.stdout
    before, after = (float(x) for x in done.stdout.split("loss ")[1].split(";")[0].split(" -> "))
    assert after < before - 0.5
    config = json.loads(foreign_clip.read_text()) | {"name": "tiny-clip-dense", "dense_alignment": str(out)}
    aligned_config = tmp_path / "tiny-clip-dense.json"
    aligned_config.write_text(json.dumps(config))
    plain, aligned = (Encoder(create_model(str(c), device="cpu"), batch_size=8) for c in (foreign_clip, aligned_config))
    align = np.load(out)
    words = plain.concepts()  # the tower's concept words: embedded once (or read from the cache)

    def no_text_encoding(*args, **kwargs):
        raise AssertionError("the concept words were embedded again")

    monkeypatch.setattr(aligned, "embed_texts", no_text_encoding)
    bank = aligned.concepts()
    np.testing.assert_array_equal(bank.embeddings, words.embeddings)
    assert not np.allclose(bank.image_mean, words.image_mean)  # calibrated on its own, mapped, reference vectors
    images = [Image.open(p).convert("RGB") for p in sorted((tmp_path / "shapes").glob("*.png"))]
    x, y = plain.encode_dense(images), aligned.encode_dense(images)
    mapped = x @ align.T
    np.testing.assert_allclose(y, mapped / np.linalg.norm(mapped, axis=1, keepdims=True), atol=1e-5)
    pixels = torch.stack([plain.preprocess(im) for im in images[:2]])
    with torch.inference_mode():
        np.testing.assert_allclose(aligned.model.encode_image(pixels).local.numpy(),
                                   plain.model.encode_image(pixels).local.numpy() @ align.T, atol=1e-5)
    captions = sorted(f"a {c} {s}" for c in ("red", "blue", "green", "yellow")
                      for s in ("circle", "square", "triangle"))
    names = [p.stem.replace("-", " ") for p in sorted((tmp_path / "shapes").glob("*.png"))]
    text = plain.embed_texts(captions)
    own = np.array([captions.index(f"a {n}") for n in names])
    hits = [float(np.mean((v @ text.T).argmax(axis=1) == own)) for v in (x, y)]
    assert hits[1] >= hits[0] + 0.25  # trained on these pairs: many more shapes now find their own caption
    assert dense_fingerprint(aligned.model) != dense_fingerprint(plain.model)
    first = aligned.fingerprint
    np.save(out, align * 2.0 + np.eye(len(align), dtype=np.float32))  # another map under the same path
    assert Encoder(create_model(str(aligned_config), device="cpu")).fingerprint != first
    np.save(out, np.eye(3, dtype=np.float32))
    with pytest.raises(ValueError, match="must be"):
        create_model(str(aligned_config), device="cpu")
    out.unlink()
    with pytest.raises(FileNotFoundError, match="align --target dense"):
        create_model(str(aligned_config), device="cpu")


def test_stair_lite_5_is_stair_lite_4_with_its_shipped_dense_alignment():
    """stair-lite-5 is stair-lite-4 (stair-lite-2's weights, heads+concepts, a concept alignment) whose dense
    vectors and local features go through the shipped dense alignment: the same weights, every dense vector the
    map of stair-lite-4's, its own dense fingerprint (so its own concept bank), and true words on real photos."""
    mapped, base = Encoder("stair-lite-5", batch_size=4), Encoder("stair-lite-4", batch_size=4)
    assert mapped.model.dense_map is not None and base.model.dense_map is None
    state, reference = mapped.model.state_dict(), base.model.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in reference)
    assert dense_fingerprint(mapped.model) != dense_fingerprint(base.model)
    photos = [sample_photo(name) for name in ("coffee.png", "chelsea.png")]
    align = mapped.model.dense_map.numpy()
    expected = base.encode_dense(photos) @ align.T
    np.testing.assert_allclose(mapped.encode_dense(photos), expected / np.linalg.norm(expected, axis=1, keepdims=True),
                               atol=1e-5)
    got = mapped.encode_images(photos)
    assert "coffee" in sorted(got.sparse[0], key=got.sparse[0].get)[-15:]
    assert max(got.sparse[1], key=got.sparse[1].get) == "cat"
