"""Where sparse vectors come from, side by side on one pretrained dual encoder: training-free concept vectors,
fully trained STAIR heads, random heads, and the dense route, on the emoji test split.

stair-lite's dense towers stand for a foreign pretrained CLIP (issue: "Sparse vectors that mean something for
any pretrained CLIP"): the same dense embeddings in every index, only the sparse vectors differ:
- ``concepts``: training-free (stair_search/models/concepts.py), calibrated on the default reference photos;
- ``trained heads``: stair-lite's own STAIR heads (trained on the corpus);
- ``random heads``: the same heads re-initialised (seeded), what an open_clip model would get without them;
- ``heads-only``: those random heads trained by ``stair-search train --heads-only`` on a seeded sample of the
  training corpus (``--pairs``), towers and dense space frozen (skipped without ``--pairs``).
Label queries are known-item (R@1), tag queries have 3-50 relevant images (nDCG@10); metrics in %.

    python benchmarks/sparse_sources.py [--settings google google+twitter] [--out DIR]
        [--pairs corpus/splits/train.parquet --sample 18126 --epochs 5 --words 1 --lr 2e-3 --batch-size 128
         --val emoji/splits/val.google-twitter.parquet] [--heads-only-model RUN/model.pt]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from stair_search.cli.demo import index_split, open_dataset
from stair_search.encode import Encoder
from stair_search.eval.runner import evaluate_router
from stair_search.index import IndexReader
from stair_search.models import create_model
from stair_search.paths import data_dir
from stair_search.retrieve import QueryRouter

SOURCES = ("concepts", "trained heads", "random heads", "heads-only")


def encoder_for(source: str, heads_only: Path | None = None) -> Encoder:
    if source == "heads-only":
        return Encoder(str(heads_only))
    model = create_model("stair-lite")
    if source == "concepts":
        model.sparse_source = "concepts"
    elif source == "random heads":
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for head in (model.image_head, model.text_head):
                for module in head.transform.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
                        module.bias.zero_()
                head.bias.fill_(-2.0)
    return Encoder(model)


def train_heads_only(pairs_file: Path, val_file: Path | None, sample: int, epochs: int, out: Path,
                     **options: float) -> Path:
    """The random heads trained alone on stair-lite's frozen towers; returns the checkpoint, printing the time."""
    import time

    from stair_search.models import save_checkpoint
    from stair_search.train import TrainConfig, load_pairs, train

    start = out / "random-heads.pt"
    save_checkpoint(encoder_for("random heads").model, start, half=True)
    pairs = load_pairs(pairs_file)
    chosen = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(0))[:sample].tolist()
    config = TrainConfig(model=str(start), epochs=(epochs, 0, 0), heads_only=True, device="cpu", **options)
    began = time.perf_counter()
    result = train([pairs[i] for i in chosen], out / "heads-only", config,
                   val_pairs=load_pairs(val_file) if val_file else (),
                   on_epoch=lambda e: print(f"  epoch {e.epoch}: loss {e.loss:.3f}, val R@1 sparse {e.val_r1_sparse}, "
                                            f"{e.seconds:.0f} s", flush=True))
    print(f"heads-only: {len(chosen)} pairs, {epochs} epoch(s) in {time.perf_counter() - began:.0f} s "
          f"(stem features included): {[(e.loss, e.val_r1_sparse) for e in result.log]}", flush=True)
    return result.checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", default=["google", "google+twitter"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--pairs", type=Path, default=None, help="training pairs for the heads-only row")
    parser.add_argument("--val", type=Path, default=None)
    parser.add_argument("--sample", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--distill", type=float, default=0.0, help="heads-only: weight of distilling the dense scores")
    parser.add_argument("--words", type=float, default=1.0, help="heads-only: weight of the caption-word loss")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--heads-only-model", type=Path, default=None,
                        help="evaluate this heads-only checkpoint (trained from the seeded random heads) instead")
    parser.add_argument("--sources", nargs="+", default=list(SOURCES))
    args = parser.parse_args()
    dataset = open_dataset(data_dir() / "emoji-set")
    out = args.out or Path(tempfile.mkdtemp(prefix="sparse-sources-"))
    rows = []
    heads_only = args.heads_only_model
    if heads_only is None and args.pairs and "heads-only" in args.sources:
        heads_only = train_heads_only(args.pairs, args.val, args.sample, args.epochs, out, distill=args.distill,
                                      words=args.words, lr=args.lr, batch_size=args.batch_size)
    sources = [s for s in args.sources if s != "heads-only" or heads_only is not None]
    for setting in args.settings:
        styles = setting.split("+")
        qrels_style = styles[0] if len(styles) == 1 else "all"
        for source in sources:
            encoder = encoder_for(source, heads_only)
            index_dir = out / f"{setting}-{source.replace(' ', '-')}"
            index_split(dataset, "test", index_dir, "stair-lite", styles, encoder=encoder)
            router = QueryRouter(IndexReader(index_dir), encoder)
            found = {}
            for kind, metric in (("label", "R@1"), ("tag", "nDCG@10")):
                report = evaluate_router(router, dataset.queries("test", kind),
                                         dataset.qrels("test", kind, qrels_style), modes=("sparse", "dense"))
                for row in report.rows:
                    found[(kind, row.config)] = 100 * row.metrics[metric]
            rows.append((setting, source, found))
            print(setting, source, found, flush=True)
    print("\n| setting | sparse vectors | label R@1 sparse | dense | tag nDCG@10 sparse | dense | sparse / dense |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for setting, source, found in rows:
        ratio = found[("tag", "sparse")] / max(found[("tag", "dense")], 1e-9)
        print(f"| {setting} | {source} | {found[('label', 'sparse')]:.1f} | {found[('label', 'dense')]:.1f} | "
              f"{found[('tag', 'sparse')]:.1f} | {found[('tag', 'dense')]:.1f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
