"""Bounded load test of the HTTP service, loopback only: dynamic batching on against off, in one run.

Starts two real servers (`stair-search serve`, each its own process, uvicorn) on 127.0.0.1, one with query
encodes batched (the default) and one with ``--no-batching`` (each encode alone, one at a time: the old
behaviour), then for each mode runs 1 client and N concurrent clients for T seconds against each, blocks
alternating between the servers. Each client loops over a mix of text queries and image queries (base64,
made from thumbnails of the index's own documents) against ``POST /search``. Prints one table (requests,
requests/s, p50/p95/p99 latency and errors per server, mode and client count) and, per mode, the N-client /
1-client throughput ratio of each server (target with batching: >= 3) and the N-client p95 with batching
against without. Exit status 1 when any request failed.

    python benchmarks/load_test.py [INDEX] [--clients 8] [--seconds 30] [--modes sparse dense hybrid auto]

Without INDEX it indexes the emoji data set's test split with the embedded default model (built once, into
``$STAIR_DATA/load-test``, and reused) and uses the split's label queries as the text queries.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from stair_search.models import DEFAULT_MODEL

DEFAULT_TEXT_QUERIES = ("dog", "red heart", "smiling face", "flag", "cat", "party", "food", "car", "music", "tree")
IMAGE_QUERIES = 4  # image queries in the mix, next to the text queries
TEXT_QUERIES = 48  # at most this many text queries (from the data set, or the defaults)
IMAGE_EVERY = 4  # one request in IMAGE_EVERY is an image query


@dataclass
class ModeResult:
    """What the clients saw for one mode."""

    mode: str
    clients: int
    seconds: float
    server: str = "batching"
    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies_s) + len(self.errors)

    def row(self) -> list[str]:
        p50, p95, p99 = (np.percentile(self.latencies_s, [50, 95, 99]) * 1000 if self.latencies_s
                         else (float("nan"),) * 3)
        return [self.server, self.mode, str(self.clients), f"{self.seconds:.0f}", str(self.requests),
                f"{len(self.latencies_s) / self.seconds:.1f}", f"{p50:.0f}", f"{p95:.0f}", f"{p99:.0f}",
                str(len(self.errors))]


HEADER = ["server", "mode", "clients", "seconds", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors"]


def format_table(results: Sequence[ModeResult]) -> str:
    """A markdown table (pastes into the README as is)."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(result.row()) + " |" for result in results]
    return "\n".join(lines)


