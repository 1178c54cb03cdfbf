"""The local runner: decode in worker processes, encode in this process, in source order, in chunks.

Why processes: PIL decoding and the model's resize/normalise hold the GIL, so threads would serialise them
with the encoder. Workers start with ``forkserver`` (a forked copy of a process that already runs torch
threads can deadlock), use one torch thread each, and die with the job, so a ``kill -9`` of the job leaves
no orphans (see :func:`_exit_with_the_job`). Like every non-fork start method, a worker first imports the
caller's main script again; a script that calls ``indexer.run`` without an ``if __name__ == "__main__":``
guard would index again inside each worker. ``run`` refuses to start there, the worker dies, and the job
stops with :data:`WORKERS_DIED` (a ``concurrent.futures`` pool reports a dead worker; a
``multiprocessing.Pool`` would replace it forever and hang). At most ``workers * PREFETCH_PER_WORKER`` items
are in flight: the source is read lazily, and a tar or parquet of image bytes is never pulled into memory at
once.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import select
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch

from indexer.decode import DEFAULT_LIMITS, Decoded, DecodeLimits, decode
from indexer.journal import Chunk, Skip
from indexer.sources import Item
from stair_search.encode import EncodedBatch, Encoder
from stair_search.index import FeatureRecord
from stair_search.index.sparse import available_cores, to_csr
from stair_search.vocabulary import Vocabulary

PREFETCH_PER_WORKER = 16
DUPLICATE = "duplicate id (already taken by an earlier item of this job)"
# (position in the source, item, reason to skip it without decoding or None)
NumberedItem = tuple[int, Item, str | None]
WORKERS_DIED = ("The image decoding worker processes died (their error is printed above). A worker imports the "
                "main script again: if you call indexer.run from a script, put the call under "
                "`if __name__ == \"__main__\":`, or pass workers=0 to decode in this process.")
REIMPORTED_MAIN = ("indexer.run was called while a decode worker re-imported the main script. Put the call "
                   "under `if __name__ == \"__main__\":` (workers import the script again), or pass workers=0.")


def default_workers() -> int:
    return min(4, available_cores())


# ------------------------------------------------------------------------------------------ worker processes

_worker_preprocess: Callable | None = None
_worker_limits = DEFAULT_LIMITS


def _init_worker(preprocess: Callable, limits: DecodeLimits, job_pid: int) -> None:
    global _worker_preprocess, _worker_limits
    _worker_preprocess, _worker_limits = preprocess, limits
    torch.set_num_threads(1)  # the main process's encoder needs the cores
    with contextlib.suppress(OSError, AttributeError):  # Linux: die with our parent, the forkserver
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    _exit_with_the_job(job_pid)


def _exit_with_the_job(job_pid: int) -> None:
    """End this worker when the job process ends, however it ends.

    A worker is the forkserver's child, not the job's, so ``PR_SET_PDEATHSIG`` does not see the job die; and
    every worker holds the forkserver's liveness pipe and its own task queue's write end, so after a
    ``kill -9`` of the job neither the forkserver nor the worker ever reads an end of file: both would live on
    (~1 GB each with torch loaded). A daemon thread waits on the job's pidfd instead (Linux 5.3+)."""
    try:
        job = os.pidfd_open(job_pid)
    except ProcessLookupError:  # the job is already gone
        os._exit(1)
    except (OSError, AttributeError):  # no pidfd here: the pool's own shutdown still ends workers normally
        return

    def wait_for_the_job() -> None:
        select.select([job], [], [])
        os._exit(1)

    threading.Thread(target=wait_for_the_job, name="exit-with-the-job", daemon=True).start()


def _decode_in_worker(item: Item, position: int) -> Decoded:
    decoded = decode(item, position, _worker_preprocess, _worker_limits)
    if decoded.pixels is not None:  # plain bytes through the pipe, not torch's shared-memory file handles
        decoded.pixels = decoded.pixels.numpy()
    return decoded


def check_not_reimporting_main() -> None:
    """Refuse to run inside a worker process's re-import of the main script (see the module docstring):
    the call comes from the module-level code of a script being run as ``__mp_main__``."""
    frame = sys._getframe(1)  # noqa: SLF001 - CPython's documented way to read the caller's frame
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals.get("__name__") == "__mp_main__":
            raise RuntimeError(REIMPORTED_MAIN)
        frame = frame.f_back


def modules_to_preload(preprocess: Callable) -> list[str]:
    """This module plus the packages that define ``preprocess`` and its steps: unpickling it in a worker
    imports them (open_clip's transforms pull in the whole package, seconds per worker and job)."""
    parts = [preprocess, *getattr(preprocess, "transforms", ())]
    packages = {(getattr(part, "__module__", None) or type(part).__module__).split(".")[0] for part in parts}
    return sorted({__name__, *packages} - {"builtins", "__main__"})


