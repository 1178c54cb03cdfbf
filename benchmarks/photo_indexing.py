"""A photo library's speed: the whole indexing job vs decode alone vs the bare encoder, and cold thumbnails, on
camera-sized JPEGs made here (issue 38), side by side in one run.

The photos are scikit-image's sample photos scaled up to 4000x3000 with sensor grain, saved at quality 90 with
a camera's EXIF (~4.4 MB each, what a phone writes: ``stair_search.data.photos.camera_photo``); ``--distinct``
different ones are copied to ``--images`` files (the encoder's cost does not depend on the content, the decode's
on the bytes, which the copies share).

- **decode alone**: the job's own decode workers (``DecodePool``, the default worker count) reading, decoding
  and preprocessing every file, nothing encoded: images/s reduced (DCT scaling to twice the model's input,
  what the job does) and full (every pixel, what it did before);
- **bare encoder**: the model on the decoded, preprocessed tensors, images/s;
- **whole job**: ``indexer.run`` on the folder (decode + encode + spool + shards + publish) after a warm-up job,
  images/s, and its ratio to the bound that decode and encode sharing the same cores allow,
  ``1 / (1/decode + 1/encode)`` (target >= 0.8; and >= 4x the 5.0 images/s of issue 38);
- **cold thumbnail** of a 12 MP JPEG (the server's ``make_thumbnail``, 128 px, never cached here): p50 ms, and
  the same for the way it was made before (full decode, LANCZOS, PNG) (target <= 40 ms);
- **CPU time** per image of the decode (one process, one torch thread), of the encoder (all its threads) and of
  a thumbnail (its thread): what other processes on a shared machine barely change, and the rates an idle
  machine of this many cores gives from them (``cores / CPU s``; the bound ``cores / (decode + encode CPU s)``).

    python benchmarks/photo_indexing.py [--images 240] [--distinct 12] [--model stair-lite-4] [--repeats 2]

The machine's load average is printed beside each figure: on a shared machine the rates swing with it.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image

import indexer
from indexer import IndexJob
from indexer.decode import DecodeLimits, decode
from indexer.pipeline import DecodePool, default_workers
from indexer.sources import Item
from server.imaging import make_thumbnail, stored_image
from stair_search import DEFAULT_MODEL
from stair_search.data.photos import PHOTOS, camera_exif, camera_photo
from stair_search.encode import Encoder
from stair_search.images import file_source

THUMBNAIL_SIZE = 128  # the server's default
ISSUE_JOB_RATE = 5.0  # images/s of the whole job on 12 MP JPEGs when issue 38 was filed


class FullDecode:
    """A model's preprocessing without its ``transforms`` list: the decode then cannot tell the model's input
    size and decodes every pixel (the job before issue 38). Picklable, for the decode workers."""

    def __init__(self, preprocess: Callable):
        self.preprocess = preprocess

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.preprocess(image)


def make_photos(folder: Path, count: int, distinct: int) -> list[Path]:
    """``count`` camera JPEGs with EXIF, copies of ``distinct`` different ones."""
    folder.mkdir(parents=True)
    originals = []
    for i in range(distinct):
        photo = PHOTOS[i % len(PHOTOS)]
        path = folder / f"IMG_{i:04d}.jpg"
        exif = camera_exif(f"2019:06:{1 + i % 28:02d} 12:00:00", "+02:00", "Canon", "Canon EOS 5D Mark IV")
        camera_photo(photo.file, seed=i).save(path, quality=90, exif=exif)
        originals.append(path)
    for i in range(distinct, count):
        shutil.copyfile(originals[i % distinct], folder / f"IMG_{i:04d}.jpg")
    return sorted(folder.iterdir())


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def decode_rate(paths: list[Path], preprocess: Callable, workers: int) -> tuple[float, list[torch.Tensor]]:
    """images/s of the decode workers alone (read, decode, preprocess), and the tensors they made."""
    items = ((i, Item(id=p.name, source=str(p), path=str(p)), None) for i, p in enumerate(paths))
    with DecodePool(workers, preprocess, DecodeLimits()) as pool:
        list(pool.map([(0, Item(id="w", source=str(paths[0]), path=str(paths[0])), None)]))  # workers started
        start = time.perf_counter()
        decoded = [d for _, _, d in pool.map(items)]
        seconds = time.perf_counter() - start
    if any(d.pixels is None for d in decoded):
        raise RuntimeError(f"decode skipped photos: {sorted({d.skip_reason for d in decoded if d.skip_reason})}")
    return len(paths) / seconds, [torch.as_tensor(d.pixels) for d in decoded]


def encode_rate(encoder: Encoder, pixels: list[torch.Tensor]) -> float:
    """images/s of the model alone on decoded, preprocessed tensors, in the job's batches."""
    stacked = torch.stack(pixels)
    encoder.encode_pixels(stacked[: encoder.batch_size])  # warm-up
    start = time.perf_counter()
    for first in range(0, len(stacked), encoder.batch_size):
        encoder.encode_pixels(stacked[first : first + encoder.batch_size])
    return len(stacked) / (time.perf_counter() - start)


