"""Real photos from a package: scikit-image's sample images, for the demo index and the photo benchmark.

Icons and emoji are drawings; a user's collection is photos. scikit-image ships a few real photographs (a cat,
a cup of coffee, a rocket, a motorcycle, ...) under permissive licences, so the demo and the benchmark can show
photo queries with nothing downloaded. The queries below were written before any result was looked at: one
description per photo, as a user would type it. One more photo is kept out of the index on purpose, as the demo's
example-image query.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path


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
