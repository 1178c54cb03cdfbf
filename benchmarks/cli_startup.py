"""Queries without torch (issue 40), before and after, side by side in one run: the CLI ``search`` wall time (text
and image), the server's start, first query and memory, and the query encode p50 of torch against ONNX Runtime.

Three sides: "before issue 40" is the code of the last commit before it (``--before``, extracted with ``git
archive`` into a temporary folder and run from there: torch queries, and the text route through Pyserini's Python
packages); "torch queries" is this code with the torch path forced (``STAIR_QUERY_RUNTIME=torch``: the model built
with torch); "after" is this code as shipped (the query bundle on ONNX Runtime, the text route through Anserini's
Java classes directly). All run on the same index, built here from scikit-image's sample photos (a few with
captions, so ``auto`` adds the text route) with the default model, unless ``--index`` names one. Rounds alternate
the sides, so a slow spell of a shared machine hits all alike; medians are printed.

    python benchmarks/cli_startup.py [--index DIR] [--rounds 5] [--encode-rounds 60] [--before REV|""]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from stair_search import DEFAULT_MODEL
from stair_search.data.photos import sample_dir

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "1046a43"  # the last commit before issue 40's work (81999ba is its first)
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "retina.jpg",
          "hubble_deep_field.jpg", "color.png", "logo.png", "immunohistochemistry.png")
CAPTIONS = {"chelsea.png": "a cat sitting on a rug", "coffee.png": "a cup of coffee",
            "astronaut.png": "an astronaut portrait"}
TEXT, QUERY_IMAGE = "a cup of coffee", "chelsea.png"
CLI = [sys.executable, "-m", "stair_search.cli"]


def build_index(work: Path) -> Path:
    """scikit-image's photos (three with a caption file beside them) indexed with the default model."""
    folder = work / "photos"
    folder.mkdir(parents=True)
    for name in PHOTOS:
        if (sample_dir() / name).is_file():
            shutil.copy(sample_dir() / name, folder / name)
    for name, caption in CAPTIONS.items():
        (folder / name).with_suffix(".txt").write_text(caption)
    subprocess.run([*CLI, "index", str(folder), "--out", str(work / "index"), "--workers", "0"], check=True, cwd=ROOT)
    return work / "index"


@dataclass(frozen=True)
class Side:
    """One side of the comparison: the query runtime asked for and the source tree the processes run from."""

    runtime: str
    root: Path = ROOT

    def run(self, args: list[str], **options) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], env=self.env(), cwd=self.root, **options)

    def env(self) -> dict[str, str]:
        return {**os.environ, "STAIR_QUERY_RUNTIME": self.runtime}


