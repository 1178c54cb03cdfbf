"""Publishing a change of an index in one atomic step, and finishing one that a kill interrupted.

Why: a reader resolves an index through one committed pointer, ``manifest.json``, which names immutable shard
folders and tombstone files; a change is visible once, and only once, the manifest that names it is renamed into
place. A change that brings new shards (a new build, an append, an overwrite) must first move them into the index
folder, and a kill between those moves and the manifest's rename used to leave shards that no manifest named and a
job whose journal pointed at the build folder they had left (issue 36's D5), or, for an overwrite that renamed
whole folders, no index at all at the path (D8). So a publish is a small redo log:

1. the *intent* (``.publishing.json`` in the index folder, written atomically) records the manifest to publish,
   a digest of the manifest it replaces, the renames that bring the new parts in and the files to drop;
2. the renames, each done only while its source is still there (so doing them again is harmless);
3. the manifest, written atomically: the commit point. Readers see the old index up to this rename and the new
   one after it, and an overwrite never renames the index folder itself, so the path always holds an index;
4. the removals (an overwrite's stale ``skipped.parquet``), then the intent is deleted.

Every writer calls :func:`finish_interrupted_publish` under the index's lock before it reads the manifest: an
intent that a kill left is carried to its end by the same steps, or dropped when it can no longer complete (its
parts are gone, or the manifest is not the one it replaced). An index left by a version that renamed folders
(``.<name>.retired-*`` without an index at the path) is put back the same way.

Nothing a reader may be using is removed by a publish. A reader resolves the manifest and then opens the parts it
names (some lazily, on first use), so the shards an overwrite replaced and the tombstones a delete replaced must
outlive the manifest that named them: just before the rename, the parts the new manifest drops are recorded with
the time in ``.retired.json``, and a sweep (the next mutation's) removes a retired part only once it has been
retired for :data:`RETIRED_GRACE_S`. Without that, two mutations a moment apart would remove what a reader of the
first had just resolved.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from stair_search.atomic import TEMP_SUFFIX, atomic_write, fsync_dir, remove_path
from stair_search.index.layout import MANIFEST, SHARDS

INTENT_FILE = ".publishing.json"
INTENT_FORMAT = 1
RETIRED_FILE = ".retired.json"  # {part's path in the index: when the manifest stopped naming it (Unix time)}
RETIRED_GRACE_S = 120.0  # a retired part outlives its manifest by this much, for the readers that resolved it
Move = tuple[Path, Path]  # (source beside the index, target inside it)


def publish(index_dir: Path, manifest: dict[str, Any], moves: Sequence[Move] = (),
            removals: Sequence[Path] = ()) -> None:
    """Make ``manifest`` the index's after renaming ``moves`` in and before deleting ``removals`` (see the module
    docstring). Call under the index's lock. Without moves or removals it is the manifest's atomic write alone."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        index_dir.mkdir(parents=True)
        fsync_dir(index_dir.parent)
    if not moves and not removals:
        commit_manifest(index_dir, manifest)
        return
    intent = {"format": INTENT_FORMAT, "replaces": manifest_digest(index_dir), "manifest": manifest,
              "moves": [[_relative(src, index_dir.parent), _relative(dst, index_dir)] for src, dst in moves],
              "remove": [_relative(path, index_dir) for path in removals]}
    atomic_write(index_dir / INTENT_FILE, json.dumps(intent))
    carry_out(index_dir, intent)


def finish_interrupted_publish(index_dir: Path) -> str | None:
    """Under the lock: finish (or drop) a publish a kill interrupted; put back an index an old-style overwrite
    left renamed aside. Returns what was done ("finished", "dropped", "restored") or None."""
    index_dir = Path(index_dir)
    if _restore_retired(index_dir):
        return "restored"
    if index_dir.is_dir():  # a kill in a publish's atomic write leaves its temporary file
        for leftover in index_dir.glob(f".*{TEMP_SUFFIX}"):
            remove_path(leftover)
    path = index_dir / INTENT_FILE
    if not path.is_file():
        return None
    intent = _read_intent(path, index_dir)
    if intent is None or intent["replaces"] != manifest_digest(index_dir) or not _completable(index_dir, intent):
        drop_intent(index_dir)
        return "dropped"
    carry_out(index_dir, intent)
    return "finished"


def carry_out(index_dir: Path, intent: dict[str, Any]) -> None:
    """Steps 2-4 of a publish (each safe to repeat)."""
    for source, target in intent["moves"]:
        move_in(index_dir.parent / source, index_dir / target)
    commit_manifest(index_dir, intent["manifest"])
    for name in intent["remove"]:
        remove_path(index_dir / name)
    drop_intent(index_dir)


