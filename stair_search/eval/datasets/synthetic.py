"""A synthetic compositional set: two coloured shapes in a spatial relation, each with a hard negative.

Why: a bag-of-words retriever (and CLIP, often) cannot tell "a red circle left of a blue square" from "a blue
circle left of a red square" or "a red circle right of a blue square": the same words, the same objects. Such
pairs are the test of a compositional reranker (ComCLIP) and training data that rewards word order.

Each example is a scene ``(subject colour, subject shape, relation, object colour, object shape)`` with two
different colours and two different shapes, drawn on a white canvas. Its negative is the same drawing with
one change that makes the caption false:

* ``attribute``: the two shapes trade colours ("a blue circle left of a red square"), positions unchanged;
* ``relation``: the two shapes trade places ("a red circle right of a blue square"), colours unchanged.

Kinds alternate (even index: attribute, odd: relation), so any ``n`` is balanced. The positive and its negative
share the same random jitter, so the swapped property is the only difference. Everything comes from
``random.Random(seed)``: the same ``(n, seed, size)`` gives the same pixels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
RELATIONS = tuple(OPPOSITE)
KINDS = ("attribute", "relation")
BACKGROUND = (255, 255, 255)
MIN_SIZE = 16


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Scene:
    """What one image shows: ``subject`` is ``relation`` the ``object`` (e.g. left of it)."""

    subject_colour: str
    subject_shape: str
    relation: str
    object_colour: str
    object_shape: str

    @property
    def caption(self) -> str:
        return (f"{_article(self.subject_colour)} {self.subject_colour} {self.subject_shape} {self.relation} "
                f"{_article(self.object_colour)} {self.object_colour} {self.object_shape}")

    def colours_swapped(self) -> Scene:
        return Scene(self.object_colour, self.subject_shape, self.relation, self.subject_colour, self.object_shape)

    def sides_swapped(self) -> Scene:
        return Scene(self.subject_colour, self.subject_shape, OPPOSITE[self.relation], self.object_colour,
                     self.object_shape)


@dataclass
class CompositionalExample:
    image: Image.Image  # RGB; ``caption`` is true for it
    caption: str
    negative_image: Image.Image  # RGB; ``caption`` is false for it, ``negative_caption`` true
    negative_caption: str
    kind: str  # "attribute" | "relation": what the negative swapped


@dataclass(frozen=True)
class _Jitter:
    """Small random offsets (fractions of the canvas) shared by an example and its negative."""

    along: float  # moves both shapes along the relation axis
    across: float  # moves both shapes across it
    radius: float  # half the shape size


def _centres(relation: str, jitter: _Jitter, size: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """Pixel centres of (subject, object): the subject on the side the relation names."""
    first, second = (0.27 + jitter.along) * size, (0.73 + jitter.along) * size
    across = (0.5 + jitter.across) * size
    if relation == "left of":
        return (first, across), (second, across)
    if relation == "right of":
        return (second, across), (first, across)
    if relation == "above":
        return (across, first), (across, second)
    return (across, second), (across, first)  # below


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, centre: tuple[float, float], radius: float,
                colour: tuple[int, int, int]) -> None:
    x, y = centre
    if shape == "circle":
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)
    elif shape == "square":
        side = radius * 0.9  # a square looks bigger than a circle of the same width
        draw.rectangle((x - side, y - side, x + side, y + side), fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - radius), (x + radius, y + radius * 0.8), (x - radius, y + radius * 0.8)], fill=colour)
    elif shape == "diamond":
        draw.polygon([(x, y - radius), (x + radius, y), (x, y + radius), (x - radius, y)], fill=colour)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int = 64, jitter: _Jitter | None = None) -> Image.Image:
    """Draw ``scene`` on a white ``size`` x ``size`` RGB canvas."""
    jitter = jitter or _Jitter(0.0, 0.0, 0.16)
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    subject_at, object_at = _centres(scene.relation, jitter, size)
    radius = jitter.radius * size
    _draw_shape(draw, scene.subject_shape, subject_at, radius, COLOURS[scene.subject_colour])
    _draw_shape(draw, scene.object_shape, object_at, radius, COLOURS[scene.object_colour])
    return image


def _random_scene(rng: random.Random) -> Scene:
    subject_colour, object_colour = rng.sample(sorted(COLOURS), 2)
    subject_shape, object_shape = rng.sample(SHAPES, 2)
    return Scene(subject_colour, subject_shape, rng.choice(RELATIONS), object_colour, object_shape)


def _random_jitter(rng: random.Random) -> _Jitter:
    # Offsets small enough that the shapes never overlap nor leave the canvas (radius <= 0.18, gap 0.46).
    return _Jitter(along=rng.uniform(-0.05, 0.05), across=rng.uniform(-0.12, 0.12), radius=rng.uniform(0.13, 0.18))


def make_compositional(n: int, seed: int = 0, size: int = 64) -> list[CompositionalExample]:
    """``n`` examples with hard negatives, half ``attribute`` and half ``relation``, deterministic for ``seed``."""
    if n < 0:
        raise ValueError(f"n must be 0 or more, got {n}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} pixels for the shapes to be recognisable, got {size}")
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        scene, jitter, kind = _random_scene(rng), _random_jitter(rng), KINDS[i % 2]
        negative = scene.colours_swapped() if kind == "attribute" else scene.sides_swapped()
        examples.append(CompositionalExample(
            image=render(scene, size, jitter), caption=scene.caption,
            negative_image=render(negative, size, jitter), negative_caption=negative.caption, kind=kind,
        ))
    return examples


def write_compositional(out_dir: str | Path, n: int, seed: int = 0, size: int = 64) -> Path:
    """Write ``n`` examples as PNGs plus ``compositional.parquet``; return the parquet path.

    Columns: ``id``, ``image_path``, ``caption``, ``negative_image_path``, ``negative_caption``, ``kind``; paths
    are absolute, so the table can be read from any working directory (training, benchmarks, the indexer).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir = Path(out_dir).resolve()
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, example in enumerate(make_compositional(n, seed, size)):
        positive, negative = image_dir / f"{i:06d}.png", image_dir / f"{i:06d}-negative.png"
        example.image.save(positive)
        example.negative_image.save(negative)
        rows.append({"id": f"compositional/{i:06d}", "image_path": str(positive), "caption": example.caption,
                     "negative_image_path": str(negative), "negative_caption": example.negative_caption,
                     "kind": example.kind})
    schema = pa.schema([(name, pa.string()) for name in
                        ("id", "image_path", "caption", "negative_image_path", "negative_caption", "kind")])
    path = out_dir / "compositional.parquet"
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path
