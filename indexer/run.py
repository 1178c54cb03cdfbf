"""``run``: index a folder of images (same options as ``stair-search index``).

This first version decodes in the calling process; worker processes, resume and the other sources
(parquet, webdataset, lists) build on the same IndexWriter.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from stair_search.encode import Encoder
from stair_search.index.dense import DenseSpec
from stair_search.index.manifest import Manifest
from stair_search.index.store import FeatureRecord
from stair_search.index.writer import IndexWriter

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive, by extension), sorted so runs are reproducible."""
    if not folder.is_dir():
        raise FileNotFoundError(f"Image folder '{folder}' does not exist.")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _batches(paths: list[Path], root: Path, size: int) -> Iterator[tuple[list[FeatureRecord], list[Image.Image]]]:
    for start in range(0, len(paths), size):
        records, images = [], []
        for path in paths[start : start + size]:
            with Image.open(path) as image:
                image.load()
                records.append(FeatureRecord(id=path.relative_to(root).as_posix(), source=str(path.resolve()),
                                             width=image.width, height=image.height))
                images.append(image.copy())
        yield records, images


def run(source: str | Path, out: str | Path, model: str = "stair-tiny", pretrained: str | None = None,
        batch_size: int = 32, shard_size: int = 100_000, dense: str | None = None, append: bool = False,
        overwrite: bool = False, device: str | None = None, encoder: Encoder | None = None) -> Manifest:
    """Index every image under ``source`` into the index directory ``out``."""
    root = Path(source)
    paths = image_files(root)
    if not paths:
        raise ValueError(f"No images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under '{root}'.")
    encoder = encoder or Encoder(model, batch_size=batch_size, device=device, pretrained=pretrained)
    writer = IndexWriter(out, encoder, shard_size=shard_size, dense_spec=DenseSpec(dense) if dense else None,
                         append=append, overwrite=overwrite)
    try:
        for records, images in _batches(paths, root, batch_size):
            writer.add(records, encoder.encode_images(images))
        return writer.close()
    except BaseException:
        writer.abort()
        raise
