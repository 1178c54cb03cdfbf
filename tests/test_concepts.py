"""Training-free sparse vectors (models/concepts.py) for a model without trained heads, never random ones.

A small open_clip CLIP saved locally as a checkpoint file stands for a user's real CLIP (no network), and
stair-lite's own dense towers stand for a pretrained one whose words can be checked on real photos.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import indexer
from stair_search.encode import Encoder
from stair_search.index.manifest import IndexMismatchError, Manifest
from stair_search.index.reader import Index
from stair_search.models import create_model
from stair_search.models.checkpoint import dense_fingerprint
from stair_search.models.concepts import query_vector
from stair_search.retrieve.router import QueryRouter
from tests.conftest import TINY_CONFIG, draw_shape

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def foreign_clip(tmp_path_factory) -> Path:
    """A config for an open_clip CLIP with its weights in a local open_clip checkpoint file, no STAIR heads."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    clip = open_clip.CLIP(**TINY_CONFIG["clip"])
    weights = folder / "open_clip_model.pt"
    torch.save({"state_dict": clip.state_dict()}, weights)
    config = {key: value for key, value in TINY_CONFIG.items() if key != "sparse"}
    config.update(name="tiny-clip", pretrained=str(weights))
    path = folder / "tiny-clip.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(autouse=True)
def data_home(request, tmp_path_factory, monkeypatch):
    """The throwaway tiny CLIP's banks go to the session's folder, not the user's data cache; the shipped models'
    bank is the shared one (built once per machine, ~100 s on 2 cores, and reused by the other tests)."""
    if "foreign_clip" in request.fixturenames:
        monkeypatch.setenv("STAIR_DATA", str(tmp_path_factory.getbasetemp() / "stair-data"))


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
    indexer.run(folder, tmp_path / "index", encoder=encoder, workers=0, progress=False)
    assert Manifest.load(tmp_path / "index").sparse == "concepts"
    router = QueryRouter(Index(tmp_path / "index"), encoder)
    for hit in router.search(text="red circle", mode="sparse", k=4, explain=True).hits:
        assert set(hit.matched) <= {"red", "circle"}  # matched words are the query's own words, really in the image
    trained = Encoder(create_model("stair-tiny", device="cpu"))
    with pytest.raises(IndexMismatchError):  # an encoder whose sparse vectors come from elsewhere is refused
        Manifest.load(tmp_path / "index").check_encoder(trained)


def test_queries_keep_their_own_concept_words_weighted_by_rarity(foreign_clip):
    vocabulary = create_model(str(foreign_clip), device="cpu").vocabulary
    vector = query_vector(vocabulary, "the harpsichord and a dog on the beach")
    assert set(vector) == {"harpsichord", "dog", "beach"}
    assert vector["harpsichord"] > max(vector["dog"], vector["beach"]) > 0  # a rare word weighs more
    assert query_vector(vocabulary, "tabby") == {}  # split into tab ##by: no word of its own, never a wrong one


def test_training_free_vectors_are_the_same_in_two_processes_and_read_back_from_the_cache(foreign_clip, tmp_path):
    images = [draw_shape("green", "triangle"), draw_shape("yellow", "circle", background="black")]
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    code = ("import json, sys; from PIL import Image; from stair_search.encode import Encoder; "
            "e = Encoder(sys.argv[1]); "
            "print(json.dumps(e.encode_images([Image.open(p).convert('RGB') for p in sys.argv[2:]]).sparse))")
    args = [sys.executable, "-c", code, str(foreign_clip), *(str(tmp_path / f"{i}.png") for i in range(2))]
    env = {**os.environ, "STAIR_DATA": str(tmp_path / "fresh-cache")}
    first = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    cache = list((tmp_path / "fresh-cache" / "concepts").glob("*.npz"))
    assert len(cache) == 1
    built = cache[0].stat().st_mtime_ns
    second = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=True)
    assert json.loads(first.stdout) == json.loads(second.stdout) and json.loads(first.stdout)[0]
    assert cache[0].stat().st_mtime_ns == built  # the second process read the bank, it did not rebuild it


def test_warming_an_encoder_makes_its_concept_bank_before_the_first_image(foreign_clip, tmp_path, monkeypatch):
    """What a server does when it loads a model: a first image query must not wait for the bank's build."""
    monkeypatch.setenv("STAIR_DATA", str(tmp_path / "empty-cache"))
    encoder = Encoder(create_model(str(foreign_clip), device="cpu"), batch_size=8)
    encoder.warm()
    cache = list((tmp_path / "empty-cache" / "concepts").glob("*.npz"))
    assert len(cache) == 1
    built = cache[0].stat().st_mtime_ns
    assert encoder.encode_images([draw_shape("red", "circle")]).sparse[0]
    assert cache[0].stat().st_mtime_ns == built and len(list(cache[0].parent.glob("*.npz"))) == 1


def test_a_pretrained_dual_encoder_gets_words_related_to_real_photos():
    """stair-lite's dense towers used as if they were a foreign CLIP (its trained heads ignored)."""
    import skimage

    model = create_model("stair-lite", device="cpu")
    model.sparse_source = "concepts"
    encoder = Encoder(model, batch_size=4)
    folder = Path(skimage.__file__).parent / "data"
    photos = [Image.open(folder / name).convert("RGB") for name in ("coffee.png", "chelsea.png", "rocket.jpg")]
    vectors = encoder.encode_images(photos).sparse
    top = [list(v)[:12] for v in vectors]
    assert "coffee" in top[0] and "cat" in top[1] and "missile" in top[2], top
    assert np.isfinite([w for v in vectors for w in v.values()]).all()


def test_heads_plus_concepts_adds_the_training_free_weights_to_the_trained_heads(tmp_path):
    """stair-lite-3 is stair-lite-2's weights (StairConfig.weights) with sparse "heads+concepts": each image word
    weighs its head weight plus concept_weight x its training-free weight, queries come from the text head, and an
    index records the source and refuses stair-lite-2's encoder (another fingerprint)."""
    import skimage

    from stair_search.models.heads import top_k_sparse

    mixed, heads = Encoder("stair-lite-3", batch_size=4), Encoder("stair-lite-2", batch_size=4)
    assert mixed.sparse_source == "heads+concepts" and heads.sparse_source == "heads"
    state, reference = mixed.model.state_dict(), heads.model.state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    assert mixed.fingerprint != heads.fingerprint  # but the same dense side: one cached concept bank
    assert dense_fingerprint(mixed.model) == dense_fingerprint(heads.model) != dense_fingerprint(
        create_model("stair-tiny", device="cpu"))
    folder = Path(skimage.__file__).parent / "data"
    photos = [Image.open(folder / name).convert("RGB") for name in ("coffee.png", "chelsea.png", "rocket.jpg")]
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
    indexer.run(images, tmp_path / "index", encoder=mixed, workers=0, progress=False)
    assert Manifest.load(tmp_path / "index").sparse == "heads+concepts"
    with pytest.raises(IndexMismatchError, match="sparse vectors from heads != index heads\\+concepts"):
        Index(tmp_path / "index").manifest.check_encoder(heads)
    hits = QueryRouter(Index(tmp_path / "index"), mixed).search(text="cat", mode="sparse", k=1, explain=True).hits
    assert hits[0].id.endswith("chelsea.png") and "cat" in hits[0].matched
