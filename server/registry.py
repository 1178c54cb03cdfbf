"""Open indexes by name and swap in newly published versions without dropping requests.

Why a registry: an index directory changes under a running server whenever a change is published (an append,
an overwrite, a delete, a compaction or a merge: new shards moved in, then the manifest replaced atomically;
the parts it replaced stay 120 s, index/publish.py). The registry notices
the change (manifest inode, size or mtime), opens and warms the new version *beside* the old one, then swaps
a pointer. Requests hold a lease on the version they started with, so an in-flight search finishes on the
old files (open file handles and memory maps stay valid after a rename or delete on POSIX), and the old
version is closed only when its last lease ends.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from server.batching import MAX_WAIT_S, BatchingEncoder
from stair_search.encode import Encoder
from stair_search.index import IndexMismatchError, IndexReader, ShardOpener
from stair_search.index.layout import MANIFEST
from stair_search.retrieve import QueryRouter

log = logging.getLogger("stair_search.server")


def manifest_signature(index_dir: Path) -> tuple[int, int, int, int]:
    """What changes when an index is appended to or re-published: the manifest's inode, size and mtime."""
    stat = os.stat(Path(index_dir) / MANIFEST)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


@dataclass
class IndexVersion:
    """One opened, warmed version of an index, with a count of the requests using it."""

    name: str
    number: int
    router: QueryRouter
    signature: tuple[int, int, int, int]
    opened: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    _leases: int = 0
    _retired: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def index(self) -> IndexReader:
        return self.router.index

    def acquire(self) -> None:
        with self._lock:
            self._leases += 1

    def release(self) -> None:
        with self._lock:
            self._leases -= 1
            close = self._retired and self._leases == 0
        if close:
            self._close()

    def retire(self) -> None:
        with self._lock:
            self._retired = True
            close = self._leases == 0
        if close:
            self._close()

    @property
    def closed(self) -> bool:
        return self._retired and self._leases == 0

    def _close(self) -> None:
        """Release Lucene readers, store maps and the router's threads (only parts that were opened)."""
        self.router.close()
        log.info("closed %s version %d", self.name, self.number)


class IndexRegistry:
    """Named indexes, each served from its newest published version."""

    def __init__(self, indexes: Mapping[str, str | Path], model: str | None = None, batching: bool = True,
                 batch_wait_s: float = MAX_WAIT_S, query_weights: str = "auto",
                 shards: Callable[[str], ShardOpener] | None = None):
        """``batching``: concurrent searches' encodes share forwards (server/batching.py), waiting up to
        ``batch_wait_s`` for more under load; off, each encode runs alone, one at a time. ``query_weights``:
        the routers' (see :class:`QueryRouter`). ``shards``: index name -> how its shards are reached (None: read
        in this process; a cluster's ingress reaches them over Ray Serve: server/cluster.py)."""
        if not indexes:
            raise ValueError("give at least one index directory to serve")
        self.dirs = {name: Path(path) for name, path in indexes.items()}
        self.model, self.batching, self.batch_wait_s, self.query_weights = model, batching, batch_wait_s, query_weights
        self.shards = shards
        self._encoders: dict[tuple[str, str | None], BatchingEncoder] = {}
        self._current: dict[str, IndexVersion] = {}
        self._swap_lock = threading.Lock()
        self.errors: dict[str, str] = {}
        for name in self.dirs:
            self._current[name] = self._open(name, number=1)
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- lookups

    @property
    def names(self) -> list[str]:
        return list(self.dirs)

    def current(self, name: str | None = None) -> IndexVersion:
        name = name or self.names[0]
        if name not in self._current:
            raise KeyError(f"no index named '{name}'; this server has {self.names}")
        return self._current[name]

    @contextmanager
    def lease(self, name: str | None = None) -> Iterator[IndexVersion]:
        """The current version of ``name``, kept open until the block ends even if a newer one is swapped in."""
        with self._swap_lock:
            version = self.current(name)
            version.acquire()
        try:
            yield version
        finally:
            version.release()

    # ------------------------------------------------------------------------------------------- hot swap

    def refresh(self) -> list[str]:
        """Swap in every index whose manifest changed; returns the names swapped. A version that fails to open
        (e.g. a half-copied index) is logged and kept out; the old version goes on serving."""
        swapped = []
        for name, index_dir in self.dirs.items():
            old = self._current[name]
            try:
                if manifest_signature(index_dir) == old.signature:
                    continue
                new = self._open(name, number=old.number + 1)
            except Exception as exc:  # any failure keeps the old version serving
                self.errors[name] = f"{type(exc).__name__}: {exc}"
                log.warning("index %s: new version not swapped in: %s", name, exc)
                continue
            with self._swap_lock:
                self._current[name] = new
            old.retire()
            self.errors.pop(name, None)
            swapped.append(name)
            log.info("index %s: swapped in version %d (%d documents)", name, new.number, len(new.index))
        return swapped

    def start_watching(self, interval_s: float) -> None:
        if interval_s <= 0 or self._watcher is not None:
            return
        self._stop.clear()

        def watch() -> None:
            while not self._stop.wait(interval_s):
                self.refresh()

        self._watcher = threading.Thread(target=watch, name="index-watcher", daemon=True)
        self._watcher.start()

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(timeout=10)
            self._watcher = None

    # ------------------------------------------------------------------------------------------- opening

    def _open(self, name: str, number: int) -> IndexVersion:
        index_dir = self.dirs[name]
        signature = manifest_signature(index_dir)  # read before opening: a change during opening is seen next time
        index = IndexReader(index_dir, self.shards(name)) if self.shards else IndexReader(index_dir)
        router = QueryRouter(index, self._encoder_for(index), query_weights=self.query_weights)
        _warm(index)
        return IndexVersion(name=name, number=number, router=router, signature=signature)

    def _encoder_for(self, index: IndexReader) -> BatchingEncoder:
        """One encoder per model, shared by every index and version built with it (models are big)."""
        recorded = index.manifest.model
        key = (self.model or recorded["spec"], None if self.model else recorded.get("pretrained"))
        encoder = self._encoders.get(key)
        if encoder is not None:
            try:
                index.manifest.check_model(encoder.record)
                return encoder
            except IndexMismatchError:
                pass  # the model file changed under the same name: load it again
        model = Encoder(key[0], pretrained=key[1])
        model.warm()  # the image trunk's fast copy now, not in the first image query
        encoder = BatchingEncoder(model, max_wait_s=self.batch_wait_s, enabled=self.batching)
        self._encoders[key] = encoder
        return encoder


def _warm(index: IndexReader) -> None:
    """Open every part now (Lucene searcher, FAISS, parquet), so the swap is instant for requests and the
    old files are no longer needed by the new version."""
    index.warm()
