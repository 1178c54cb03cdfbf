"""STAIR training on real drawn images: the loss falls, vectors stay valid, grounding holds, resume works."""

from __future__ import annotations

import json
import math

import pytest
import torch

from stair_search.encode import Encoder
from stair_search.models import create_model
from stair_search.train import TrainConfig, train
from stair_search.train.losses import distill, flops, flops_weight, info_nce, word_prediction
from tests.conftest import COLOURS, draw_shape

SHAPES = ("circle", "square", "triangle")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs")
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            for background in ("white", "black"):
                path = folder / f"{colour}-{shape}-{background}.png"
                draw_shape(colour, shape, background=background).save(path)
                out.append((str(path), f"a {colour} {shape} on {background}"))
    return out


def test_info_nce_and_flops_match_their_formulas():
    logits = torch.tensor([[2.0, 0.0], [1.0, 3.0]])
    rows = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(math.exp(3) / (math.exp(1) + math.exp(3)))) / 2
    cols = (-math.log(math.exp(2) / (math.exp(2) + math.exp(1))) - math.log(math.exp(3) / (1 + math.exp(3)))) / 2
    assert float(info_nce(logits)) == pytest.approx((rows + cols) / 2)
    weights = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    assert float(flops(weights)) == pytest.approx(2.0**2 + 0 + 1.0**2)
    assert [flops_weight(s, 10, 0.5) for s in (0, 5, 10, 20)] == [0.0, 0.125, 0.5, 0.5]


def test_distillation_is_the_kl_of_both_softmaxes_and_zero_only_on_the_teachers_ranking():
    teacher = torch.tensor([[3.0, 0.0], [1.0, 2.0]])
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])

    def kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
        p, q = p_logits.softmax(dim=1), q_logits.softmax(dim=1)
        return float((p * (p / q).log()).sum(dim=1).mean())

    expected = (kl(teacher, student) + kl(teacher.T, student.T)) / 2
    assert float(distill(student, teacher)) == pytest.approx(expected)
    assert float(distill(teacher + 5.0, teacher)) == pytest.approx(0.0, abs=1e-6)  # softmax ignores a shift
    assert expected > 0.01


def test_the_word_loss_balances_a_captions_words_against_the_rest():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.0, 3.0, -2.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    sp = torch.nn.functional.softplus
    positive = (sp(torch.tensor(-2.0)) + sp(torch.tensor(-3.0)) + sp(torch.tensor(2.0))) / 3
    negative = (sp(torch.tensor(-1.0)) + sp(torch.tensor(0.0)) + sp(torch.tensor(0.0))) / 3
    assert float(word_prediction(logits, targets)) == pytest.approx(float(positive + negative))
    assert float(word_prediction(logits, torch.zeros_like(logits))) == 0.0


def test_training_lowers_the_loss_and_writes_a_loadable_grounded_model(pairs, tiny_config_path, tmp_path):
    config = TrainConfig(model=str(tiny_config_path), epochs=(5, 1, 1), batch_size=12, lr=2e-3, device="cpu",
                         ground_text=True)
    result = train(pairs, tmp_path / "run", config, val_pairs=pairs[:8])
    grounded = [e for e in result.log if e.stage == "grounded"]
    assert [e.stage for e in result.log] == ["grounded"] * 5 + ["text", "joint"]
    assert grounded[-1].loss < grounded[0].loss
    assert all(e.val_r1_dense is not None for e in result.log)

    model = create_model(str(result.checkpoint), device="cpu")
    caption_tokens = {model.vocabulary.tokens[i] for _, c in pairs for i in model.vocabulary.token_ids(c)}
    assert set(model.config.emit_tokens) == caption_tokens  # the heads speak the training texts' words
    encoder = Encoder(model, batch_size=8)
    from PIL import Image

    images = encoder.encode_images([Image.open(p) for p, _ in pairs[:6]])
    for vector in images.sparse:
        assert set(vector) <= caption_tokens and all(w > 0 for w in vector.values())
    query = "a red circle with a dog"
    text = encoder.encode_texts([query]).sparse[0]
    assert set(text) <= {model.vocabulary.tokens[i] for i in model.vocabulary.token_ids(query)}


def test_a_killed_run_resumes_where_it_stopped(pairs, tiny_config_path, tmp_path):
    first = TrainConfig(model=str(tiny_config_path), epochs=(1, 0, 0), batch_size=12, device="cpu")
    train(pairs, tmp_path / "run", first)
    resumed = train(pairs, tmp_path / "run", TrainConfig(**{**first.__dict__, "epochs": (2, 0, 1)}), resume=True)
    assert [e.epoch for e in resumed.log] == [1, 2, 3]
    assert [e.stage for e in resumed.log] == ["grounded", "grounded", "joint"]


