"""Shared fixtures: tiny real models (built from JSON configs) and real images drawn by the tests."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from stair_search.data.photos import sample_dir
from stair_search.encode import Encoder
from stair_search.models import create_model

TINY_CONFIG = {
    "name": "test-tiny",
    "clip": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "image_top_k": 16,
    "text_top_k": 24,
    "num_local": 4,
    "seed": 7,
    "sparse": "heads",  # random but deterministic heads: the engine's plumbing is tested on them
}

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 210, 20)}


def sample_photo(name: str) -> Image.Image:
    """One of scikit-image's real sample photos, as RGB."""
    with Image.open(sample_dir() / name) as image:
        return image.convert("RGB")


def draw_shape(colour: str, shape: str, size: int = 64, background: str = "white") -> Image.Image:
    """A real RGB image of one coloured shape (circle, square or triangle)."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    box = (size // 5, size // 5, size * 4 // 5, size * 4 // 5)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(size // 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=fill)
    return image


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "test-tiny.json"
    path.write_text(json.dumps(TINY_CONFIG))
    return path


@pytest.fixture(scope="session")
def tiny_encoder(tiny_config_path) -> Encoder:
    return Encoder(create_model(str(tiny_config_path), device="cpu"), batch_size=4)


@pytest.fixture(scope="session")
def shape_images() -> list[Image.Image]:
    return [draw_shape(c, s) for c in COLOURS for s in ("circle", "square", "triangle")]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixel data (what a pixel flood looks like)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def save_tiny_clip(folder: Path) -> Path:
    """A config for an open_clip CLIP (the tiny test shapes) whose weights are a local open_clip checkpoint file in
    ``folder`` (no STAIR heads): what a user who brings a real CLIP checkpoint passes, in miniature."""
    import open_clip
    import torch

    weights = folder / "open_clip_model.pt"
    torch.save({"state_dict": open_clip.CLIP(**TINY_CONFIG["clip"]).state_dict()}, weights)
    config = {key: value for key, value in TINY_CONFIG.items() if key != "sparse"}
    config.update(name="tiny-clip", pretrained=str(weights))
    path = folder / "tiny-clip.json"
    path.write_text(json.dumps(config))
    return path
