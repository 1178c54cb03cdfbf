"""Building a data folder so that it appears whole or not at all.

A data set or corpus is written into a hidden sibling folder and renamed into place at the end: an interrupted
build never leaves half a data set where a finished one is expected, and a failed one leaves nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def check_replaceable(out_dir: Path, marker: str, kind: str, choose: str) -> None:
    """Refuse to replace a non-empty folder without ``marker`` (not ``kind`` built here: it could hold the user's
    own files); ``choose`` names what to pick instead in the error."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / marker).is_file():
        raise FileExistsError(f"{out_dir} exists and is not {kind} (no {marker}); choose {choose}")


@contextmanager
def building(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``out_dir``; on success it replaces ``out_dir``, on error it is removed."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    try:
        yield folder
        if out_dir.exists():
            shutil.rmtree(out_dir)
        folder.rename(out_dir)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
