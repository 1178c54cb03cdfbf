"""The README's main job: build the emoji data set, index its test split with the embedded default model,
search it, and evaluate every route on the split's label and tag queries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from stair_search import DEFAULT_MODEL

DEMO_QUERIES = ("dog", "red heart", "smiling face", "flag", "tabby cat", "cup of coffee")


def open_dataset(folder: Path | None = None):
    """The emoji data set under the data cache, built on first use (npm packages fetched once)."""
    from stair_search.eval.datasets.emoji import EmojiDataset, build_emoji_dataset
    from stair_search.paths import data_dir

    folder = folder or data_dir() / "emoji-set"
    try:
        return EmojiDataset(folder)
    except FileNotFoundError:
        return build_emoji_dataset(folder)


def index_split(dataset, split: str, out: Path, model: str, styles: Sequence[str] | None = None,
                photos: bool = False, encoder=None):
    """Index one split of the emoji data set with the public indexing job: ids are the records' ids (the ones
    the qrels name), captions their CLDR labels, metadata their tags, group and style. ``photos`` adds
    scikit-image's real sample photos (``photo/<name>`` ids, group "Photos"); ``encoder``: an Encoder to index
    with instead of loading ``model``. Captions and tags are in the text route (the demo finds "Lesotho" by its
    caption); the evaluation's ``auto`` leaves that route out (``eval/runner.py``), since the captions are the
    very labels the label queries ask for."""
    import indexer
    from indexer.sources import SourceOptions

    options = SourceOptions(id_column="id", path_column="image_path", caption_column="label",
                            metadata_columns=("tags", "group", "style"))
    split_file = dataset.write_split(split, styles)
    if photos:
        split_file = _with_photos(split_file, dataset.root / "photos")
    job = indexer.IndexJob(split_file, out, model=model, options=options, overwrite=True,
                           text_fields=("caption", "tags"))
    return indexer.run(job, progress=False, encoder=encoder)


def _with_photos(split_file: Path, photo_dir: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stair_search.data.photos import copy_photos

    table = pq.read_table(split_file)
    rows = table.to_pylist() + [{name: record.get(name) for name in table.column_names}
                                for record in copy_photos(photo_dir)]
    target = split_file.with_suffix(".photos.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), target)
    return target


def run_demo(out: Path, model: str = DEFAULT_MODEL, split: str = "test") -> None:
    from PIL import Image

    from stair_search.cli.printing import print_response
    from stair_search.data.photos import EXAMPLE_QUERY, sample_dir
    from stair_search.eval.runner import evaluate
    from stair_search.retrieve import SearchRequest, open_router

    started = time.perf_counter()
    dataset = open_dataset()
    print(f"Emoji data set at {dataset.root}: indexing the {len(dataset.records(split))} images of its '{split}' "
          f"split (concepts never seen in training) and scikit-image's real sample photos")
    summary = index_split(dataset, split, out, model, photos=True)
    print(f"Index at {out}: {summary.describe()}; built in {time.perf_counter() - started:.1f} s")
    router = open_router(out, model)
    for query in DEMO_QUERIES:
        print_response(router.search(SearchRequest(text=query, mode="hybrid", k=5, explain=True)), explain=True,
                       title=f"text query '{query}' (hybrid, RRF)")
    with Image.open(sample_dir() / EXAMPLE_QUERY.file) as example:
        response = router.search(SearchRequest(image=example, k=5, explain=True))
    print_response(response, explain=True, title=f"example-image query {EXAMPLE_QUERY.file}, a photo not in the "
                                                 f"index ({response.mode})")
    for kind in ("label", "tag"):
        report = evaluate(out, dataset.queries(split, kind), dataset.qrels(split, kind, "all"), model=model)
        print(f"\n{kind} queries ({report.queries}) on the {split} split, both styles:\n{report.to_markdown()}")
    print(f"\nSearch it yourself: stair-search search {out} \"party\" --explain   or serve it: "
          f"stair-search serve {out}")