def format_ratios(results: Sequence[ModeResult], clients: int) -> str:
    """Per mode: each server's N-client / 1-client throughput, and the N-client p95 with against without."""
    def find(server: str, mode: str, count: int) -> ModeResult:
        return next(r for r in results if (r.server, r.mode, r.clients) == (server, mode, count))

    def rate(r: ModeResult) -> float:
        return len(r.latencies_s) / r.seconds

    lines = [f"| mode | batching: {clients} / 1 client req/s (target >= 3) | no batching: {clients} / 1 | "
             f"{clients}-client p95 ms, batching / no batching |", "|---|---|---|---|"]
    for mode in dict.fromkeys(r.mode for r in results):
        on1, on_n = find("batching", mode, 1), find("batching", mode, clients)
        off1, off_n = find("no batching", mode, 1), find("no batching", mode, clients)
        p95 = [np.percentile(r.latencies_s, 95) * 1000 if r.latencies_s else float("nan") for r in (on_n, off_n)]
        lines.append(f"| {mode} | {rate(on_n) / max(rate(on1), 1e-9):.2f} | {rate(off_n) / max(rate(off1), 1e-9):.2f}"
                     f" | {p95[0]:.0f} / {p95[1]:.0f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- load


def run_load(base_url: str, requests: Sequence[dict], mode: str, clients: int, seconds: float,
             headers: dict[str, str] | None = None) -> ModeResult:
    """``clients`` threads, each with its own keep-alive connection, send ``requests`` (in turn, each client
    starting at a different one) with ``mode`` until ``seconds`` have passed; only 200 answers count as success."""
    result = ModeResult(mode=mode, clients=clients, seconds=seconds)
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(offset: int) -> None:
        latencies, errors = [], []
        with httpx.Client(base_url=base_url, timeout=60, headers=headers) as http:
            for body in itertools.islice(itertools.cycle(requests), offset, None):
                if time.perf_counter() >= deadline:
                    break
                started = time.perf_counter()
                try:
                    response = http.post("/search", json={**body, "mode": mode})
                except httpx.HTTPError as exc:
                    errors.append(f"{type(exc).__name__}: {exc}")
                    continue
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
        with lock:
            result.latencies_s.extend(latencies)
            result.errors.extend(errors)

    threads = [threading.Thread(target=client, args=(i * len(requests) // clients,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return result


def query_mix(base_url: str, texts: Sequence[str], k: int = 10, headers: dict[str, str] | None = None) -> list[dict]:
    """Text queries, with an image query (a thumbnail of a document the index holds, base64) every few requests."""
    with httpx.Client(base_url=base_url, timeout=60, headers=headers) as http:
        hits = http.post("/search", json={"query": texts[0], "mode": "dense", "k": IMAGE_QUERIES}).json()["hits"]
        images = [base64.b64encode(http.get(hit["thumbnail"], params={"size": 128}).content).decode()
                  for hit in hits]
    mix: list[dict] = []
    image_cycle = itertools.cycle(images) if images else None
    for position, text in enumerate(texts):
        if image_cycle is not None and position % IMAGE_EVERY == IMAGE_EVERY - 1:
            mix.append({"image": next(image_cycle), "k": k})
        mix.append({"query": text, "k": k})
    return mix


def supported_modes(base_url: str, wanted: Sequence[str], headers: dict[str, str] | None = None) -> list[str]:
    offered = httpx.get(f"{base_url}/info", headers=headers, timeout=30).json()["modes"]
    missing = [mode for mode in wanted if mode not in offered]
    if missing:
        print(f"note: this server does not offer modes {missing}; measuring {[m for m in wanted if m in offered]}")
    return [mode for mode in wanted if mode in offered]


# ------------------------------------------------------------------------------------------------- server


@contextmanager
def serve_process(index_dir: Path, threads: int, start_timeout_s: float = 300,
                  extra: Sequence[str] = ()) -> Iterator[str]:
    """``stair-search serve INDEX`` in its own process on a free loopback port; yields the base URL once ready.

    Its own process, so the clients' Python threads do not share a GIL with the server they measure.
    """
    from server.background import LOOPBACK, free_port

    port = free_port()
    command = [sys.executable, "-m", "stair_search.cli", "serve", str(index_dir), "--host", LOOPBACK,
               "--port", str(port), "--threads", str(threads), "--reload-interval", "0", "--log-level", "warning",
               *extra]
    process = subprocess.Popen(command)
    base_url = f"http://{LOOPBACK}:{port}"
    try:
        _wait_until_ready(base_url, process, start_timeout_s)
        yield base_url
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def _wait_until_ready(base_url: str, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not ready at {base_url} within {timeout_s} s")


# ------------------------------------------------------------------------------------------------- index


def emoji_index(work_dir: Path, model: str) -> tuple[Path, list[str]]:
    """The emoji test split indexed with ``model`` (built on first use) and the split's label queries."""
    from stair_search.cli.demo import index_split, open_dataset

    dataset = open_dataset()
    texts = sorted(set(dataset.queries("test", "label").values()))
    index_dir = work_dir / f"emoji-test-{model}"
    if (index_dir / "manifest.json").is_file():
        from stair_search.encode import Encoder
        from stair_search.index import Manifest

        if Manifest.load(index_dir).model["fingerprint"] == Encoder(model).fingerprint:
            print(f"reusing {index_dir}")
            return index_dir, texts
        print(f"{index_dir} was built with other weights of {model}: rebuilding it")
    print(f"indexing the emoji test split into {index_dir} ...")
    summary = index_split(dataset, "test", index_dir, model)
    print(f"{index_dir}: {summary.describe()}")
    return index_dir, texts


def spread(items: Sequence[str], count: int) -> list[str]:
    """``count`` items spread evenly over ``items`` (deterministic, unlike a random sample)."""
    if len(items) <= count:
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def main(argv: Sequence[str] | None = None) -> int:
    from stair_search.paths import data_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", nargs="?", type=Path, help="Index directory (default: the emoji test split).")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients.")
    parser.add_argument("--seconds", type=float, default=30.0, help="Seconds of load per mode.")
    parser.add_argument("--modes", nargs="+", default=["sparse", "dense", "hybrid", "auto"])
    parser.add_argument("--threads", type=int, default=8, help="The server's search threads.")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Model for the emoji index (without INDEX).")
    parser.add_argument("--work-dir", type=Path, default=data_dir() / "load-test")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.seconds <= 0:
        parser.error("--clients must be at least 1 and --seconds above 0")
    if args.index is not None and not (args.index / "manifest.json").is_file():
        parser.error(f"{args.index} is not an index (no manifest.json); build one with `stair-search index`")
    if args.index is None:
        index_dir, texts = emoji_index(args.work_dir, args.model)
    else:
        index_dir, texts = args.index, list(DEFAULT_TEXT_QUERIES)
    headers = {"X-API-Key": os.environ["STAIR_API_KEY"]} if os.environ.get("STAIR_API_KEY") else None
    servers = {"batching": (), "no batching": ("--no-batching",)}
    with serve_process(index_dir, args.threads, extra=servers["batching"]) as on, \
            serve_process(index_dir, args.threads, extra=servers["no batching"]) as off:
        urls = {"batching": on, "no batching": off}
        requests = query_mix(on, spread(texts, TEXT_QUERIES), args.k, headers)
        for url in urls.values():  # warm-up, not measured: first encodes, page cache, JIT of the JVM searcher
            for body in requests:
                httpx.post(f"{url}/search", json={**body, "mode": "hybrid"}, headers=headers, timeout=60)
        results = []
        for mode in supported_modes(on, args.modes, headers):
            for clients in dict.fromkeys((1, args.clients)):
                for name, url in urls.items():  # alternating blocks: the same load drift for both servers
                    result = run_load(url, requests, mode, clients, args.seconds, headers)
                    result.server = name
                    results.append(result)
                    print(f"{name}, {mode}, {clients} clients: {result.requests} requests, {len(result.errors)} "
                          f"errors", flush=True)
    texts_count = sum("query" in body for body in requests)
    print(f"\n{index_dir}: 1 and {args.clients} clients x {args.seconds:.0f} s per mode and server, {texts_count} "
          f"text + {len(requests) - texts_count} image queries in the mix, k={args.k}, {args.threads} search "
          f"threads\n")
    print(format_table(results))
    print(f"\n{format_ratios(results, args.clients)}")
    failed = [error for result in results for error in result.errors]
    for error in sorted(set(failed))[:5]:
        print(f"error: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
