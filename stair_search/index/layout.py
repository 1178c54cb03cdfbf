"""Where everything of an index lives on disk: the one module both the writer and the reader import.

Layout of an index directory::

    manifest.json                                                (Manifest: the commit point)
    skipped.parquet                                              (items a job could not index, optional)
    shards/<name>/sparse/{indptr,indices,values}.npy + lucene/   (SparseShard)
    shards/<name>/dense.faiss                                    (DenseShard)
    shards/<name>/features.arrow, features.local.npy,            (FeatureStore, format 2, memory-mapped; a
                  features.local_positions.npy                    shard written before it: features.parquet)
    shards/<name>/deleted-<id>.npy                               (tombstones: deleted rows, optional)

and beside it, in the parent folder: ``.<name>.lock`` (the mutation lock while one is held, index/lock.py),
``.<name>.building-*`` (a build not yet published) and ``.<name>.job-*`` (a resumable job, indexer/journal.py).
Only what the manifest lists counts: anything else in the directory is either a part a later manifest replaced
(recorded in ``.retired.json``: kept 120 s for the readers that resolved it, then removed by the next mutation,
index/publish.py) or a leftover of an interrupted mutation, which the next mutation removes (:func:`leftovers`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from stair_search.atomic import TEMP_SUFFIX

MANIFEST = "manifest.json"
SHARDS = "shards"
DENSE_FILE = "dense.faiss"
FEATURES_FILE = "features.arrow"  # its arrays beside it: store.array_paths
LEGACY_FEATURES_FILE = "features.parquet"  # format 1 store of a shard written before format 2
SPARSE_DIR = "sparse"
SKIPPED_REPORT = "skipped.parquet"
TOMBSTONE_PREFIX = "deleted-"


def shard_dir(index_dir: Path, name: str) -> Path:
    return Path(index_dir) / SHARDS / name


def shard_name(position: int) -> str:
    """Unique even across appends, ordered by creation."""
    return f"{position:05d}-{uuid.uuid4().hex[:6]}"


def building_dir(index_dir: Path) -> Path:
    """Hidden sibling where new shards are built before they are published."""
    index_dir = Path(index_dir)
    return index_dir.parent / f".{index_dir.name}.building-{uuid.uuid4().hex[:8]}"


def retired_dir(index_dir: Path) -> Path:
    """Hidden sibling an overwritten index is moved to before it is removed."""
    index_dir = Path(index_dir)
    return index_dir.parent / f".{index_dir.name}.retired-{uuid.uuid4().hex[:8]}"


def stale_builds(index_dir: Path) -> list[Path]:
    """Build and retired folders of earlier writers of ``index_dir`` (stale while the caller holds the lock)."""
    index_dir = Path(index_dir)
    if not index_dir.parent.is_dir():
        return []
    return sorted([*index_dir.parent.glob(f".{index_dir.name}.building-*"),
                   *index_dir.parent.glob(f".{index_dir.name}.retired-*")])


def tombstone_name() -> str:
    return f"{TOMBSTONE_PREFIX}{uuid.uuid4().hex[:8]}.npy"


def read_tombstone(folder: Path, name: str | None, shard: str) -> np.ndarray:
    """Sorted deleted rows of a shard (empty when none); a listed file that is gone is an error."""
    if not name:
        return np.zeros(0, dtype=np.int64)
    path = Path(folder) / name
    if not path.is_file():
        raise FileNotFoundError(f"Index shard {shard}: its tombstone file {path} is missing, so deleted documents "
                                f"would come back. Restore the file or rebuild the index.")
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"Index shard {shard}: its tombstone file {path} is unreadable ({exc}). Restore the file "
                         f"or rebuild the index.") from exc
    return np.asarray(rows, dtype=np.int64)


def leftovers(index_dir: Path, listed: dict[str, str | None], keep: Iterable[str] = ()) -> Iterator[Path]:
    """Files and folders in ``index_dir`` that no manifest lists: shards a crashed append moved in, tombstones of
    a crashed delete, temporary files. ``listed``: shard name -> its tombstone file; ``keep``: shard names a
    resumed job still owns."""
    index_dir = Path(index_dir)
    keep = set(keep)
    yield from (p for p in index_dir.glob(f".*{TEMP_SUFFIX}"))
    root = index_dir / SHARDS
    if not root.is_dir():
        return
    for folder in root.iterdir():
        if folder.name not in listed:
            if folder.name not in keep:
                yield folder
            continue
        for path in folder.iterdir():
            stray_tombstone = path.name.startswith(TOMBSTONE_PREFIX) and path.name != listed[folder.name]
            if stray_tombstone or path.name.endswith(TEMP_SUFFIX):
                yield path
