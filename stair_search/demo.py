"""The README's main job: index real emoji images with the embedded default model and search them."""

from __future__ import annotations

import time
from pathlib import Path

from PIL import Image

DEMO_QUERIES = ("dog", "red heart", "smiling face with tears", "flag")


def pick_evenly(items: list, limit: int) -> list:
    """``limit`` items spread over the whole (sorted) list, so every emoji group is represented."""
    if limit >= len(items):
        return list(items)
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def run_demo(out: Path, model: str = "stair-tiny", limit: int = 400, styles: tuple[str, ...] = ("google",)) -> None:
    from stair_search.data.emoji import load_emoji
    from stair_search.encode import Encoder
    from stair_search.index.store import FeatureRecord
    from stair_search.index.writer import IndexWriter
    from stair_search.search import open_router, print_response

    started = time.perf_counter()
    records = pick_evenly(load_emoji(styles), limit)
    print(f"Fetched emoji data: indexing {len(records)} real images ({', '.join(styles)} style)")
    encoder = Encoder(model)
    writer = IndexWriter(out, encoder, overwrite=True)
    for start in range(0, len(records), encoder.batch_size):
        batch = records[start : start + encoder.batch_size]
        images = [Image.open(r.path) for r in batch]
        features = [FeatureRecord(id=r.id, source=str(r.path), width=im.width, height=im.height,
                                  caption=r.label, metadata={"tags": r.tags, "group": r.group})
                    for r, im in zip(batch, images, strict=True)]
        writer.add(features, encoder.encode_images(images))
    manifest = writer.close()
    print(f"Index at {out}: {manifest.count} documents, model {manifest.model['name']} "
          f"({manifest.model['fingerprint'][:12]}), built in {time.perf_counter() - started:.1f} s")

    router = open_router(out, model)
    for query in DEMO_QUERIES:
        print_response(router.search(text=query, mode="hybrid", k=5, explain=True), explain=True,
                       title=f"text query '{query}' (hybrid, RRF)")
    example = records[len(records) // 3]
    with Image.open(example.path) as image:
        print_response(router.search(image=image, mode="dense", k=5),
                       title=f"image query: {example.label} ({example.id})")
    print(f"\nSearch it yourself: stair-search search {out} \"party\" --explain")