def extract(revision: str, work: Path) -> Path:
    """This repository's files at ``revision``, in a folder of ``work`` (``python -m`` there imports its packages)."""
    folder = work / f"tree-{revision}"
    folder.mkdir()
    archive = subprocess.run(["git", "archive", revision], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def sides(before: str, work: Path) -> dict[str, Side]:
    found = {f"before issue 40 ({before})": Side("torch", extract(before, work))} if before else {}
    return found | {"torch queries (this code)": Side("torch"), "after (ONNX Runtime)": Side("auto")}


def cli_seconds(index: Path, side: Side, args: list[str]) -> tuple[float, float]:
    """Wall seconds of one CLI search, and the CPU seconds (user + system, every thread, the JVM's included) it
    used: the figure a shared machine's other jobs barely change."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    side.run(["search", str(index), *args, "-k", "5", "--json"], check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cli_table(index: Path, compared: dict[str, Side], rounds: int) -> tuple[dict[str, dict[str, float]], ...]:
    """Median wall and CPU seconds of a CLI search per side and query kind (a fresh process each: what a user
    waits, and what it costs the machine)."""
    photo = str(sample_dir() / QUERY_IMAGE)
    kinds = {"text (auto: + text route)": [TEXT], "text, --mode hybrid (no Lucene)": [TEXT, "--mode", "hybrid"],
             "image": ["--image", photo]}
    times: dict[str, dict[str, list[tuple[float, float]]]] = {name: {kind: [] for kind in kinds} for name in compared}
    for _ in range(rounds):
        for name, side in compared.items():
            for kind, args in kinds.items():
                times[name][kind].append(cli_seconds(index, side, args))
    return tuple({side: {kind: statistics.median(t[i] for t in v) for kind, v in by_kind.items()}
                  for side, by_kind in times.items()} for i in (0, 1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(port: int, body: dict) -> float:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/search", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        response.read()
    return time.perf_counter() - started


def wait_ready(port: int, server: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError("the server did not get ready")


def serve_figures(index: Path, side: Side) -> dict[str, float]:
    """Seconds to ready, the first text and image queries' seconds, and the process's RSS after each."""
    port = free_port()
    started = time.perf_counter()
    server = subprocess.Popen([*CLI, "serve", str(index), "--port", str(port), "--log-level", "warning"],
                              env=side.env(), cwd=side.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(port, server)
        ready = time.perf_counter() - started
        first = post(port, {"query": TEXT, "k": 5})
        after_text = rss_mb(server.pid)
        buffer = io.BytesIO()
        Image.open(sample_dir() / QUERY_IMAGE).convert("RGB").save(buffer, format="PNG")
        image = post(port, {"image": base64.b64encode(buffer.getvalue()).decode(), "k": 5})
        later = statistics.median(post(port, {"query": TEXT, "k": 5}) for _ in range(10))
        return {"ready s": ready, "first text query s": first, "RSS after it MB": after_text,
                "first image query s": image, "RSS after it MB ": rss_mb(server.pid), "later text p50 ms": later * 1e3}
    finally:
        server.terminate()
        server.wait(timeout=60)


def encode_p50(rounds: int) -> dict[str, dict[str, float]]:
    """Query encode p50 (ms) of the default model, one thread each, torch against ONNX Runtime, interleaved; and
    the largest difference of their vectors."""
    os.environ["STAIR_ENCODE_THREADS"] = "1"
    import torch

    from stair_search.encode import Encoder

    torch.set_num_threads(1)
    encoders = {"torch": Encoder(DEFAULT_MODEL, queries="torch"), "ONNX Runtime": Encoder(DEFAULT_MODEL)}
    photo = Image.open(sample_dir() / QUERY_IMAGE).convert("RGB")
    calls = {"text: embed (idf queries)": lambda e: e.embed_texts([TEXT]),
             "text: encode (dense + sparse)": lambda e: e.encode_texts([TEXT]),
             "image: encode": lambda e: e.encode_images([photo])}
    for encoder in encoders.values():  # warm-up: sessions, the accelerated trunk, the concept bank
        for call in calls.values():
            call(encoder)
    times = {name: {call: [] for call in calls} for name in encoders}
    for _ in range(rounds):
        for name, encoder in encoders.items():
            for call_name, call in calls.items():
                started = time.perf_counter()
                call(encoder)
                times[name][call_name].append((time.perf_counter() - started) * 1e3)
    table = {name: {c: float(np.percentile(v, 50)) for c, v in by_call.items()} for name, by_call in times.items()}
    table["max |Δ|"] = {call_name: _max_difference([call(e) for e in encoders.values()])
                        for call_name, call in calls.items()}
    return table


def _max_difference(outputs: list) -> float:
    """The largest difference of two sides' dense vectors (and of their sparse weights, over the same words)."""
    dense = [getattr(o, "dense", o) for o in outputs]
    found = float(np.abs(dense[0] - dense[1]).max())
    for a, b in zip(*(getattr(o, "sparse", []) for o in outputs), strict=True):
        found = max(found, max((abs(a[t] - b.get(t, 0.0)) for t in a), default=0.0))
    return found


def markdown(title: str, table: dict[str, dict[str, float]], digits: int = 2) -> str:
    columns = list(next(iter(table.values())))
    lines = [f"**{title}**", "", "| | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {row} | " + " | ".join(f"{values[c]:.{digits}g}" if abs(values[c]) < 1e-3 else
                                         f"{values[c]:.{digits}f}" for c in columns) + " |"
              for row, values in table.items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None, help="an index built with the default model")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--encode-rounds", type=int, default=60)
    parser.add_argument("--before", default=BEFORE, help="the revision whose code is the 'before' side ('': none)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cli-startup-"))
    try:
        index = args.index or build_index(work)
        compared = sides(args.before, work)
        print(f"load average at the start: {os.getloadavg()[0]:.1f} (1 min), {os.cpu_count()} cores", flush=True)
        for side in compared.values():  # compiled bytecode, the bundle (exported once), the concept bank
            cli_seconds(index, side, [TEXT])
            cli_seconds(index, side, ["--image", str(sample_dir() / QUERY_IMAGE)])
        wall, cpu = cli_table(index, compared, args.rounds)
        print(markdown(f"CLI search wall time, median of {args.rounds} (s)", wall), flush=True)
        print(markdown(f"CLI search CPU time (user + system), median of {args.rounds} (s)", cpu), flush=True)
        served = {name: serve_figures(index, side) for name, side in compared.items()}
        print(markdown("Server: start, first queries, memory", served), flush=True)
        print(markdown(f"Query encode p50, 1 thread, {args.encode_rounds} rounds (ms)",
                       encode_p50(args.encode_rounds), digits=3), flush=True)
        print(f"load average at the end: {os.getloadavg()[0]:.1f} (1 min)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
