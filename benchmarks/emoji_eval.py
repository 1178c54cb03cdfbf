"""The model card's figures: each route on the emoji test split, per style and with both styles in one index,
for several models side by side in one run, plus the sparsity of the vectors and the model issue's targets.

For each setting (google alone, twitter alone, both in one index) the test split (concepts never seen in
training) is indexed with each model, and every route is evaluated through the public search API on the split's
label queries (known item: R@1) and tag queries (all emojis carrying the tag: nDCG@10).

    python benchmarks/emoji_eval.py [--models stair-tiny stair-lite-4 stair-lite-5] [--data DIR] [--out DIR]

Prints one markdown table per model, setting and query kind; then a side-by-side summary (dense and sparse label
R@1, tag nDCG@10 of every route) and, for the last model against the first, the targets: dense label R@1 ratio,
sparse >= dense label R@1, hybrid tag nDCG@10 >= best single route + 2, label queries with an empty sparse vector.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from stair_search.cli.demo import index_split, open_dataset
from stair_search.eval.runner import evaluate
from stair_search.paths import data_dir

HYBRIDS = ("hybrid-rrf", "hybrid-convex", "auto")


def sparsity(dataset, split: str, index_dir: Path, model: str) -> tuple[float, float, int]:
    """Mean non-zeros per image (read from the index's stored vectors, not encoded again), per query over the
    split's label + tag queries, and the number of label queries whose sparse vector is empty."""
    from stair_search.encode import Encoder
    from stair_search.index import IndexReader

    per_image = IndexReader(index_dir).nonzeros_per_document()
    encoder = Encoder(model)
    labels = list(dataset.queries(split, "label").values())
    label_vectors = encoder.encode_texts(labels).sparse
    tag_vectors = encoder.encode_texts(list(dataset.queries(split, "tag").values())).sparse
    per_query = np.mean([len(v) for v in [*label_vectors, *tag_vectors]])
    return float(per_image), float(per_query), sum(not v for v in label_vectors)


def settings(styles: tuple[str, ...]) -> list[tuple[str, list[str]]]:
    return [(style, [style]) for style in styles] + [("+".join(styles), list(styles))]


def run_model(dataset, model: str, split: str, out: Path) -> dict[tuple[str, str], dict[str, dict[str, float]]]:
    """{(setting, kind): {route: metrics}} for one model, printing each table as it comes."""
    results = {}
    for name, styles in settings(dataset.styles):
        index_dir = out / f"{model.replace('/', '_')}-{split}-{name}"
        index_split(dataset, split, index_dir, model, styles)
        qrels_style = styles[0] if len(styles) == 1 else "all"
        for kind in ("label", "tag"):
            report = evaluate(index_dir, dataset.queries(split, kind), dataset.qrels(split, kind, qrels_style),
                              model=model)
            report.title = f"{model}: {name}, {split} split, {kind} queries ({report.queries})"
            print(report.to_markdown(), "\n", flush=True)
            results[(name, kind)] = {row.config: row.metrics for row in report.rows}
        per_image, per_query, empty = sparsity(dataset, split, index_dir, model)
        print(f"{model} {name}: mean non-zeros per image {per_image:.1f}, per query {per_query:.1f}, "
              f"label queries with an empty sparse vector: {empty}\n", flush=True)
        results[(name, "sparsity")] = {"empty": {"label": empty}}
    return results


def hybrid_lift(tag: dict[str, dict[str, float]]) -> float:
    """Best hybrid route's tag nDCG@10 minus the best single route's."""
    single = max(tag["sparse"]["nDCG@10"], tag["dense"]["nDCG@10"])
    return max(tag[h]["nDCG@10"] for h in HYBRIDS if h in tag) - single


def summary(models: list[str], results: dict[str, dict], setting_names: list[str]) -> None:
    print("| setting | model | label R@1 sparse | dense | best | tag nDCG@10 sparse | dense | hybrid-rrf "
          "| hybrid-convex | auto | tag: best hybrid - best single |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in setting_names:
        for model in models:
            label, tag = results[model][(name, "label")], results[model][(name, "tag")]
            best_label = max(m["R@1"] for m in label.values())
            lift = hybrid_lift(tag)
            print(f"| {name} | {model} | {100 * label['sparse']['R@1']:.1f} | {100 * label['dense']['R@1']:.1f} "
                  f"| {100 * best_label:.1f} | {100 * tag['sparse']['nDCG@10']:.1f} "
                  f"| {100 * tag['dense']['nDCG@10']:.1f} | "
                  + " | ".join(f"{100 * tag[h]['nDCG@10']:.1f}" for h in HYBRIDS)
                  + f" | {100 * lift:+.1f} |")
    if len(models) < 2:
        return
    base, new = models[0], models[-1]
    print(f"\nTargets ({new} against {base}):")
    for name in setting_names:
        old_label, label = results[base][(name, "label")], results[new][(name, "label")]
        tag = results[new][(name, "tag")]
        ratio = label["dense"]["R@1"] / max(old_label["dense"]["R@1"], 1e-9)
        lift = hybrid_lift(tag)
        empty = results[new][(name, "sparsity")]["empty"]["label"]
        print(f"- {name}: dense label R@1 {ratio:.2f}x {base}'s (target >= 2.5); sparse label R@1 "
              f"{100 * label['sparse']['R@1']:.1f} vs dense {100 * label['dense']['R@1']:.1f} (target sparse >= "
              f"dense); best hybrid tag nDCG@10 {100 * lift:+.1f} over the best single route "
              f"(target >= +2); label queries with an empty sparse vector: {empty} (target 0)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["stair-tiny", "stair-lite-4", "stair-lite-5"])
    parser.add_argument("--data", type=Path, default=None, help="emoji data set folder (built when missing)")
    parser.add_argument("--out", type=Path, default=None, help="where to write the indexes")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    dataset = open_dataset(args.data or data_dir() / "emoji-set")
    out = args.out or Path(tempfile.mkdtemp(prefix="emoji-eval-"))
    results = {model: run_model(dataset, model, args.split, out) for model in args.models}
    summary(args.models, results, [name for name, _ in settings(dataset.styles)])


if __name__ == "__main__":
    main()