def test_the_frozen_text_cache_gives_the_transformers_outputs():
    from stair_search.train.trainer import FrozenTextCache

    model = create_model("stair-tiny", device="cpu")  # the frozen Hugging Face MiniLM tower it caches
    texts = ["a red circle", "two blue squares on a yellow background"]
    ids = model.tokenizer(texts)
    text_tower = model.clip.text
    with torch.no_grad():
        reference = model.encode_text(ids)
        text_tower.transformer = FrozenTextCache(text_tower.transformer, ids, model.pad_id)
        try:
            assert len(text_tower.transformer.hidden) == 2
            cached = model.encode_text(ids)
            unseen = model.encode_text(model.tokenizer(["a green dog"]))  # not cached: the real transformer
        finally:
            text_tower.transformer = text_tower.transformer.transformer
        direct = model.encode_text(model.tokenizer(["a green dog"]))
    torch.testing.assert_close(cached.dense, reference.dense, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached.sparse, reference.sparse, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unseen.sparse, direct.sparse)


def test_a_few_steps_on_the_pretrained_tower_train_only_its_top(pairs, tmp_path):
    """stair-lite from its config: cached stem, trunk frozen in the grounded stage, last block tuned in joint."""
    from stair_search.models.factory import build_model, resolve_config

    start = build_model(resolve_config("stair-lite"))
    config = TrainConfig(model="stair-lite", epochs=(1, 0, 2), batch_size=12, device="cpu",
                         tower_frozen=("grounded",), stop_after=2)
    result = train(pairs, tmp_path / "lite", config)
    assert [e.stage for e in result.log] == ["grounded", "joint"] and all(math.isfinite(e.loss) for e in result.log)
    assert list((tmp_path / "lite" / "stem-cache").glob("*.pt"))  # a rerun reads the stem features back
    trained = create_model(str(result.checkpoint), device="cpu")
    before, after = start.clip.visual.trunk, trained.clip.visual.trunk
    assert torch.equal(before.conv_stem.weight.half(), after.conv_stem.weight.half())  # the cached stem is frozen
    assert not torch.equal(before.blocks[-1][0].conv_pw.weight.half(), after.blocks[-1][0].conv_pw.weight.half())
    # The ImageNet prior's class texts were embedded once and travel in the checkpoint.
    assert float(trained.image_prior.class_embeddings.norm(dim=1).min()) == pytest.approx(1.0, abs=1e-2)
    assert int((trained.image_prior.class_tokens >= 0).sum()) > 1000
    assert trained.config.emit_tokens == "words"  # open vocabulary: not limited to the training texts


def test_training_fits_the_trust_gate_that_hands_unfamiliar_images_to_the_prior(pairs, tmp_path):
    """A run of a model with a trust gate ends by fitting it on its own training images: they and drawings like
    them keep the learned parts whole, while a real photo (nothing like 24 flat shapes) gets less of them."""
    import json

    from stair_search.models.config import CONFIG_DIR
    from tests.conftest import sample_photo

    config = json.loads((CONFIG_DIR / "stair-lite.json").read_text())
    config.update(name="lite-gated", trust_components=8)
    path = tmp_path / "lite-gated.json"
    path.write_text(json.dumps(config))
    result = train(pairs, tmp_path / "run", TrainConfig(model=str(path), epochs=(1, 0, 0), batch_size=12,
                                                        device="cpu", tower_frozen=("grounded",)))
    model = create_model(str(result.checkpoint), device="cpu").eval()
    assert model.trust.fitted and model.config.trust_components == 8
    pixels = torch.stack([model.preprocess(draw_shape("red", "circle", background="black")),
                          model.preprocess(sample_photo("chelsea.png"))])
    with torch.inference_mode():
        features = model.tower.tail(model.tower.stem(pixels)).features
        weight = model.trust(features).flatten()
    assert weight[0] > 0.9 and weight[1] < 0.6


