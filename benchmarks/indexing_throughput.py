"""Indexing throughput: the whole job against the bare encoder, on the same images and model, in one run.

- bare encoder: model forward + sparse head + local features on pre-decoded, pre-processed tensors;
- pipeline: ``indexer.run`` on the image files: decode (worker processes) + encode + spool + shards
  (Lucene, FAISS, parquet) + publish, timed end to end after a small warm-up job (JVM and model warm);

and their ratio: how much of the encoder's speed survives the rest of the job (target >= 0.9). With several
``--models`` each is measured in turn on the same images, and the whole job's rate is also given against the
first model's (the default model's target: >= 0.5x stair-tiny's).

    python benchmarks/indexing_throughput.py [--models ViT-S-32] [--images 256] [--batch-size 32] [--workers N]
                                              [--repeats 3]

ViT-S-32 is open_clip's ViT-S class config (random weights: speed does not depend on them). The images
are 256x256 JPEGs drawn here, each a few coloured shapes, so decoding costs what a small photo costs.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import indexer
from indexer import IndexJob
from indexer.pipeline import default_workers
from stair_search.encode import Encoder


def draw_images(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` different JPEGs with a few random ellipses and rectangles each."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
            box = (x0, y0, x0 + rng.randrange(16, size // 2), y0 + rng.randrange(16, size // 2))
            colour = tuple(rng.randrange(256) for _ in range(3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
        path = folder / f"{i:06d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def bare_encoder_rate(encoder: Encoder, paths: list[Path]) -> float:
    """images/s of the model alone: every image decoded and pre-processed before the clock starts."""
    pixels = torch.stack([encoder.preprocess(Image.open(p)) for p in paths])
    encoder.encode_pixels(pixels[: encoder.batch_size])  # warm-up
    start = time.perf_counter()
    encoder.encode_pixels(pixels)
    return len(paths) / (time.perf_counter() - start)


def pipeline_rate(encoder: Encoder, folder: Path, work: Path, batch_size: int, workers: int) -> float:
    """images/s of a whole indexing job on the files, from the call to the published index."""
    start = time.perf_counter()
    summary = indexer.run(IndexJob(folder, work / "index", batch_size=batch_size, workers=workers), encoder=encoder,
                          progress=False)
    seconds = time.perf_counter() - start
    if summary.indexed != len(list(folder.iterdir())):
        raise RuntimeError(f"the job indexed {summary.indexed} images: {summary.describe()}")
    return summary.indexed / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["ViT-S-32"],
                        help="model specs (open_clip name, config JSON, checkpoint)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=256, help="side of the drawn JPEGs in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds, models alternating; medians reported")
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default min(4, cores))")
    args = parser.parse_args()
    workers = default_workers() if args.workers is None else args.workers
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.images} images of "
          f"{args.image_size} px, batch {args.batch_size}, {workers} workers")
    work = Path(tempfile.mkdtemp(prefix="indexing-bench-"))
    try:
        paths = draw_images(work / "images", args.images, args.image_size)
        draw_images(work / "warm-up", args.batch_size, args.image_size, seed=1)
        encoders = [Encoder(model, batch_size=args.batch_size) for model in args.models]
        for i, encoder in enumerate(encoders):
            pipeline_rate(encoder, work / "warm-up", work / f"warm-{i}", args.batch_size, workers)
        rates: list[list[tuple[float, float]]] = [[] for _ in encoders]
        for round_ in range(args.repeats):  # models alternate, so a slow spell of the machine hits them alike
            for i, encoder in enumerate(encoders):
                bare = bare_encoder_rate(encoder, paths)
                run = work / f"run-{round_}-{i}"
                rates[i].append((bare, pipeline_rate(encoder, work / "images", run, args.batch_size, workers)))
                shutil.rmtree(run)
        rows = [(model, statistics.median(b for b, _ in r), statistics.median(p for _, p in r))
                for model, r in zip(args.models, rates, strict=True)]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nmedians of {args.repeats} alternating rounds")
    print(f"\n| model | bare encoder images/s | pipeline images/s | pipeline / bare | pipeline vs {args.models[0]} |")
    print("|---|---|---|---|---|")
    for model, bare, pipeline in rows:
        print(f"| {model} | {bare:.1f} | {pipeline:.1f} | {pipeline / bare:.2f} | {pipeline / rows[0][2]:.2f}x |")


if __name__ == "__main__":
    main()
