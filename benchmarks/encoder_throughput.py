"""Encoder throughput on this machine: images/s and texts/s for several models, measured in one run.

Images are pre-processed tensors (model forward + sparse head + local-feature selection, no decoding), so
this is the bare encoder speed that the indexing pipeline is compared against.

    python benchmarks/encoder_throughput.py [--models stair-tiny ViT-S-32] [--images 256] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from stair_search.encode import Encoder

TEXTS = ["a dog running on the beach", "red heart", "two people riding bicycles in the rain at night",
         "flag", "a bowl of ramen with chopsticks", "smiling face with tears of joy", "rocket", "snow"]


def rate(fn, items: int, repeats: int = 2) -> float:
    fn()  # warm-up (allocations, lazy init)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["stair-tiny", "stair-lite", "ViT-S-32"])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--texts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    rows = []
    for name in args.models:
        encoder = Encoder(name, batch_size=args.batch_size)
        pixels = torch.randn(args.images, 3, *encoder.model.image_size)
        texts = (TEXTS * (args.texts // len(TEXTS) + 1))[: args.texts]
        params = sum(p.numel() for p in encoder.model.parameters()) / 1e6
        rows.append((name, params, rate(lambda e=encoder, p=pixels: e.encode_pixels(p), args.images),
                     rate(lambda e=encoder, t=texts: e.encode_texts(t), args.texts)))
    base = rows[0][2]
    print(f"\n| model | params (M) | images/s | texts/s | images/s vs {rows[0][0]} |")
    print("|---|---|---|---|---|")
    for name, params, images, texts in rows:
        print(f"| {name} | {params:.1f} | {images:.1f} | {texts:.1f} | {images / base:.2f}x |")


if __name__ == "__main__":
    main()