def test_heads_only_training_changes_the_heads_and_nothing_else(pairs, tiny_config_path, tmp_path):
    """D2S-style cheap training: a pretrained dual encoder keeps its towers (so its dense vectors are unchanged)
    and gains trained heads, whose checkpoint then writes sparse vectors from its heads."""
    from stair_search.models import save_checkpoint

    start = create_model(str(tiny_config_path), device="cpu")
    save_checkpoint(start, tmp_path / "start.pt")
    config = TrainConfig(model=str(tmp_path / "start.pt"), epochs=(2, 0, 0), batch_size=12, device="cpu",
                         heads_only=True, words=1.0, distill=0.5)
    result = train(pairs, tmp_path / "heads", config)
    trained = create_model(str(result.checkpoint), device="cpu")
    before, after = start.state_dict(), trained.state_dict()
    heads = [k for k in before if k.startswith(("image_head.", "text_head."))]
    assert heads and any(not torch.equal(before[k].half(), after[k].half()) for k in heads)
    others = [k for k in before if k not in heads]
    assert all(torch.equal(before[k].half(), after[k].half()) for k in others)
    images = [draw_shape("red", "circle"), draw_shape("blue", "square")]
    np_dense = Encoder(start).encode_images(images).dense
    assert abs(Encoder(trained).encode_images(images).dense - np_dense).max() < 2e-3  # fp16 checkpoint rounding
    assert trained.sparse_source == "heads"


def test_training_a_config_over_trained_weights_goes_on_from_those_weights(pairs, tiny_config_path, tmp_path):
    """`train --model CONFIG` where the config names trained weights (StairConfig.weights, like stair-lite-4's)
    starts from those weights, not from a fresh build of the config: the towers stay the checkpoint's and the heads
    move on from its heads."""
    from stair_search.models import save_checkpoint

    start = create_model(str(tiny_config_path), device="cpu")
    fresh = {k: v.clone() for k, v in start.state_dict().items()}
    with torch.no_grad():
        start.image_head.bias.add_(1.0)  # trained weights that a fresh build of the config does not have
    save_checkpoint(start, tmp_path / "start.pt")
    over = json.loads(tiny_config_path.read_text()) | {"name": "over-start", "weights": str(tmp_path / "start.pt")}
    path = tmp_path / "over-start.json"
    path.write_text(json.dumps(over))
    config = TrainConfig(model=str(path), epochs=(1, 0, 0), batch_size=12, device="cpu", heads_only=True)
    trained = create_model(str(train(pairs, tmp_path / "run", config).checkpoint), device="cpu").state_dict()
    bias = trained["image_head.bias"]
    assert (bias - start.image_head.bias).abs().mean() < (bias - fresh["image_head.bias"]).abs().mean()
    towers = [k for k in fresh if not k.startswith(("image_head.", "text_head."))]
    assert all(torch.equal(start.state_dict()[k].half(), trained[k].half()) for k in towers)


def test_heads_only_reads_the_tower_once_and_its_cache_gives_the_models_own_image_vectors(pairs, tmp_path):
    """Heads-only steps run on :func:`head_inputs` (the frozen tower's outputs, fp16): the sparse and dense vectors
    built from that cache are the ones the model computes from the pixels, on the pretrained CNN with its prior."""
    from PIL import Image

    from stair_search.images import to_rgb
    from stair_search.train.trainer import head_inputs

    model = create_model("stair-lite", device="cpu").eval()
    pixels = torch.stack([model.preprocess(to_rgb(Image.open(path))) for path, _ in pairs[:4]])
    cached = head_inputs(model, model.tower.stem(pixels)).to("cpu")
    with torch.inference_mode():
        direct = model.encode_image(pixels)
        sparse, _ = model.image_sparse(model.image_head(cached.tokens), cached.features)
    assert cached.tokens.shape[:2] == (4, 5) and cached.dense.shape == direct.dense.shape
    assert torch.allclose(cached.dense, direct.dense, atol=1e-4)
    assert (sparse - direct.sparse).abs().max() < 0.02  # fp16 rounding of the cached tokens
    assert (direct.sparse > 0).sum() > 0


def test_the_word_loss_without_heads_only_is_refused_before_any_work(pairs, tiny_config_path, tmp_path):
    config = TrainConfig(model=str(tiny_config_path), epochs=(1, 0, 0), batch_size=12, device="cpu", words=1.0)
    with pytest.raises(ValueError, match="add --heads-only or drop --words"):
        train(pairs, tmp_path / "run", config)
    assert not (tmp_path / "run").exists()


def test_caption_words_are_the_first_whole_piece_of_each_content_word():
    from stair_search.train.trainer import caption_words

    model = create_model("stair-lite", device="cpu")
    rows = caption_words(model, ["a red circle on the beach", "the of and"])
    tokens = {model.vocabulary.tokens[int(model.image_head.token_ids[r])] for r in rows[0]}
    assert tokens == {"red", "circle", "beach"}
    assert len(rows[1]) == 0
