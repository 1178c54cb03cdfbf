"""Damaged index files, told apart from bad requests, and memory-mapped files watched for changes in place.

Why: a shard memory-maps its feature store and its sparse vectors, so that opening costs nothing of their size.
A mapped file truncated in place (``truncate -s``, a copy tool writing over it, a disk repair) turns the next
read of a page past its new end into SIGBUS, which no Python code can catch: the whole server dies. So every
mapped file's identity (device, inode, size, modification time) is taken when it is opened and compared before
each read of it; a file that changed is refused with :class:`FileChangedError`, naming it, before the read.
(A change between the check and the read itself remains possible: the check narrows that window to
microseconds; files published by stair-search are never changed in place, only replaced by rename.)

:class:`DamagedIndexError` is what every damaged or tampered index file raises (a manifest that is not the
manifest's schema, a Lucene folder Java cannot read, a file changed under a serving process), so that the
command line ends with one line and exit 1 (not a usage error's exit 2), and the server answers 503 for that
index and keeps serving the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


class DamagedIndexError(ValueError):
    """An index file that is missing, unreadable or not what the manifest promises; the message names it and
    the fix."""


class FileChangedError(DamagedIndexError):
    """A memory-mapped index file changed in place after it was opened."""


@dataclass(frozen=True)
class FileIdentity:
    """What a file was when it was opened: reading its map is safe while these still hold."""

    path: Path
    device: int
    inode: int
    size: int
    modified_ns: int

    @classmethod
    def of(cls, path: Path) -> FileIdentity:
        stat = os.stat(path)
        return cls(Path(path), stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)

    def check(self, owner: str) -> None:
        """Raise FileChangedError (naming ``owner``, e.g. the shard, and the file) if the file changed."""
        try:
            now = os.stat(self.path)  # compared field by field: this runs before every read of every map
        except OSError as exc:
            raise FileChangedError(f"{owner}: {self.path.name} is gone since it was opened ({exc.strerror}); "
                                   f"restore the index's files or publish it again") from None
        if (now.st_dev, now.st_ino, now.st_size, now.st_mtime_ns) != (self.device, self.inode, self.size,
                                                                      self.modified_ns):
            raise FileChangedError(f"{owner}: {self.path.name} changed in place since it was opened (size "
                                   f"{now.st_size} bytes, was {self.size}); restore the file or publish the "
                                   f"index again (stair-search index ... --overwrite); nothing of it is read "
                                   f"until then")


def identities(paths: list[Path]) -> list[FileIdentity]:
    """The identities of those of ``paths`` that exist (regular files)."""
    return [FileIdentity.of(p) for p in paths if os.path.isfile(p)]
