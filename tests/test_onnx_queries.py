"""Queries without torch (issue 40): the shipped models' query side on ONNX Runtime, exact against torch; open_clip
checkpoints fetched as a step of their own, and an offline run without one failing at once; messages that say what
ran.

The shipped models' query bundles and concept banks go to the user's data cache, as the other tests' banks do
(exported once per machine, ~10 s each); the tests that export on purpose (determinism, staleness, a declined
export) use a throwaway ``STAIR_DATA``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from stair_search.encode import Encoder
from stair_search.images import model_view
from stair_search.index import FeatureRecord, IndexReader, IndexWriter
from stair_search.models import create_model
from stair_search.models.query_export import PROBE_TEXTS
from stair_search.retrieve import QueryRouter, SearchRequest
from stair_search.retrieve.plan import NOT_EMITTED, plan_query
from stair_search.vectors import EncodedBatch
from tests.conftest import TINY_CONFIG, draw_shape, sample_photo

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [*PROBE_TEXTS, "moon", "a cup of coffee", "  HTML &amp; entities\tand\nnewlines ", "naïve façade — “quotes”",
         "日本語のテキスト", "x" * 300, "red"]
PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png")
MODELS = ("stair-lite-4", "stair-tiny")  # the default (grounded, heads+concepts, EfficientNet) and a ViT + full head


@pytest.fixture(scope="module", params=MODELS)
def pair(request) -> tuple[Encoder, Encoder]:
    """The same shipped model with its queries on torch and on ONNX Runtime (the bundle exported once if missing)."""
    on_onnx = Encoder(request.param, batch_size=8)
    assert on_onnx.query_runtime == "onnxruntime" and on_onnx.query_model() is not None
    return Encoder(request.param, batch_size=8, queries="torch"), on_onnx


# ------------------------------------------------------------------------------------------ exact against torch


def test_the_text_tower_on_onnx_runtime_gives_torchs_hidden_states(pair):
    on_torch, on_onnx = pair
    queries = on_onnx.query_model()
    ids = queries.tokenize(TEXTS)
    np.testing.assert_array_equal(ids, on_torch.model.tokenizer(TEXTS).numpy())  # the same token ids
    outputs = queries.text_outputs(ids)
    model = on_torch.model
    with torch.no_grad():
        pooled, tokens = model.text_tokens(torch.from_numpy(ids[:, : outputs.mask.shape[1]]))
        features = model.text_head.transform(tokens)
    assert np.abs(outputs.pooled - pooled.numpy()).max() < 1e-5  # measured ~1e-6
    assert np.abs(outputs.head_features - features.numpy()).max() < 1e-4  # LayerNorm outputs up to ~10: ~2e-5
    np.testing.assert_allclose(on_onnx.embed_texts(TEXTS), on_torch.embed_texts(TEXTS), atol=1e-5, rtol=0)


def test_text_queries_give_torchs_dense_and_sparse_vectors(pair):
    on_torch, on_onnx = pair
    expected, got = on_torch.encode_texts(TEXTS), on_onnx.encode_texts(TEXTS)
    np.testing.assert_allclose(got.dense, expected.dense, atol=1e-5, rtol=0)
    for want, have in zip(expected.sparse, got.sparse, strict=True):
        assert list(have) == list(want)  # the same word-pieces, in the same order
        np.testing.assert_allclose(list(have.values()), list(want.values()), atol=1e-5, rtol=0)


def test_image_queries_give_torchs_vectors_and_preprocessing_bit_for_bit(pair):
    on_torch, on_onnx = pair
    queries = on_onnx.query_model()
    shapes = [sample_photo(name) for name in PHOTOS] + [
        draw_shape("red", "circle", size=40),  # smaller than the crop: torchvision pads
        Image.new("RGBA", (300, 90), (10, 200, 30, 128)), Image.new("L", (90, 301), 77)]
    for image in shapes:
        viewed = model_view(image)
        np.testing.assert_array_equal(queries.pixels(viewed), on_torch.model.preprocess(viewed).numpy())
    photos = [sample_photo(name) for name in PHOTOS]
    expected, got = on_torch.encode_images(photos), on_onnx.encode_images(photos)
    np.testing.assert_allclose(got.dense, expected.dense, atol=1e-5, rtol=0)
    for want, have in zip(expected.sparse, got.sparse, strict=True):
        assert set(have) == set(want)
        np.testing.assert_allclose([have[t] for t in want], list(want.values()), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(got.local_positions, expected.local_positions)  # the same patches picked
    np.testing.assert_allclose(got.local.astype(np.float32), expected.local.astype(np.float32), atol=2e-3, rtol=0)


@pytest.fixture(scope="module")
def photo_index(pair, tmp_path_factory) -> Path:
    """Photos and drawings indexed through torch (as indexing runs), captions on some of them (the text route)."""
    on_torch, _ = pair
    images = [sample_photo(name) for name in PHOTOS] + [draw_shape(c, "circle") for c in ("red", "blue")]
    captions = ["a cat on a rug", "a cup of coffee", "", "", "a red circle", ""]
    records = [FeatureRecord(id=f"doc-{i}", source=f"drawn://{i}", width=64, height=64, caption=caption,
                             metadata={"n": i}) for i, caption in enumerate(captions)]
    folder = tmp_path_factory.mktemp("photos") / on_torch.name
    with IndexWriter(folder, on_torch.record, shard_size=4) as writer:
        writer.add(records[:4], on_torch.encode_pixels(torch.stack([on_torch.preprocess(i) for i in images[:4]])))
        writer.add(records[4:], on_torch.encode_pixels(torch.stack([on_torch.preprocess(i) for i in images[4:]])))
        writer.commit()
    return folder


@pytest.mark.parametrize("weights", ["model", "idf"])
def test_searches_answer_alike_on_torch_and_onnx_runtime(pair, photo_index, weights):
    on_torch = pair[0]
    if weights == "idf" and not on_torch.config.ground_text:
        pytest.skip("idf query weights need a grounded model")
    routers = [QueryRouter(IndexReader(photo_index), encoder, query_weights=weights) for encoder in pair]
    requests = [SearchRequest(text=text, mode=mode, k=6) for text in ("cat", "a cup of coffee", "red circle", "moon")
                for mode in ("sparse", "dense", "hybrid", "auto")]
    requests += [SearchRequest(image=sample_photo("coffee.png"), mode=mode, k=6) for mode in ("dense", "auto")]
    for request in requests:
        want, got = (router.search(request) for router in routers)
        assert [h.id for h in got.hits] == [h.id for h in want.hits], request
        np.testing.assert_allclose([h.score for h in got.hits], [h.score for h in want.hits], atol=1e-6, rtol=0)
        assert (got.mode, got.decision) == (want.mode, want.decision)
    for router in routers:
        router.close()


def test_a_cli_search_with_a_shipped_model_never_imports_torch(pair, photo_index):
    """Text and image queries through the command line, in a fresh process: no torch, open_clip or transformers."""
    code = ("import sys, json\nfrom stair_search.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
            "print(json.dumps([m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules]))")
    photo = photo_index.parent / "query.png"
    sample_photo("chelsea.png").save(photo)
    for args in (["a cup of coffee"], ["--image", str(photo)], ["moon", "--mode", "hybrid"]):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, "search", str(photo_index), *args, "--json"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout.splitlines()[-1]) == [], (args, done.stderr)
        print(f"{args}: {time.perf_counter() - started:.1f} s")  # the wall time, for the log (pytest -s)


# ------------------------------------------------------------------------------------------ the bundle itself


@pytest.fixture
def own_model(tmp_path, monkeypatch) -> Path:
    """A model of the user's own (a JSON config: MiniLM text, a small ViT, random heads) and a throwaway data
    cache: its bundle is exported by the test."""
    config = json.loads((ROOT / "stair_search/models/configs/stair-tiny.json").read_text())
    config.update(name="own-tiny", sparse="heads", seed=3)
    path = tmp_path / "own-tiny.json"
    path.write_text(json.dumps(config))
    monkeypatch.setenv("STAIR_DATA", str(tmp_path / "data"))
    return path


def test_a_bundle_is_deterministic_published_whole_and_stale_once_a_source_changes(own_model, tmp_path):
    from stair_search.models import query_export
    from stair_search.models.query_runtime import META, QueryModel

    assert Encoder(own_model).query_runtime == "torch"  # auto: only the shipped models
    encoder = Encoder(own_model, queries="onnxruntime")
    queries = encoder.query_model()
    assert queries is not None and queries.meta["checked"]["exact"]
    folder = queries.folder
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    again = query_export.staging(folder)
    query_export.write_bundle(encoder.model, str(own_model), None, again)
    for path in folder.iterdir():
        if path.name != META:
            assert path.read_bytes() == (again / path.name).read_bytes(), path.name
    expected = {k: v for k, v in json.loads((folder / META).read_text()).items() if k != "checked"}
    assert json.loads((again / META).read_text()) == expected
    query_export.publish(again, folder, {"exact": True})  # another process came second: the first bundle stays
    assert not again.exists() and (folder / META).is_file()
    fresh = Encoder(own_model, queries="onnxruntime")
    assert fresh.query_model().folder == folder and fresh.fingerprint == encoder.fingerprint
    os.utime(own_model, ns=(time.time_ns(), time.time_ns() + 10**9))  # the config changed: the bundle is stale
    assert QueryModel.load(folder) is None


def test_an_export_that_is_not_exact_keeps_torch_and_is_not_tried_again(own_model, monkeypatch):
    from stair_search.models import query_export

    monkeypatch.setattr(query_export, "DENSE_TOLERANCE", 0.0)
    monkeypatch.setattr(query_export, "SPARSE_TOLERANCE", 0.0)
    encoder = Encoder(own_model, queries="onnxruntime")
    assert encoder.query_model() is None
    texts = ["a red circle"]
    assert encoder.encode_texts(texts).sparse == Encoder(own_model, queries="torch").encode_texts(texts).sparse
    monkeypatch.setattr(query_export, "write_bundle", lambda *args: pytest.fail("exported again"))
    assert Encoder(own_model, queries="onnxruntime").query_model() is None


def test_the_query_runtime_is_chosen_by_name_and_environment(monkeypatch):
    from stair_search.models.query_runtime import query_runtime

    assert query_runtime(None, "stair-lite-4", builtin=True) == "onnxruntime"
    assert query_runtime(None, "my.json", builtin=False) == "torch"
    assert query_runtime("onnxruntime", "my.json", builtin=False) == "onnxruntime"
    assert query_runtime("onnxruntime", None, builtin=False) == "torch"  # a model object: torch
    monkeypatch.setenv("STAIR_QUERY_RUNTIME", "torch")
    assert query_runtime(None, "stair-lite-4", builtin=True) == "torch"
    monkeypatch.setenv("STAIR_QUERY_RUNTIME", "tensorflow")
    with pytest.raises(ValueError, match="STAIR_QUERY_RUNTIME='tensorflow'"):
        query_runtime(None, "stair-lite-4", builtin=True)


# ------------------------------------------------------------------------------------------ checkpoints


def test_an_uncached_open_clip_checkpoint_fails_at_once_with_one_line_naming_fetch_model(tmp_path):
    """No checkpoint in either cache, and a hub that cannot be reached: one line, exit 1, no retries."""
    folder = tmp_path / "photos"
    folder.mkdir()
    draw_shape("red", "circle").save(folder / "red.png")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "STAIR_DATA": str(tmp_path / "data"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "stair_search.cli", "index", str(folder), "--out",
                           str(tmp_path / "index"), "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - started
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "`stair-search fetch-model ViT-B-32 --pretrained laion2b_s34b_b79k`" in done.stderr
    assert str(tmp_path / "hub") in done.stderr and seconds < 60  # torch's import, not 53 s of retries


@pytest.fixture
def tiny_tag(tmp_path, monkeypatch) -> tuple[str, str, Path]:
    """A tiny open_clip model registered with a pretrained tag (as open_clip lists ViT-B-32's), its checkpoint saved
    locally the way open_clip saves one, and empty caches."""
    import open_clip

    name, tag = "TinyCLIP-test", "tiny_s1"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / f"{name}.json").write_text(json.dumps(TINY_CONFIG["clip"]))
    open_clip.add_model_config(tmp_path / "configs")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, name, {tag: {
        "url": "", "hf_hub": "stair-test/TinyCLIP-tiny_s1/", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
        "interpolation": "bicubic", "resize_mode": "shortest"}})
    monkeypatch.setenv("STAIR_DATA", str(tmp_path / "data"))
    torch.manual_seed(1)
    weights = tmp_path / "open_clip_model.pt"
    torch.save({"state_dict": open_clip.create_model(name).state_dict()}, weights)
    return name, tag, weights


def test_fetch_model_takes_a_local_checkpoint_and_runs_find_it_offline(tiny_tag, tmp_path):
    from stair_search.models.config import StairConfig
    from stair_search.models.open_clip_weights import fetch

    name, tag, weights = tiny_tag
    config = StairConfig(name="tiny-tagged", clip=name, pretrained=tag, sparse="none")
    with pytest.raises(FileNotFoundError, match=f"stair-search fetch-model {name} --pretrained {tag}"):
        create_model(config, device="cpu")
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(3)}}, other)
    with pytest.raises(ValueError, match=f"not a checkpoint of {name}"):
        fetch(name, tag, other)
    stored = fetch(name, tag, weights)
    assert stored.is_file() and stored.parent == tmp_path / "data" / "checkpoints" / name / tag
    model = create_model(config, device="cpu")  # found in the store, loaded as a file: no network
    saved = torch.load(weights, weights_only=True)["state_dict"]
    assert all(torch.equal(model.clip.state_dict()[k], v) for k, v in saved.items())
    normalize = model.preprocess.transforms[-1]
    assert (tuple(normalize.mean), tuple(normalize.std)) == ((0.5,) * 3, (0.25,) * 3)  # the tag's preprocessing


def test_a_checkpoint_in_the_hugging_face_cache_is_found_without_the_network(tiny_tag, tmp_path, monkeypatch):
    from stair_search.models.open_clip_weights import find_checkpoint, tag_config

    name, tag, weights = tiny_tag
    snapshot = tmp_path / "hub" / "models--stair-test--TinyCLIP-tiny_s1" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    (snapshot / "open_clip_pytorch_model.bin").write_bytes(weights.read_bytes())
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_checkpoint(name, tag, tag_config(name, tag)) == snapshot / "open_clip_pytorch_model.bin"


def test_fetch_model_for_a_shipped_model_needs_nothing():
    from typer.testing import CliRunner

    from stair_search.cli import app

    result = CliRunner().invoke(app, ["fetch-model", "stair-lite-4"])
    assert result.exit_code == 0 and "ships with stair-search" in result.output


# ------------------------------------------------------------------------------------------ messages


@pytest.fixture(scope="module")
def word_index(tmp_path_factory) -> QueryRouter:
    """A grounded tiny model that emits four words; documents that carry only "red" and "blue" (hand-made
    vectors), with captions: the text route runs too."""
    root = tmp_path_factory.mktemp("words")
    path = root / "grounded.json"
    path.write_text(json.dumps(TINY_CONFIG | {"name": "grounded", "ground_text": True, "text_floor": 0.3,
                                              "emit_tokens": ["red", "blue", "circle", "moon"]}))
    encoder = Encoder(create_model(str(path), device="cpu"))
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(4, 32)).astype(np.float32)
    batch = EncodedBatch(dense=dense / np.linalg.norm(dense, axis=1, keepdims=True),
                         sparse=[{"red": 1.0}, {"blue": 1.0}, {"red": 0.5, "blue": 0.5}, {"blue": 0.2}],
                         local=np.zeros((4, 4, 32), np.float16), local_positions=np.full((4, 4, 2), 0.5, np.float16))
    records = [FeatureRecord(id=f"d{i}", source="", width=8, height=8, caption=f"photo {i}") for i in range(4)]
    with IndexWriter(root / "index", encoder.record) as writer:
        writer.add(records, batch)
        writer.commit()
    router = QueryRouter(IndexReader(root / "index"), encoder, query_weights="idf")
    yield router
    router.close()


def test_the_note_says_which_words_no_document_carries_and_the_reason_names_what_ran(word_index):
    moon = word_index.search(SearchRequest(text="moon", k=3))
    assert moon.mode == "dense+text"
    assert moon.decision["note"] == ("no indexed document carries the query's word 'moon', so the sparse route was "
                                     "left out: dense and the captions' text route only")
    assert moon.decision["reason"] == ("keyword-like query (1 word(s), no function words): dense and the captions' "
                                       "text route, fused by rank (RRF)")
    assert "sparse weight" not in moon.decision["reason"] and "hybrid" not in moon.decision["reason"]
    square = word_index.search(SearchRequest(text="square", k=3, use_text=False))  # a word the model never emits
    assert square.decision["note"] == f"{NOT_EMITTED}, so the sparse route was left out: dense only"
    assert square.decision["reason"] == "keyword-like query (1 word(s), no function words): dense"
    asked = word_index.search(SearchRequest(text="moon circle", mode="sparse", k=3))
    assert asked.decision["note"].startswith("no indexed document carries the query's words 'moon', 'circle', so "
                                             "the sparse route matches nothing")
    red = word_index.search(SearchRequest(text="red", k=3))  # carried: hybrid, no note, one behaviour named
    assert "note" not in red.decision and red.decision["reason"].endswith(
        "hybrid and the captions' text route, fused by rank (RRF)")


def test_a_grounded_models_own_weights_that_match_nothing_say_so(word_index):
    router = QueryRouter(word_index.index, word_index.encoder, query_weights="model")
    response = router.search(SearchRequest(text="circle", mode="hybrid", k=3))
    assert response.query_tokens and response.decision["note"] == (
        "no indexed document carries the query's word 'circle', so the sparse route matched nothing")


def test_the_plan_reason_names_one_behaviour():
    facts = {"default_depth": 100, "keyword_alpha": 0.9, "feedback_docs": 0}
    plain = plan_query(SearchRequest(text="moon", use_text=False), has_text=True, **facts)
    assert plain.decision.reason == "keyword-like query (1 word(s), no function words): hybrid, sparse weight 0.9"
    with_text = plan_query(SearchRequest(text="moon"), has_text=True, **facts)
    assert with_text.decision.reason == ("keyword-like query (1 word(s), no function words): hybrid and the captions' "
                                         "text route, fused by rank (RRF)")
    assert with_text.without_sparse("no indexed document carries the query's word 'moon'").decision.reason == (
        "keyword-like query (1 word(s), no function words): dense and the captions' text route, fused by rank (RRF)")
