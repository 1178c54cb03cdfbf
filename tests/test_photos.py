"""The real sample photos the demo indexes beside the emoji, their query set, and the demo's example-image query."""

from __future__ import annotations

from PIL import Image

from indexer import IndexJob
from stair_search.data.photos import EXAMPLE_QUERY, PHOTOS, copy_photos, sample_dir
from stair_search.retrieve import SearchRequest


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


def test_the_demos_example_photo_is_not_indexed_and_finds_its_twin_first(tmp_path):
    """The demo searches by an example image that is not in its index (the other camera of an indexed stereo
    pair): through the default model and the public router, that indexed photo comes first among the photos."""
    import indexer
    from stair_search import DEFAULT_MODEL
    from stair_search.retrieve import open_router

    files = [photo.file for photo in PHOTOS]
    assert EXAMPLE_QUERY.file not in files and EXAMPLE_QUERY.finds in files
    copy_photos(tmp_path / "photos")
    indexer.run(IndexJob(tmp_path / "photos", tmp_path / "index", model=DEFAULT_MODEL, workers=0), progress=False)
    router = open_router(tmp_path / "index")
    with Image.open(sample_dir() / EXAMPLE_QUERY.file) as example:
        hits = router.search(SearchRequest(image=example, k=3)).hits
    assert hits[0].id == EXAMPLE_QUERY.finds, [hit.id for hit in hits]
    assert hits[0].score > hits[1].score
