"""The model card's figures: each route on the emoji test split, per style, plus the sparsity of the vectors.

For each style (google, twitter) the test split (concepts never seen in training) is indexed on its own with
the model, and every route is evaluated through the public search API on the split's label queries (known
item: R@1) and tag queries (all emojis carrying the tag: nDCG@10).

    python benchmarks/emoji_eval.py [--model stair-tiny] [--data DIR] [--out DIR]

Prints one markdown table per style and query kind, and the mean non-zeros per image and per query.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from stair_search.data.emoji import data_dir
from stair_search.demo import index_split, open_dataset
from stair_search.eval.runner import evaluate


def sparsity(dataset, split: str, index_dir: Path, model: str) -> tuple[float, float]:
    """Mean non-zeros per image (read from the index's stored vectors, not encoded again) and per query over
    the split's label + tag queries."""
    from stair_search.encode import Encoder
    from stair_search.index.reader import Index

    per_image = np.concatenate([np.diff(shard.sparse.indptr) for shard in Index(index_dir).shards]).mean()
    queries = [*dataset.queries(split, "label").values(), *dataset.queries(split, "tag").values()]
    per_query = np.mean([len(v) for v in Encoder(model).encode_texts(queries).sparse])
    return float(per_image), float(per_query)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stair-tiny")
    parser.add_argument("--data", type=Path, default=None, help="emoji data set folder (built when missing)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the per-style indexes")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    dataset = open_dataset(args.data or data_dir() / "emoji-set")
    out = args.out or Path(tempfile.mkdtemp(prefix="emoji-eval-"))
    for style in dataset.styles:
        index_dir = out / f"{args.split}-{style}"
        index_split(dataset, args.split, index_dir, args.model, [style])
        for kind in ("label", "tag"):
            report = evaluate(index_dir, dataset.queries(args.split, kind), dataset.qrels(args.split, kind, style),
                              model=args.model)
            report.title = f"{style}, {args.split} split, {kind} queries ({report.queries})"
            print(report.to_markdown(), "\n", flush=True)
        per_image, per_query = sparsity(dataset, args.split, index_dir, args.model)
        print(f"{style}: mean non-zeros per image {per_image:.1f}, per query {per_query:.1f}\n", flush=True)


if __name__ == "__main__":
    main()