def move_in(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target`` unless an earlier run already did (``source`` is gone)."""
    if not source.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and source.is_dir():  # a copy no manifest names (names are fresh): this one replaces it
        remove_path(target)
    os.replace(source, target)
    fsync_dir(target.parent)
    fsync_dir(source.parent)


def commit_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """Record what ``manifest`` stops naming as retired now, then make it the index's manifest."""
    dropped = _parts(_read_json(index_dir / MANIFEST)) - _parts(manifest)
    if dropped:
        now = time.time()
        record = read_retired(index_dir)
        record.update({part: now for part in sorted(dropped)})
        atomic_write(index_dir / RETIRED_FILE, json.dumps(record, indent=1))
    write_manifest(index_dir, manifest)


def write_manifest(index_dir: Path, manifest: dict[str, Any]) -> None:
    """The commit point: the manifest file replaced by one rename (as ``Manifest.save`` writes it)."""
    atomic_write(index_dir / MANIFEST, json.dumps(manifest, indent=2))


def read_retired(index_dir: Path) -> dict[str, float]:
    """Retired parts (their path in the index) and when they were retired; {} when none or unreadable."""
    record = _read_json(Path(index_dir) / RETIRED_FILE)
    if not isinstance(record, dict):
        return {}
    return {str(part): float(when) for part, when in record.items() if isinstance(when, int | float)}


def in_grace(index_dir: Path) -> set[str]:
    """Parts retired less than :data:`RETIRED_GRACE_S` ago: a sweep keeps them (readers may still open them)."""
    now = time.time()
    return {part for part, when in read_retired(index_dir).items() if now - when < RETIRED_GRACE_S}


def forget_retired(index_dir: Path) -> None:
    """Drop the record's entries for parts that are gone (after a sweep)."""
    index_dir = Path(index_dir)
    record = read_retired(index_dir)
    kept = {part: when for part, when in record.items() if (index_dir / part).exists()}
    if kept == record:
        return
    if kept:
        atomic_write(index_dir / RETIRED_FILE, json.dumps(kept, indent=1))
    else:
        (index_dir / RETIRED_FILE).unlink(missing_ok=True)


def _parts(manifest: object) -> set[str]:
    """The paths a manifest names in its index: each shard folder and its tombstone file."""
    parts: set[str] = set()
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    for shard in shards if isinstance(shards, list) else []:
        if isinstance(shard, dict) and isinstance(shard.get("name"), str):
            parts.add(f"{SHARDS}/{shard['name']}")
            if isinstance(shard.get("deleted"), str):
                parts.add(f"{SHARDS}/{shard['name']}/{shard['deleted']}")
    return parts


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def drop_intent(index_dir: Path) -> None:
    (index_dir / INTENT_FILE).unlink(missing_ok=True)
    fsync_dir(index_dir)


def manifest_digest(index_dir: Path) -> str | None:
    """SHA-256 of the manifest's bytes (None when there is none): which version an intent replaces."""
    try:
        return hashlib.sha256((Path(index_dir) / MANIFEST).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def discarded_folders(index_dir: Path) -> list[Path]:
    """Folders beside the index that were being deleted when a kill came (``atomic.discard_dir``)."""
    index_dir = Path(index_dir)
    return sorted(index_dir.parent.glob(f".{index_dir.name}.removing-*")) if index_dir.parent.is_dir() else []


def discarded_name(index_dir: Path, tag: str) -> str:
    """The name a folder beside the index gets while it is deleted (swept by the next mutation if a kill comes)."""
    return f".{Path(index_dir).name}.removing-{tag}"


def _completable(index_dir: Path, intent: dict[str, Any]) -> bool:
    """Whether every shard the intent's manifest names is in the index already or on its way in."""
    arriving = {index_dir / target for source, target in intent["moves"] if (index_dir.parent / source).exists()}
    for shard in intent["manifest"].get("shards", []):
        folder = index_dir / SHARDS / str(shard.get("name"))
        if not (folder.is_dir() or folder in arriving):
            return False
    return True


def _read_intent(path: Path, index_dir: Path) -> dict[str, Any] | None:
    """The intent, or None when it is not one this version can carry out safely (then it is dropped)."""
    try:
        intent = json.loads(path.read_text(encoding="utf-8"))
        moves, removals = intent["moves"], intent["remove"]
        ok = (intent["format"] == INTENT_FORMAT and isinstance(intent["manifest"], dict)
              and all(_plain_relative(s) and s.startswith(f".{index_dir.name}.") and _plain_relative(t)
                      for s, t in moves)
              and all(_plain_relative(r) for r in removals))
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None
    return intent if ok else None


def _plain_relative(path: object) -> bool:
    """A relative path that stays below its base: no absolute start, no ``..``, no empty part."""
    if not isinstance(path, str) or not path or path.startswith("/"):
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def _relative(path: Path, base: Path) -> str:
    """``path`` relative to ``base``; a path elsewhere is refused (a publish only renames within one folder)."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(base)).as_posix()
    except ValueError:
        raise ValueError(f"{path} is not inside {base}: a publish renames parts within the index's own folder "
                         f"(build folders are made beside the index, on the same filesystem).") from None


def _restore_retired(index_dir: Path) -> bool:
    """An overwrite by an earlier version renamed the old index to ``.<name>.retired-*`` and then the build into
    place; a kill between the two left no index at the path. Put the old one back (no build is half-published)."""
    if index_dir.exists() and any(index_dir.iterdir()):
        return False
    retired = [p for p in index_dir.parent.glob(f".{index_dir.name}.retired-*") if (p / MANIFEST).is_file()]
    if not retired:
        return False
    if index_dir.exists():
        index_dir.rmdir()  # empty
    os.replace(max(retired, key=lambda p: (p / MANIFEST).stat().st_mtime_ns), index_dir)
    fsync_dir(index_dir.parent)
    return True
