"""``stair-search compact`` and ``merge-policy``: compaction now, and the policy the writer follows by itself.

Why a module of its own: these drive the one :class:`IndexWriter` (``writer.py``), which itself applies the merge
policy after each append and delete through ``merge.py`` (what to merge and how a shard's live rows are read
back); keeping them apart keeps the writer from importing what imports it. See ``merge.py`` for why and how
shards are merged.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from stair_search.atomic import reporting_full_disk
from stair_search.index.manifest import Manifest
from stair_search.index.merge import (
    DEFAULT_SHARD_SIZE,
    CompactResult,
    MergePolicy,
    model_record,
    plan_compaction,
    plan_policy,
    rewrite,
)
from stair_search.index.writer import IndexWriter

__all__ = ["CompactResult", "MergePolicy", "compact", "parse_policy", "plan_compaction", "plan_policy",
           "read_policy", "set_merge_policy"]


def compact(index_dir: str | Path, shard_size: int | None = None, wait: bool = False,
            threads: int | None = None) -> CompactResult:
    """Merge an index's shards into as few as ``shard_size`` allows (default: its merge policy's, else
    100,000) and drop its deleted rows from every part, as one locked mutation published atomically."""
    index_dir = Path(index_dir)
    manifest = Manifest.load(index_dir)
    size = shard_size or MergePolicy.from_dict(manifest.merge_policy).shard_size or DEFAULT_SHARD_SIZE
    with reporting_full_disk(index_dir, f"compacting {index_dir}", "the index is as it was."), \
            IndexWriter(index_dir, model_record(manifest), append=True, shard_size=sys.maxsize, wait=wait,
                        threads=threads, merge=False) as writer:
        result = rewrite(writer, plan_compaction(writer.manifest.shards, size))
        writer.commit()
    return result


def read_policy(index_dir: str | Path) -> MergePolicy:
    """The merge policy an index's manifest records (the defaults when it records none)."""
    return MergePolicy.from_dict(Manifest.load(Path(index_dir)).merge_policy)


def parse_policy(settings: Sequence[str], base: MergePolicy) -> MergePolicy:
    """``base`` changed by ``off``, ``on`` and ``name=value`` settings (the command line's form)."""
    changes: dict[str, Any] = {}
    kinds = {f.name: f.type for f in fields(MergePolicy)}
    for setting in settings:
        name, _, value = setting.partition("=")
        if setting in ("on", "off"):
            changes["enabled"] = setting == "on"
        elif name not in kinds or not value:
            raise ValueError(f"merge policy setting {setting!r}: use off, on or NAME=VALUE with NAME one of "
                             f"{sorted(kinds)}")
        elif name == "enabled":
            changes[name] = value.lower() in ("1", "true", "yes", "on")
        else:
            changes[name] = _number(name, value)
    return MergePolicy.from_dict(base.to_dict() | changes)


def _number(name: str, value: str) -> int | float | None:
    if value.lower() == "none" and name == "shard_size":
        return None
    try:
        return float(value) if name == "deleted_fraction" else int(value)
    except ValueError:
        raise ValueError(f"merge policy setting {name}={value!r}: a number is needed") from None


def set_merge_policy(index_dir: str | Path, policy: MergePolicy, wait: bool = False) -> MergePolicy:
    """Record ``policy`` in the index's manifest (a locked, atomic change through the writer); it applies from
    the next append or delete on (``compact`` merges now)."""
    with IndexWriter(index_dir, wait=wait, merge=False) as writer:
        writer.manifest.merge_policy = policy.to_dict()
        writer.settings_changed = True
        writer.commit()
    return policy