class DecodePool:
    """Ordered, bounded parallel decoding; ``workers=0`` decodes inline (no processes)."""

    def __init__(self, workers: int, preprocess: Callable, limits: DecodeLimits = DEFAULT_LIMITS):
        self.workers, self.preprocess, self.limits = workers, preprocess, limits
        self._pool = None
        if workers > 0:
            context = multiprocessing.get_context("forkserver")
            # The server imports torch, PIL and the preprocessing code once; each worker is a fork of it and
            # starts in milliseconds instead of importing them again (seconds per worker, per job).
            context.set_forkserver_preload(modules_to_preload(preprocess))
            self._pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                             initargs=(preprocess, limits, os.getpid()))

    def __enter__(self) -> DecodePool:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def map(self, items: Iterable[NumberedItem]) -> Iterator[tuple[int, Item, Decoded]]:
        if self._pool is None:
            for position, item, reason in items:
                yield position, item, _skipped(position, reason) or decode(item, position, self.preprocess, self.limits)
            return
        in_flight: deque = deque()
        limit = self.workers * PREFETCH_PER_WORKER
        for position, item, reason in items:
            result = _skipped(position, reason) or self._pool.submit(_decode_in_worker, item, position)
            in_flight.append((position, item, result))
            if len(in_flight) >= limit:
                yield _ready(*in_flight.popleft())
        while in_flight:
            yield _ready(*in_flight.popleft())


def _skipped(position: int, reason: str | None) -> Decoded | None:
    return Decoded(position, None, skip_reason=reason) if reason else None


def _ready(position: int, item: Item, result: Decoded | Future) -> tuple[int, Item, Decoded]:
    if isinstance(result, Decoded):
        return position, item, result
    try:
        return position, item, result.result()
    except BrokenProcessPool as error:
        raise RuntimeError(WORKERS_DIED) from error


# ------------------------------------------------------------------------------------------ batching


class ChunkBuilder:
    """Collects decoded (or already encoded) items into batches of ``batch_size`` and turns each into a
    :class:`Chunk`; shared by the local and the Ray runner so both write exactly the same documents."""

    def __init__(self, batch_size: int, seen_ids: set[str], encode: Callable[[list[Any]], EncodedBatch],
                 vocabulary: Vocabulary, scale: float):
        self.batch_size, self.seen_ids, self.encode = batch_size, seen_ids, encode
        self.vocabulary, self.scale = vocabulary, scale
        self.records: list[FeatureRecord] = []
        self.payloads: list[Any] = []
        self.skipped: list[Skip] = []

    def add(self, position: int, item: Item, skip_reason: str | None, width: int, height: int,
            payload: Any, found: dict[str, Any] | None = None) -> Chunk | None:
        """Take one item; returns a chunk when a batch is full. ``found``: metadata the decode read from the image
        (its EXIF fields), under the item's own (a source's column or sidecar of the same name wins)."""
        if skip_reason is None and item.id in self.seen_ids:
            skip_reason = DUPLICATE
        if skip_reason:
            self.skipped.append((item.id, item.source, skip_reason))
            return None
        self.seen_ids.add(item.id)
        self.records.append(FeatureRecord(id=item.id, source=item.source, width=width, height=height,
                                          caption=item.caption, metadata={**(found or {}), **item.metadata}))
        self.payloads.append(payload)
        return self.flush(position + 1) if len(self.records) >= self.batch_size else None

    def flush(self, end: int) -> Chunk | None:
        """The batch so far as a chunk accounting for positions below ``end`` (None if there is nothing)."""
        if not self.records and not self.skipped:
            return None
        chunk = Chunk(end=end, records=self.records, skipped=self.skipped)
        if self.records:
            chunk.encoded = self.encode(self.payloads)
            chunk.csr = to_csr(chunk.encoded.sparse, self.vocabulary, self.scale)
            if chunk.encoded.local is not None:
                for record, local, positions in zip(chunk.records, chunk.encoded.local,
                                                    chunk.encoded.local_positions, strict=True):
                    record.local, record.local_positions = local, positions
        self.records, self.payloads, self.skipped = [], [], []
        return chunk


def local_chunks(items: Iterable[NumberedItem], encoder: Encoder, builder_args: dict[str, Any], workers: int,
                 limits: DecodeLimits = DEFAULT_LIMITS) -> Iterator[Chunk]:
    """Decode (in ``workers`` processes) and encode (here) every item, yielding chunks in source order."""

    def encode(pixels: list[np.ndarray | torch.Tensor]) -> EncodedBatch:
        return encoder.encode_pixels(torch.stack([torch.as_tensor(p) for p in pixels]))

    builder = ChunkBuilder(encode=encode, **builder_args)
    end = None
    with DecodePool(workers, encoder.model.preprocess, limits) as pool:
        for position, item, decoded in pool.map(items):
            end = position + 1
            chunk = builder.add(position, item, decoded.skip_reason, decoded.width, decoded.height, decoded.pixels,
                                decoded.metadata)
            if chunk is not None:
                yield chunk
    if end is not None and (chunk := builder.flush(end)) is not None:
        yield chunk
