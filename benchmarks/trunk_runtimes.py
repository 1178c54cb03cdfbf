"""The CNN image trunk's CPU runtimes side by side: eager torch, the folded torch copy, ONNX Runtime.

Why: the image trunk is most of a CNN model's indexing time (about 70% for stair-lite-2), and the Encoder picks
its runtime (``RUNTIMES`` in models/runtime.py, fastest first). This measures the whole image encode (trunk,
heads, prior, local features) through each, rounds alternating so a slow spell of a shared machine hits them alike,
and prints medians, each runtime against eager, and the largest difference of its dense vectors from eager's.

    python benchmarks/trunk_runtimes.py [--model stair-lite-2] [--images 256] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from stair_search.encode import Encoder
from stair_search.models import DEFAULT_MODEL
from stair_search.models.runtime import RUNTIMES


def images_per_second(encoder: Encoder, pixels: torch.Tensor) -> float:
    start = time.perf_counter()
    encoder.encode_pixels(pixels)
    return len(pixels) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    eager = Encoder(args.model, batch_size=args.batch_size, accelerate=False)
    encoders = {"eager torch": eager}
    for runtime in RUNTIMES:
        encoder = Encoder(eager.model, batch_size=args.batch_size, runtimes=(runtime,))
        encoder.warm()
        if not encoder.accelerated:
            print(f"{runtime}: not available for {args.model} here")
            continue
        encoders[runtime] = encoder
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model}, {args.images} images, "
          f"batch {args.batch_size}")
    pixels = torch.randn(args.images, 3, *eager.model.tower.image_size, generator=torch.Generator().manual_seed(0))
    reference = eager.encode_pixels(pixels[: 2 * args.batch_size]).dense
    rates: dict[str, list[float]] = {name: [] for name in encoders}
    differences = {}
    for name, encoder in encoders.items():  # warm-up (allocations, lazy init) and the accuracy check
        differences[name] = float(np.abs(encoder.encode_pixels(pixels[: 2 * args.batch_size]).dense - reference).max())
    for _ in range(args.repeats):
        for name, encoder in encoders.items():
            rates[name].append(images_per_second(encoder, pixels))
    base = statistics.median(rates["eager torch"])
    print(f"\nmedians of {args.repeats} alternating rounds\n")
    print("| runtime | images/s | vs eager | max dense difference from eager |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {differences[name]:.1e} |")


if __name__ == "__main__":
    main()
