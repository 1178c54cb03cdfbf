"""The mutation lock of an index: one writer at a time, readers never wait.

Every change to an index (a new build, an append, an overwrite, a delete, a resumed job) takes an exclusive
OS lock (``flock``) before it reads the manifest and holds it until the new manifest is in place, so two
mutations can never both start from the same manifest and silently drop each other's work. The lock file sits
beside the index, ``.<name>.lock`` in its parent folder: it exists before the index does (two jobs building
the same new ``--out`` exclude each other too) and is untouched by the rename that publishes a build.

The OS releases the lock when its holder dies (``kill -9`` included), so there is no stale lock to clear by
hand; a holder that finishes removes the file while it still holds it, and a waiter that then finds its locked
file unlinked retries on the new one, so nothing is left beside the index and two holders never coexist. The
holder writes its pid and command into the file, so the one that has to wait can say who it waits for.
Readers take no lock: they only read manifests, which are replaced atomically.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import time
from pathlib import Path
from types import TracebackType


class IndexLockedError(RuntimeError):
    """Another process (or another writer in this one) is changing the index."""


def lock_path(index_dir: Path) -> Path:
    index_dir = Path(index_dir).absolute()
    return index_dir.parent / f".{index_dir.name}.lock"


class IndexLock:
    """``with IndexLock(index_dir, wait=False): ...``; ``wait`` blocks until the holder is done."""

    def __init__(self, index_dir: str | Path, wait: bool = False, command: str | None = None):
        self.index_dir = Path(index_dir)
        self.path = lock_path(self.index_dir)
        self.wait = wait
        self.command = command or " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> IndexLock:
        if self._fd is not None:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = self._open_locked()
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the holder we waited for removed the file on release: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": self.command,
                                  "since": time.strftime("%Y-%m-%dT%H:%M:%S")}).encode(), 0)
        self._fd = fd
        return self

    def _open_locked(self) -> int:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(fd)
            os.close(fd)
            raise IndexLockedError(f"{self.index_dir} is being changed by {holder}: wait for it to finish, or pass "
                                   f"--wait (wait=True) to queue behind it.") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def release(self) -> None:
        """Remove the lock file while still holding it (a waiter then sees it is stale and retries), then unlock."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> IndexLock:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether the locked descriptor is still the file at ``path`` (not one a releasing holder unlinked)."""
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _describe(fd: int) -> str:
    """Who holds the lock, from what it wrote into the file (it may not have written yet)."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    return f"pid {info['pid']} ({info.get('command', '?')}, since {info.get('since', '?')})"