def job_rate(encoder: Encoder, folder: Path, out: Path, workers: int) -> float:
    """images/s of a whole indexing job on the folder, from the call to the published index."""
    start = time.perf_counter()
    summary = indexer.run(IndexJob(folder, out, batch_size=encoder.batch_size, workers=workers), encoder=encoder,
                          progress=False)
    seconds = time.perf_counter() - start
    if summary.indexed != len(list(folder.iterdir())):
        raise RuntimeError(f"the job indexed {summary.indexed} photos: {summary.describe()}")
    return summary.indexed / seconds


def thumbnail_ms(paths: list[Path], make: Callable[[str], bytes]) -> tuple[float, float]:
    """p50 ms of a cold thumbnail (each file once: nothing is cached between them), wall and this thread's CPU."""
    walls, cpus = [], []
    for path in paths:
        start, cpu = time.perf_counter(), time.thread_time()
        make(file_source(str(path)))
        walls.append(1000 * (time.perf_counter() - start))
        cpus.append(1000 * (time.thread_time() - cpu))
    return statistics.median(walls), statistics.median(cpus)


def decode_cpu_ms(paths: list[Path], preprocess: Callable) -> float:
    """CPU ms per image of reading, decoding and preprocessing in this process on one torch thread (a worker's
    setting), median over ``paths``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpus = []
        for path in paths:
            cpu = time.process_time()
            decode(Item(id=path.name, source=str(path), path=str(path)), 0, preprocess)
            cpus.append(1000 * (time.process_time() - cpu))
    finally:
        torch.set_num_threads(threads)
    return statistics.median(cpus)


def encode_cpu_ms(encoder: Encoder, pixels: list[torch.Tensor]) -> float:
    """CPU ms per image of the encoder on decoded tensors, all its threads counted."""
    stacked = torch.stack(pixels)
    cpu = time.process_time()
    for first in range(0, len(stacked), encoder.batch_size):
        encoder.encode_pixels(stacked[first : first + encoder.batch_size])
    return 1000 * (time.process_time() - cpu) / len(stacked)


def thumbnail_before(source: str) -> bytes:
    """How a thumbnail was made before issue 38: every pixel decoded, LANCZOS, PNG."""
    image = stored_image(source, 64_000_000)
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False)
    return out.getvalue()


def one_round(encoder: Encoder, paths: list[Path], folder: Path, work: Path, workers: int) -> dict[str, float]:
    rates: dict[str, float] = {}
    rates["decode"], pixels = decode_rate(paths, encoder.model.preprocess, workers)
    print(f"  decode alone (reduced) {rates['decode']:.1f} images/s ({load()})", flush=True)
    rates["decode_full"], _ = decode_rate(paths, FullDecode(encoder.model.preprocess), workers)
    print(f"  decode alone (full)    {rates['decode_full']:.1f} images/s ({load()})", flush=True)
    rates["encode"] = encode_rate(encoder, pixels)
    print(f"  bare encoder           {rates['encode']:.1f} images/s ({load()})", flush=True)
    out = work / f"index-{time.monotonic_ns()}"
    rates["job"] = job_rate(encoder, folder, out, workers)
    shutil.rmtree(out)
    print(f"  whole job              {rates['job']:.1f} images/s ({load()})", flush=True)
    sample = paths[: min(len(paths), 24)]
    rates["thumb"], rates["thumb_cpu"] = thumbnail_ms(sample,
                                                      lambda s: make_thumbnail(s, THUMBNAIL_SIZE, 64_000_000).data)
    rates["thumb_before"], rates["thumb_before_cpu"] = thumbnail_ms(sample, thumbnail_before)
    print(f"  cold thumbnail p50     {rates['thumb']:.1f} ms, CPU {rates['thumb_cpu']:.1f} ms (before: "
          f"{rates['thumb_before']:.1f} ms, CPU {rates['thumb_before_cpu']:.1f} ms) ({load()})", flush=True)
    rates["decode_cpu"] = decode_cpu_ms(sample, encoder.model.preprocess)
    rates["decode_full_cpu"] = decode_cpu_ms(sample, FullDecode(encoder.model.preprocess))
    rates["encode_cpu"] = encode_cpu_ms(encoder, pixels)
    print(f"  CPU ms per image       decode {rates['decode_cpu']:.1f} (full: {rates['decode_full_cpu']:.1f}), "
          f"encode {rates['encode_cpu']:.1f} ({load()})", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=240)
    parser.add_argument("--distinct", type=int, default=12, help="different photos among them")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None, help="decode processes (default min(4, cores))")
    parser.add_argument("--repeats", type=int, default=2, help="rounds; medians reported")
    args = parser.parse_args()
    workers = default_workers() if args.workers is None else args.workers
    work = Path(tempfile.mkdtemp(prefix="photo-bench-"))
    try:
        paths = make_photos(work / "photos", args.images, args.distinct)
        megabytes = statistics.mean(p.stat().st_size for p in paths) / 1e6
        print(f"{args.images} JPEGs of 4000x3000 ({megabytes:.1f} MB each), model {args.model}, batch "
              f"{args.batch_size}, {workers} decode workers, torch {torch.get_num_threads()} threads, "
              f"{os.cpu_count()} cores ({load()})")
        encoder = Encoder(args.model, batch_size=args.batch_size)
        make_photos(work / "warm-up", args.batch_size, 2)
        job_rate(encoder, work / "warm-up", work / "warm-index", workers)  # JVM, model and worker start-up
        rounds = []
        for round_ in range(args.repeats):
            print(f"round {round_ + 1}", flush=True)
            rounds.append(one_round(encoder, paths, work / "photos", work, workers))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report({key: statistics.median(r[key] for r in rounds) for key in rounds[0]}, args.repeats, workers)


def report(m: dict[str, float], repeats: int, workers: int) -> None:
    bound = 1 / (1 / m["decode"] + 1 / m["encode"])
    print(f"\nmedians of {repeats} rounds\n")
    print("| figure | value | target |\n|---|---|---|")
    print(f"| decode alone, reduced (images/s) | {m['decode']:.1f} | |")
    print(f"| decode alone, full, as before (images/s) | {m['decode_full']:.1f} | |")
    print(f"| bare encoder (images/s) | {m['encode']:.1f} | |")
    print(f"| whole job (images/s) | {m['job']:.1f} | >= {4 * ISSUE_JOB_RATE:.1f} (4x {ISSUE_JOB_RATE}) |")
    print(f"| bound 1/(1/decode + 1/encode) (images/s) | {bound:.1f} | |")
    print(f"| whole job / bound | {m['job'] / bound:.2f} | >= 0.8 |")
    print(f"| cold thumbnail p50, 12 MP JPEG (ms) | {m['thumb']:.1f} | <= 40 |")
    print(f"| cold thumbnail p50, as before: full decode + PNG (ms) | {m['thumb_before']:.1f} | |")
    cores = os.cpu_count() or 1
    print(f"\nCPU time per image, and the rates {cores} idle cores give from it ({workers} decode workers)\n")
    print("| figure | CPU ms | idle-machine figure |\n|---|---|---|")
    print(f"| decode, reduced | {m['decode_cpu']:.1f} | {min(workers, cores) * 1000 / m['decode_cpu']:.1f} images/s |")
    print(f"| decode, full (before) | {m['decode_full_cpu']:.1f} | "
          f"{min(workers, cores) * 1000 / m['decode_full_cpu']:.1f} images/s |")
    print(f"| encoder | {m['encode_cpu']:.1f} | {cores * 1000 / m['encode_cpu']:.1f} images/s |")
    print(f"| bound: decode + encode on the same cores | {m['decode_cpu'] + m['encode_cpu']:.1f} | "
          f"{cores * 1000 / (m['decode_cpu'] + m['encode_cpu']):.1f} images/s |")
    print(f"| cold thumbnail (p50) | {m['thumb_cpu']:.1f} | {m['thumb_cpu']:.1f} ms |")
    print(f"| cold thumbnail as before (p50) | {m['thumb_before_cpu']:.1f} | {m['thumb_before_cpu']:.1f} ms |")


if __name__ == "__main__":
    main()
