"""Dynamic batching: the encode calls of concurrent searches gathered into one forward.

Why: a query's time is mostly the text (or image) tower, and one forward over 8 short queries costs little
more than one over a single query; encoding them one by one behind a lock made 8 clients no faster than one.
Here every encode call is queued for one worker thread, which runs whatever has queued as a single batch
(continuous batching: at low load a call runs at once, without waiting). Only under load, when the previous
batch held more than one call, does it wait up to ``max_wait_s`` (a few ms) for more before a forward.

Results equal one-by-one encodes (the encoder pads and masks, so a batch gives each item the vectors it gets
alone, up to float rounding). One forward runs at a time, as a torch module is not documented as safe to call
from several threads at once; the model's intra-op threads are the ``serve`` command's policy, not this one's.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stair_search.encode import EncodedBatch, Encoder

MAX_WAIT_S = 0.002
MAX_BATCH = 32
BATCHED = ("encode_texts", "embed_texts", "encode_images")  # the calls a search makes


@dataclass
class _Call:
    kind: str
    items: list
    future: Future = field(default_factory=Future)


class BatchingEncoder:
    """An Encoder whose ``encode_texts`` / ``embed_texts`` / ``encode_images`` calls from many threads are
    answered in shared forwards; everything else (name, fingerprint, model) is the wrapped encoder's."""

    def __init__(self, encoder: Encoder, max_wait_s: float = MAX_WAIT_S, max_batch: int = MAX_BATCH,
                 enabled: bool = True):
        """``enabled=False``: every call runs alone, one at a time (the unbatched baseline of the load test)."""
        if max_wait_s < 0 or max_batch < 1:
            raise ValueError(f"max_wait_s must be >= 0 and max_batch >= 1, got {max_wait_s} and {max_batch}")
        self._encoder, self.max_wait_s, self.max_batch, self.enabled = encoder, max_wait_s, max_batch, enabled
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._alone = threading.Lock()
        self._worker: threading.Thread | None = None
        self._start = threading.Lock()
        self.batches = self.calls = 0  # batched forwards run, and encode calls answered (batched or alone)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._encoder, name)

    def encode_texts(self, texts: Sequence[str]) -> EncodedBatch:
        return self._submit("encode_texts", list(texts))

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self._submit("embed_texts", list(texts))

    def encode_images(self, images: Sequence[Any]) -> EncodedBatch:
        return self._submit("encode_images", list(images))

    def encode_pixels(self, pixels: Any) -> EncodedBatch:
        with self._alone:
            return self._encoder.encode_pixels(pixels)

    def close(self) -> None:
        """Stop the worker (calls still queued are answered first)."""
        if self._worker is not None:
            self._calls.put(None)
            self._worker.join(timeout=10)
            self._worker = None

    # ---------------------------------------------------------------------------------------------- worker

    def _submit(self, kind: str, items: list) -> Any:
        if not items:
            return getattr(self._encoder, kind)(items)
        if not self.enabled:
            with self._alone:
                self.calls += 1
                return getattr(self._encoder, kind)(items)
        self._ensure_worker()
        call = _Call(kind, items)
        self._calls.put(call)
        return call.future.result()

    def _ensure_worker(self) -> None:
        if self._worker is None:
            with self._start:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._run, name="encode-batcher", daemon=True)
                    self._worker.start()

    def _run(self) -> None:
        busy = False  # the previous batch held several calls: the load that waiting for more pays off under
        while True:
            first = self._calls.get()
            if first is None:
                return
            calls, stop = self._gather(first, wait=busy)
            for kind in dict.fromkeys(c.kind for c in calls):
                self._answer([c for c in calls if c.kind == kind])
            busy = len(calls) > 1
            if stop:
                return

    def _gather(self, first: _Call, wait: bool) -> tuple[list[_Call], bool]:
        """``first`` plus whatever else is queued (until ``max_batch`` items), waiting up to ``max_wait_s`` for
        more only when ``wait``; True as the second value when the stop signal was seen."""
        calls, size = [first], len(first.items)
        deadline = time.monotonic() + (self.max_wait_s if wait else 0.0)
        while size < self.max_batch:
            try:
                remaining = deadline - time.monotonic()
                call = self._calls.get(timeout=remaining) if remaining > 0 else self._calls.get_nowait()
            except queue.Empty:
                break
            if call is None:
                return calls, True
            calls.append(call)
            size += len(call.items)
        return calls, False

    def _answer(self, calls: list[_Call]) -> None:
        """One forward for ``calls`` (all of one kind); each future gets its own rows (or the exception)."""
        encode: Callable = getattr(self._encoder, calls[0].kind)
        try:
            with self._alone:
                out = encode([item for c in calls for item in c.items])
        except BaseException as exc:
            if len(calls) > 1:  # one bad item must not fail the others: answer each call alone
                for call in calls:
                    self._answer([call])
                return
            calls[0].future.set_exception(exc)
            return
        self.batches += 1
        self.calls += len(calls)
        start = 0
        for call in calls:
            stop = start + len(call.items)
            call.future.set_result(out.rows(start, stop) if isinstance(out, EncodedBatch) else out[start:stop])
            start = stop
