"""Real photos from a package: scikit-image's sample images, for the demo index and the photo benchmarks.

Icons and emoji are drawings; a user's collection is photos. scikit-image ships a few real photographs (a cat,
a cup of coffee, a rocket, a motorcycle, ...) under permissive licences, so the demo and the benchmark can show
photo queries with nothing downloaded. The queries below were written before any result was looked at: one
description per photo, as a user would type it. One more photo is kept out of the index on purpose, as the demo's
example-image query.

A user's library is not 512-pixel PNGs but 12-megapixel camera JPEGs of several megabytes. :func:`camera_photo`
makes one from a sample photo (scaled up, with a camera's fine sensor grain so that it compresses, and costs to
decode, like a real one: ~4.5 MB at quality 90 for 4000x3000), and :func:`camera_exif` the EXIF a camera writes,
so that the photo-library tests and ``benchmarks/photo_indexing.py`` run on files like a phone's without
downloading any.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class Photo:
    file: str  # name in skimage/data
    query: str  # what a user looking for this photo would type
    caption: str  # shown in results


PHOTOS = (
    Photo("astronaut.png", "astronaut in a space suit", "astronaut Eileen Collins (NASA)"),
    Photo("camera.png", "man with a camera on a tripod", "cameraman (black and white)"),
    Photo("chelsea.png", "tabby cat", "Chelsea the cat"),
    Photo("coffee.png", "cup of coffee", "a cup of coffee"),
    Photo("coins.png", "old coins", "Greek coins (black and white)"),
    Photo("hubble_deep_field.jpg", "galaxies in deep space", "Hubble deep field (NASA)"),
    Photo("moon.png", "surface of the moon", "lunar surface (black and white)"),
    Photo("motorcycle_left.png", "motorcycle", "a motorcycle"),
    Photo("rocket.jpg", "rocket on the launch pad", "Falcon 9 rocket (SpaceX)"),
    Photo("brick.png", "brick wall", "brick wall (black and white)"),
    Photo("grass.png", "green grass", "grass (black and white)"),
    Photo("gravel.png", "gravel", "gravel (black and white)"),
    Photo("retina.jpg", "retina of an eye", "human retina (fundus photo)"),
)


@dataclass(frozen=True)
class ExampleQuery:
    file: str  # a sample image that is not indexed, searched by example
    finds: str  # the indexed photo (a PHOTOS file) of the same thing: what the search should put first


# The right camera of scikit-image's motorcycle stereo pair, whose left image is indexed: the photo an example-image
# search should find is known without looking at any result.
EXAMPLE_QUERY = ExampleQuery("motorcycle_right.png", "motorcycle_left.png")


def photo_id(photo: Photo) -> str:
    return f"photo/{Path(photo.file).stem}"


def sample_dir() -> Path:
    """scikit-image's folder of sample images (the photos, the example query, the concept bank's reference)."""
    try:
        import skimage
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("The sample photos come from scikit-image: pip install scikit-image") from exc
    return Path(skimage.__file__).parent / "data"


def copy_photos(dest: Path) -> list[dict[str, object]]:
    """Copy the photos into ``dest`` and return index records (the emoji records' columns: id, image_path,
    label, tags, group, style), so that they can be indexed beside the emoji."""
    source = sample_dir()
    dest.mkdir(parents=True, exist_ok=True)
    records = []
    for photo in PHOTOS:
        target = dest / photo.file
        if not target.is_file():
            shutil.copyfile(source / photo.file, target)
        records.append({"id": photo_id(photo), "image_path": str(target), "label": photo.caption, "tags": [],
                        "group": "Photos", "style": "photo"})
    return records


CAMERA_SIZE = (4000, 3000)  # 12 megapixels, 4:3: what a phone or a compact camera writes
GRAIN_TILE = 256  # the sensor grain is one tile of noise repeated (drawing 36 M random numbers per photo is slow)
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825


def camera_photo(file: str, size: tuple[int, int] = CAMERA_SIZE, grain: float = 13.0, seed: int = 0) -> Image.Image:
    """Sample photo ``file`` (a name in skimage/data) scaled up to ``size`` with sensor grain of ``grain`` grey
    levels (0: none; a smooth upscale compresses to a quarter of a camera's bytes and decodes faster)."""
    with Image.open(sample_dir() / file) as source:
        image = source.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    if not grain:
        return image
    noise = np.random.default_rng(seed).normal(0.0, grain, (GRAIN_TILE, GRAIN_TILE, 3)).astype(np.int16)
    reps = (-(-size[1] // GRAIN_TILE), -(-size[0] // GRAIN_TILE), 1)
    pixels = np.asarray(image, dtype=np.int16) + np.tile(noise, reps)[: size[1], : size[0]]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def camera_exif(taken: str | None = None, offset: str | None = None, make: str | None = None,
                model: str | None = None, latitude: float | None = None, longitude: float | None = None,
                orientation: int | None = None) -> Image.Exif:
    """The EXIF a camera writes: ``taken`` as ``YYYY:MM:DD HH:MM:SS`` (DateTimeOriginal) with its ``offset``
    (``+02:00``), make and model, a GPS position in degrees, minutes and seconds, the orientation tag."""
    exif = Image.Exif()
    for tag, value in ((0x010F, make), (0x0110, model), (0x0112, orientation)):
        if value is not None:
            exif[tag] = value
    sub = exif.get_ifd(_EXIF_IFD)
    for tag, value in ((0x9003, taken), (0x9011, offset)):
        if value is not None:
            sub[tag] = value
    if latitude is not None and longitude is not None:
        gps = exif.get_ifd(_GPS_IFD)
        gps.update({1: "N" if latitude >= 0 else "S", 2: _dms(latitude), 3: "E" if longitude >= 0 else "W",
                    4: _dms(longitude)})
    return exif


def _dms(degrees: float) -> tuple[float, float, float]:
    """Decimal degrees -> EXIF's (degrees, minutes, seconds), unsigned (the sign is the N/S or E/W reference)."""
    degrees = abs(degrees)
    whole, minutes = int(degrees), (abs(degrees) - int(degrees)) * 60
    return float(whole), float(int(minutes)), round((minutes - int(minutes)) * 60, 4)
