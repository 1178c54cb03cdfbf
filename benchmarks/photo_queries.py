"""Real photos among drawings: the rank of each photo for the query written for it, per model and route.

scikit-image's sample photos (stair_search.data.photos, queries written before any result was seen) are indexed
beside the emoji test split (both styles, 768 drawings), and each photo's query is searched through the public
router; the table gives the photo's rank (1 = first; "-" = not in the top 100).

    python benchmarks/photo_queries.py [--models stair-tiny stair-lite-4 stair-lite-5] [--out DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from stair_search.cli.demo import index_split, open_dataset
from stair_search.data.photos import PHOTOS, photo_id
from stair_search.paths import data_dir
from stair_search.retrieve import SearchRequest, open_router

ROUTES = ("sparse", "dense", "hybrid", "auto")
DEPTH = 100


def ranks(router, query: str, target: str) -> dict[str, int | None]:
    found = {}
    for mode in ROUTES:
        hits = router.search(SearchRequest(text=query, mode=mode, k=DEPTH)).hits
        ids = [hit.id for hit in hits]
        found[mode] = ids.index(target) + 1 if target in ids else None
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["stair-tiny", "stair-lite-4", "stair-lite-5"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    dataset = open_dataset(data_dir() / "emoji-set")
    out = args.out or Path(tempfile.mkdtemp(prefix="photo-queries-"))
    table: dict[str, dict[str, dict[str, int | None]]] = {}
    for model in args.models:
        index_dir = out / model.replace("/", "_")
        index_split(dataset, "test", index_dir, model, photos=True)
        router = open_router(index_dir, model)
        table[model] = {photo.file: ranks(router, photo.query, photo_id(photo)) for photo in PHOTOS}
    header = " | ".join(f"{model} {mode}" for model in args.models for mode in ROUTES)
    print(f"| photo | query | {header} |")
    print("|---|---|" + "---:|" * (len(args.models) * len(ROUTES)))
    for photo in PHOTOS:
        cells = " | ".join(str(table[m][photo.file][mode] or "-") for m in args.models for mode in ROUTES)
        print(f"| {photo.file} | {photo.query} | {cells} |")
    for model in args.models:
        for mode in ROUTES:
            firsts = sum(table[model][p.file][mode] == 1 for p in PHOTOS)
            print(f"{model} {mode}: first for {firsts} of {len(PHOTOS)} queries")


if __name__ == "__main__":
    main()
