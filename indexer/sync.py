"""Keeping an index in step with its source: ``stair-search index SOURCE --out INDEX --sync``.

A sync is one ordinary job (indexer/job.py) in append mode with a plan made first, under the job's lock: the
source's items the index does not hold are indexed, the documents whose items are gone are deleted, and those
whose items changed are deleted and indexed again under the same id, all published as one new version. What
changed is read from what the index already stores, so a sync keeps no state of its own:

- **folder sources**: each document's ``size`` and ``modified`` (:func:`indexer.sources.file_metadata`, to the
  second, as rsync compares by default) against the file's now; with ``checksum`` the ``sha1`` of its bytes
  (every file is read; a document indexed without a ``sha1`` counts as changed once).
- **lists, CSV, parquet and webdataset sources**, keyed by their ids: new ids are indexed and ids no longer in
  the source deleted; an image changed under the same id is seen only with ``checksum``.

A subfolder that cannot be listed holds nothing back from deletion by mistake: the documents under it are kept
(rsync refuses to delete after an I/O error for the same reason), and the job reports the folder as skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from indexer.sources import Item, SourceOptions, describe, iter_items
from stair_search.index import IndexReader
from stair_search.index.layout import MANIFEST

FILE_FINGERPRINT = ("size", "modified")
CHECKSUM_FINGERPRINT = ("sha1",)

__all__ = ["SyncPlan", "plan_sync"]


@dataclass(frozen=True)
class SyncPlan:
    """What a sync changes. ``unchanged``: ids the index holds as the source has them (not read again)."""

    unchanged: frozenset[str]
    new: int  # items the index does not hold: indexed (an unreadable one is reported skipped, as by any job)
    gone: tuple[str, ...]  # documents whose item the source no longer has: deleted
    changed: tuple[str, ...]  # documents whose item changed: deleted and indexed again under the same id
    kept: int = 0  # documents under a subfolder that could not be listed: neither deleted nor compared

    @property
    def deletions(self) -> list[str]:
        return [*self.gone, *self.changed]

    @property
    def nothing_to_do(self) -> bool:
        return not (self.new or self.gone or self.changed)

    def describe(self) -> str:
        text = f"sync: {self.new} new, {len(self.changed)} changed, {len(self.gone)} gone, " \
               f"{len(self.unchanged)} unchanged"
        if self.kept:
            text += f" ({self.kept} kept under subfolders that could not be listed)"
        return text


def fingerprint_fields(spec: str, options: SourceOptions) -> tuple[str, ...]:
    """The metadata fields that tell a changed item (none: ids alone, see the module docstring)."""
    if options.checksum:
        return CHECKSUM_FINGERPRINT
    return FILE_FINGERPRINT if describe(spec) == "folder" else ()


def plan_sync(spec: str, options: SourceOptions, index_dir: Path, max_bytes: int) -> SyncPlan:
    """Compare the source with the index at ``index_dir`` (the caller holds its mutation lock)."""
    fields = fingerprint_fields(spec, options)
    stored = stored_fingerprints(index_dir, fields)
    folder = describe(spec) == "folder"
    seen: set[str] = set()
    unreadable: list[str] = []  # ids (relative paths) of subfolders that could not be listed
    new, changed, unchanged = 0, [], set()
    for item in iter_items(spec, options, max_bytes):
        if item.id in seen:
            continue  # a duplicate id: the job reports it
        seen.add(item.id)
        if folder and item.problem and item.path is None:  # a subfolder that could not be listed
            unreadable.append(item.id)
        if item.id not in stored:
            new += 1
        elif fields and _fingerprint(item, fields) != stored[item.id]:
            changed.append(item.id)
        else:
            unchanged.add(item.id)
    missing = [doc_id for doc_id in stored if doc_id not in seen]
    gone = [doc_id for doc_id in missing if not _under(doc_id, unreadable)]
    return SyncPlan(unchanged=frozenset(unchanged), new=new, gone=tuple(gone), changed=tuple(changed),
                    kept=len(missing) - len(gone))


def stored_fingerprints(index_dir: Path, fields: tuple[str, ...]) -> dict[str, tuple[Any, ...]]:
    """Every live document's id -> its values of ``fields`` (None where it has none); empty without an index."""
    if not (index_dir / MANIFEST).is_file():
        return {}
    stored: dict[str, tuple[Any, ...]] = {}
    with IndexReader(index_dir) as index:
        for batch in index.live():
            for row in _documents(index, batch, fields):
                metadata = row.get("metadata") or {}
                stored[row["id"]] = tuple(metadata.get(name) for name in fields)
    return stored


def _documents(index: IndexReader, batch: list, fields: tuple[str, ...]) -> Iterator[dict]:
    yield from (row for row in index.documents(batch, ["id", "metadata"] if fields else ["id"]) if row)


def _fingerprint(item: Item, fields: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(item.metadata.get(name) for name in fields)


def _under(doc_id: str, folders: list[str]) -> bool:
    return any(doc_id.startswith(folder.rstrip("/") + "/") for folder in folders)
