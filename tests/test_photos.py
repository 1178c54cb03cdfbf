"""The real sample photos the demo indexes beside the emoji, and their query set."""

from __future__ import annotations

from PIL import Image

from stair_search.data.photos import PHOTOS, copy_photos


def test_sample_photos_are_real_photos_with_one_query_each(tmp_path):
    records = copy_photos(tmp_path / "photos")
    assert len(records) == len(PHOTOS) >= 10
    assert len({r["id"] for r in records}) == len(records) and all(r["id"].startswith("photo/") for r in records)
    for record in records:
        with Image.open(record["image_path"]) as image:
            assert min(image.size) >= 256  # photographs, not icons
    assert len({p.query for p in PHOTOS}) == len(PHOTOS)
    again = copy_photos(tmp_path / "photos")  # idempotent: the copies are kept
    assert [r["image_path"] for r in again] == [r["image_path"] for r in records]
