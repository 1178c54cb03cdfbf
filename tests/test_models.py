"""Factory (JSON config, built-in config, open_clip name + local file / cached tag) and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from stair_search.encode import Encoder
from stair_search.models import StairConfig, create_model, model_fingerprint, save_checkpoint


def encode_all(encoder: Encoder, images, texts):
    return encoder.encode_images(images), encoder.encode_texts(texts)


def assert_same_encodings(a, b, atol=1e-6):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.dense, y.dense, atol=atol)
        assert [sorted(s) for s in x.sparse] == [sorted(s) for s in y.sparse]


def test_json_config_builds_the_same_model_twice(tiny_config_path, shape_images):
    first = Encoder(create_model(str(tiny_config_path), device="cpu"))
    second = Encoder(create_model(str(tiny_config_path), device="cpu"))
    assert first.fingerprint == second.fingerprint
    assert_same_encodings(encode_all(first, shape_images[:3], ["red"]), encode_all(second, shape_images[:3], ["red"]))


def test_a_different_seed_gives_a_different_model(tiny_config_path):
    data = json.loads(tiny_config_path.read_text())
    data["seed"] += 1
    other = create_model(StairConfig.from_dict(data), device="cpu")
    assert model_fingerprint(other) != model_fingerprint(create_model(str(tiny_config_path), device="cpu"))


def test_a_query_only_setting_keeps_the_fingerprint_so_indexes_keep_opening(tiny_config_path):
    data = json.loads(tiny_config_path.read_text())
    data["feedback_docs"] = 3
    steered = create_model(StairConfig.from_dict(data), device="cpu")
    assert steered.config.feedback_docs == 3
    assert model_fingerprint(steered) == model_fingerprint(create_model(str(tiny_config_path), device="cpu"))


def test_unknown_names_and_keys_are_refused_with_the_options(tmp_path):
    with pytest.raises(ValueError, match="open_clip model name"):
        create_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="looked at"):
        create_model(str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="Unknown StairConfig keys"):
        StairConfig.from_dict({"name": "x", "clip": "ViT-B-32", "colour": 1})


def test_checkpoint_round_trip_gives_identical_encodings(tiny_encoder, tmp_path, shape_images):
    path = save_checkpoint(tiny_encoder.model, tmp_path / "tiny.pt")
    reloaded = Encoder(create_model(str(path), device="cpu"))
    assert reloaded.fingerprint == tiny_encoder.fingerprint
    assert_same_encodings(encode_all(tiny_encoder, shape_images, ["a red circle"]),
                          encode_all(reloaded, shape_images, ["a red circle"]))


def test_half_checkpoint_is_smaller_and_close(tiny_encoder, tmp_path, shape_images):
    full = save_checkpoint(tiny_encoder.model, tmp_path / "full.pt")
    half = save_checkpoint(tiny_encoder.model, tmp_path / "half.pt", half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    reloaded = Encoder(create_model(str(half), device="cpu"))
    np.testing.assert_allclose(reloaded.encode_images(shape_images).dense,
                               tiny_encoder.encode_images(shape_images).dense, atol=2e-2)


def test_checkpoint_refuses_foreign_files_and_other_vocabularies(tiny_encoder, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match="not a stair-search checkpoint"):
        create_model(str(tmp_path / "plain.pt"))
    path = save_checkpoint(tiny_encoder.model, tmp_path / "tiny.pt")
    payload = torch.load(path, weights_only=True)
    payload["vocabulary_sha256"] = "0" * 64
    torch.save(payload, path)
    with pytest.raises(ValueError, match="another vocabulary"):
        create_model(str(path))
    with pytest.raises(FileNotFoundError, match="looked at"):
        create_model(str(tmp_path / "nope.pt"))


def test_frozen_minilm_text_tower_is_left_out_of_the_checkpoint(tmp_path):
    """The embedded default (tiny ViT + pretrained MiniLM) stores only what it trains."""
    model = create_model("stair-tiny", device="cpu")
    path = save_checkpoint(model, tmp_path / "default.pt", half=True)
    assert path.stat().st_size < 20e6  # MiniLM alone is 90 MB in fp32
    reloaded = create_model(str(path), device="cpu")
    texts = ["a dog on the beach", "two cats"]
    a, b = Encoder(model).encode_texts(texts), Encoder(reloaded).encode_texts(texts)
    np.testing.assert_allclose(a.dense, b.dense, atol=2e-2)


def test_the_default_is_stair_lite_2_and_stair_lite_still_loads_as_it_was(shape_images):
    """stair-lite-2 ships weights only (stair-lite's towers, heads retrained): its config is its checkpoint's, its
    dense space is stair-lite's exactly, its sparse vectors are its own, so an index built with either model keeps
    opening with that model (a different fingerprint, never a silent swap)."""
    from dataclasses import asdict

    from stair_search.models import builtin_models
    from stair_search.models.factory import resolve_config

    shipped = {"stair-lite", "stair-lite-2", "stair-lite-3", "stair-lite-4", "stair-lite-5", "stair-tiny"}
    assert shipped <= set(builtin_models())
    new, old = (Encoder(create_model(name, device="cpu")) for name in ("stair-lite-2", "stair-lite"))
    assert (new.model.spec, new.name, old.name) == ("stair-lite-2", "stair-lite-2", "stair-lite")
    assert new.fingerprint != old.fingerprint
    ours, theirs = new.encode_images(shape_images[:3]), old.encode_images(shape_images[:3])
    np.testing.assert_array_equal(ours.dense, theirs.dense)
    assert [sorted(s) for s in ours.sparse] != [sorted(s) for s in theirs.sparse]
    assert all(len(s) > 64 for s in ours.sparse)  # its 128 words per image, against stair-lite's 64
    config = asdict(resolve_config("stair-lite-2"))  # what `train --model stair-lite-2` starts from
    differs = {k for k, v in asdict(resolve_config("stair-lite")).items() if config[k] != v}
    assert differs == {"name", "image_top_k", "keyword_alpha"}


OFFLINE_LOAD = textwrap.dedent("""
    import sys, numpy as np
    from stair_search.encode import Encoder
    from stair_search.models import create_model
    from PIL import Image
    image = Image.new("RGB", (240, 200), (200, 30, 30))
    for spec in sys.argv[1:]:
        name, _, pretrained = spec.partition("=")
        model = create_model(name, pretrained=pretrained, device="cpu")
        model.sparse_source = "none"  # this test is about the dense weights (a concept bank would take minutes)
        enc = Encoder(model)
        np.save(pretrained.replace("/", "_") + ".npy", enc.encode_images([image]).dense)
""")


@pytest.mark.slow
def test_open_clip_checkpoint_loads_offline_by_local_file_and_by_cached_tag(tmp_path):
    """The real-user path: ViT-B-32 weights as a local file, and as the laion2b tag from the HF cache."""
    import open_clip
    from safetensors.torch import save_file

    clip = open_clip.create_model("ViT-B-32")  # random weights, saved like the published checkpoint
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)
    snapshot = tmp_path / "hub/models--laion--CLIP-ViT-B-32-laion2B-s34B-b79K/snapshots/abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    weights = snapshot / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(weights))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    subprocess.run([sys.executable, "-c", OFFLINE_LOAD, f"ViT-B-32={weights}", "ViT-B-32=laion2b_s34b_b79k"],
                   cwd=tmp_path, env=env, check=True, timeout=300)
    by_file = np.load(tmp_path / (str(weights).replace("/", "_") + ".npy"))
    by_tag = np.load(tmp_path / "laion2b_s34b_b79k.npy")
    np.testing.assert_allclose(by_file, by_tag, atol=1e-6)
    # and they are the saved weights, not a fresh random model
    clip.eval()
    with torch.no_grad():
        from PIL import Image

        from stair_search.images import to_rgb
        _, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
        pixels = preprocess(to_rgb(Image.new("RGB", (240, 200), (200, 30, 30))))[None]
        expected = torch.nn.functional.normalize(clip.encode_image(pixels), dim=-1).numpy()
    np.testing.assert_allclose(by_tag, expected, atol=1e-5)


def test_missing_tag_says_where_it_looked(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "empty-hub")}
    code = "from stair_search.models import create_model; create_model('ViT-B-32', pretrained='laion2b_s34b_b79k')"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "not available offline" in result.stderr and str(tmp_path / "empty-hub") in result.stderr


def test_trust_gate_passes_the_training_subspace_and_shrinks_what_lies_outside():
    from stair_search.models.trust import TrustGate

    generator = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 4, generator=generator)).Q.T  # a 4-d subspace of 32-d features

    def inside(n: int) -> torch.Tensor:
        return torch.randn(n, 4, generator=generator) @ basis * 3 + 0.05 * torch.randn(n, 32, generator=generator)

    gate = TrustGate(32, 4)
    assert torch.equal(gate(inside(3)), torch.ones(3, 1))  # not fitted: nothing changes
    gate.fit(inside(200), inside(50))
    assert float(gate(inside(100)).mean()) > 0.95
    outside = torch.randn(100, 32, generator=generator)  # energy spread over all 32 directions: ~4/32 inside
    assert float(gate(outside).max()) < 0.5 and float(gate(outside).min()) >= 0
    with pytest.raises(ValueError, match="more than 4 training images"):
        TrustGate(32, 4).fit(inside(4), inside(5))


def test_clip_text_over_its_used_positions_equals_open_clips_own_encode_text(tiny_encoder):
    """The short path for a causal open_clip CLIP text tower (concept words, queries): same vectors as
    ``CLIP.encode_text`` over the whole context, for a batch that is all padding after a few positions."""
    from stair_search.models.stair import _causal_clip_text

    model = tiny_encoder.model
    assert _causal_clip_text(model.clip)
    for texts in (["red", "a square"], ["a red circle", "a much longer text about a blue triangle on white"]):
        tokens = model.tokenizer(texts)
        with torch.no_grad():
            torch.testing.assert_close(model.embed_text(tokens), model.clip.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_fields_added_later_leave_the_shipped_models_fingerprints_as_indexes_recorded_them(tiny_config_path):
    """Indexes on users' disks hold these fingerprints: a StairConfig field added since (concept_weight, weights)
    enters the hash only when set, so stair-tiny's is still the one its indexes recorded (c5938168dc53...)."""
    from stair_search.models.checkpoint import HASHED_WHEN_SET

    assert model_fingerprint(create_model("stair-tiny", device="cpu")).startswith("c5938168dc53")
    model = create_model(str(tiny_config_path), device="cpu")
    before = model_fingerprint(model)
    for key, default in HASHED_WHEN_SET.items():
        assert getattr(model.config, key) == default
    model.config.concept_weight = 0.75
    assert model_fingerprint(model) != before
    model.config.concept_weight = HASHED_WHEN_SET["concept_weight"]
    assert model_fingerprint(model) == before
