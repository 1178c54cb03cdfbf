"""Publishing a file or folder so that a reader sees the old version or the new one, never half of either.

Every file the project makes visible (manifests, shards' parts, checkpoints, journals, reports) goes through
:func:`atomic_path`: the writer fills a uniquely named temporary file beside the target, which is flushed to disk
and renamed over the target (``os.replace`` is atomic within a filesystem); the directory is synced too, so
the rename survives a power cut. The temporary file is created with the process's umask (0644 by default,
not ``mkstemp``'s 0600), so a service running as another user can read what a build published. Folders go the
same way (:func:`atomic_dir`: filled under a temporary name, then swapped in). A failure or a kill leaves at
most a ``.<name>.<random>.tmp`` file or folder, which the next mutation removes (``TEMP_SUFFIX``;
:func:`remove_path` removes either kind).

A full disk surfaces from many layers in many shapes (``OSError`` 28, numpy's short writes, FAISS's
RuntimeError, Seismic's and Lucene's messages); :func:`reporting_full_disk` turns every one of them into one
:class:`DiskFullError` that names the place and the fix, so the command line prints one line, not a traceback.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

TEMP_SUFFIX = ".tmp"
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How a full disk reads when a layer drops the errno: the OS's own words (Java, FAISS, Seismic's Rust
# "StorageFull"), and numpy's short write ("192000 requested and 92128 written").
_FULL_TEXT = re.compile(r"No space left on device|Disk quota exceeded|StorageFull|\d+ requested and \d+ written")
_RENAME_EXCHANGE = 2  # renameat2(2) flag: swap two paths atomically


class DiskFullError(OSError):
    """The disk (or the quota) filled while something was being written; the message says where and what to do."""

    def __init__(self, message: str):
        super().__init__(message)
        self.errno = errno.ENOSPC


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says that a write found no space."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in _FULL_ERRNOS:
            return True
        if _FULL_TEXT.search(str(current)):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextlib.contextmanager
def reporting_full_disk(where: str | Path, what: str, then: str) -> Iterator[None]:
    """Raise a :class:`DiskFullError` in place of any full-disk error inside the block: "No space left on device
    while ``what`` (``where``, the file it failed on): free space ... ``then``"."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not is_disk_full(error):
            raise
        raise DiskFullError(f"No space left on device while {what} ({_failed_write(error)}; "
                            f"{_free_space(Path(where))}). Free space on that disk, or use another one, and run the "
                            f"same command again: {then}") from error


def _failed_write(error: BaseException) -> str:
    """'writing <file>' when the error names it, else the start of what the failing layer said."""
    filename = getattr(error, "filename", None)
    if filename:
        return f"writing {filename}"
    said = " ".join(str(error).split()) or type(error).__name__
    return f"{type(error).__name__}: {said[:160]}{'...' if len(said) > 160 else ''}"


def _free_space(where: Path) -> str:
    """'N MiB free on <the folder checked>' for the nearest existing folder of ``where``."""
    folder = where
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        stat = os.statvfs(folder)
    except OSError:
        return f"free space on {folder} unknown"
    return f"{stat.f_bavail * stat.f_frsize / 2**20:.1f} MiB free on {folder}"


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (unique across processes and threads)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it replaces ``path`` durably."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask decides the mode
    try:
        yield tmp
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary folder to fill with ``path``'s new content; on success it replaces ``path``
    (:func:`replace_dir`). A failure removes it; a kill leaves it as a ``*.tmp`` folder for the next sweep."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target``. An existing ``target`` is swapped out in one step where the
    filesystem can (``renameat2`` RENAME_EXCHANGE), else renamed aside first (a reader between the two renames
    finds no folder, never a mixture); the old content is removed afterwards."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now holds the old content
    else:
        aside = temp_path(target)
        os.replace(target, aside)
        os.replace(new, target)
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(target.parent)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the call or the filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_cwd = -100
    done = renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), _RENAME_EXCHANGE)
    return done == 0


def remove_path(path: Path) -> None:
    """Remove a leftover, file or folder alike (a kill can leave either under a temporary name)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def discard_dir(path: Path, name: str) -> None:
    """Remove the folder ``path`` so that it vanishes at once: renamed to ``name`` (a sibling the next sweep
    recognises), then deleted; a kill during the deletion leaves ``name``, never a half-emptied ``path``."""
    path = Path(path)
    grave = path.with_name(name)
    try:
        os.replace(path, grave)
    except FileNotFoundError:
        return
    shutil.rmtree(grave, ignore_errors=True)


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text is UTF-8) to ``path`` atomically; returns ``path``."""
    payload = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_dir(folder: Path) -> None:
    """Make renames inside ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
