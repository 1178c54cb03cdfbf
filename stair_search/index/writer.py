"""IndexWriter: the one way an index changes (new build, append, overwrite, delete; the indexing job drives it).

A writer takes the index's mutation lock (index/lock.py) before it reads the manifest and keeps it until the new
manifest is in place, so concurrent mutations queue (``wait=True``) or stop at once naming the holder, and no
mutation ever starts from a manifest another one is about to replace. Under the lock it first finishes a publish
that a kill interrupted (index/publish.py), then removes what interrupted mutations left and what no reader needs
any more (layout.leftovers): shards no manifest lists (an overwrite's replaced shards among them), replaced
tombstones, temporary files and folders.

New shards are always built in a hidden sibling folder (or the job's own build folder) and become visible only
at :meth:`IndexWriter.commit`, through one protocol for a new index, an append and an overwrite alike
(index/publish.py): the shards are moved into the index folder under fresh names no manifest lists, then the
manifest that names them replaces the old one in one rename. Deletes write fresh per-shard tombstone files that
count only once the manifest names them. A reader therefore sees the previous complete index or the new one,
never a mixture, and a kill at any step leaves one of the two at the path.

Shards are merged, and deleted rows dropped, through the same writer (index/merge.py): the live rows of a run
of adjacent shards are added again and :meth:`IndexWriter.replace` makes the new shard take the run's place at
the publish; after each append and delete the index's merge policy picks such runs by itself (``merge``).

One shard-cutting rule: whole batches are queued, and a shard is written as soon as ``shard_size`` documents are
queued (so a shard holds up to ``shard_size + batch - 1`` documents; a resumed job cuts exactly where the first
run did, since it replays the same batches).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

import numpy as np
import pyarrow.parquet as pq

from stair_search.atomic import TEMP_SUFFIX, atomic_path, remove_path, reporting_full_disk
from stair_search.index.dense import DenseShard, DenseSpec
from stair_search.index.layout import (
    DENSE_FILE,
    FEATURES_FILE,
    MANIFEST,
    SKIPPED_REPORT,
    SPARSE_DIR,
    building_dir,
    leftovers,
    read_tombstone,
    shard_dir,
    shard_name,
    stale_builds,
    tombstone_name,
)
from stair_search.index.lock import IndexLock
from stair_search.index.manifest import Manifest, ModelRecord, ShardInfo
from stair_search.index.merge import MergePolicy, model_record, plan_policy, rewrite
from stair_search.index.publish import (
    Move,
    discarded_folders,
    finish_interrupted_publish,
    forget_retired,
    in_grace,
    publish,
)
from stair_search.index.seismic import build_seismic
from stair_search.index.skipped import Skip, write_skipped_report
from stair_search.index.sparse import CSR, DEFAULT_SCALE, available_cores, concat_csr, to_csr, write_sparse_shard
from stair_search.index.store import FeatureRecord, FeatureStore, store_path, write_features
from stair_search.index.text import DEFAULT_TEXT_FIELDS, TEXT_DIR, build_text_index, document_text
from stair_search.vectors import EncodedBatch


@dataclass
class DeleteResult:
    deleted: list[str]  # ids that were live and are now deleted
    unknown: list[str]  # ids the index does not hold (or that were deleted before)


class IndexWriter:
    """``with IndexWriter(out, encoder.record) as writer: writer.add(...); writer.commit()``.

    ``model``: what the index records of the model its vectors come from (``Encoder.record``); None opens an
    existing index for deletes only. ``append`` adds to an existing index (or builds a new one if there is none);
    ``overwrite`` replaces one. ``build_dir`` and ``resumed`` are for a resumable job: the folder its shards are
    built in, and the shards an earlier run of it already wrote (kept, not cleaned up).
    ``lock``: a lock the caller already holds (the job takes it before reading its journal).
    ``merge``: apply the merge policy after publishing (index/merge.py); None: as the index's manifest says
    (on unless it was switched off).
    """

    def __init__(self, index_dir: str | Path, model: ModelRecord | None = None, *, append: bool = False,
                 overwrite: bool = False, shard_size: int = 100_000, dense_spec: DenseSpec | None = None,
                 scale: float = DEFAULT_SCALE, threads: int | None = None, wait: bool = False,
                 text_fields: Sequence[str] | None = DEFAULT_TEXT_FIELDS,
                 build_dir: Path | None = None, resumed: Sequence[ShardInfo] = (), lock: IndexLock | None = None,
                 merge: bool | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.index_dir = Path(index_dir)
        self.model, self.shard_size, self.dense_spec, self.threads = model, shard_size, dense_spec, threads
        self.merge = merge
        self._own_lock = lock is None
        self.lock = (lock or IndexLock(self.index_dir, wait=wait)).acquire()
        self._own_build = build_dir is None
        self.build_dir = Path(build_dir) if build_dir else building_dir(self.index_dir)
        try:
            finish_interrupted_publish(self.index_dir)
            self.manifest, self.appending = self._start(append, overwrite, scale, text_fields)
            self._remove_leftovers([s.name for s in resumed])
        except BaseException:
            self._release()
            raise
        self.written: list[ShardInfo] = list(resumed)  # shards of this writer, not yet published
        self._pending: list[tuple[list[FeatureRecord], np.ndarray, CSR]] = []
        self._pending_count = 0  # documents in ``_pending``
        self._new_tombstones: list[Path] = []  # written by ``delete``: the manifest has changed
        self._replacing: list[tuple[list[str], str | None]] = []  # (replaced shards, the shard in their place)
        self._staged: list[Move] = []  # files published into the index folder with the shards (stage_file)
        self.settings_changed = False  # set by the caller after changing the manifest's settings (merge_policy)
        self.committed = False

    # ------------------------------------------------------------------------------------------ opening

    def _start(self, append: bool, overwrite: bool, scale: float,
               text_fields: Sequence[str] | None) -> tuple[Manifest, bool]:
        exists = (self.index_dir / MANIFEST).is_file()
        if self.model is None:  # deletes: the index must exist
            return Manifest.load(self.index_dir), True
        if exists and append:
            manifest = Manifest.load(self.index_dir)
            manifest.check_model(self.model)
            return manifest, True
        if exists and not overwrite:
            raise FileExistsError(f"{self.index_dir} already holds an index: pass append=True (--append) to add "
                                  f"to it or overwrite=True (--overwrite) to replace it.")
        return Manifest.new(self.model, scale, list(text_fields) if text_fields else None), False

    def _remove_leftovers(self, keep: Sequence[str]) -> None:
        """Under the lock nobody else is mid-mutation: whatever is beside or in the index that the manifest on
        disk does not name is stale (an earlier writer's build, a shard an overwrite replaced, a tombstone a delete
        replaced, a temporary file or folder), except the shards ``keep`` names (a resumed job's)."""
        for folder in [*stale_builds(self.index_dir), *discarded_folders(self.index_dir)]:
            shutil.rmtree(folder, ignore_errors=True)
        listed = self._listed_on_disk()
        if listed is None:
            return
        kept = in_grace(self.index_dir)  # retired a moment ago: a reader may have just resolved them
        for path in list(leftovers(self.index_dir, listed, keep)):
            if path.relative_to(self.index_dir).as_posix() not in kept:
                remove_path(path)
        for name in listed:  # temporary files and folders deeper in a shard (sparse/.accelerated.*.tmp)
            for path in sorted(shard_dir(self.index_dir, name).rglob(f"*{TEMP_SUFFIX}"), reverse=True):
                remove_path(path)
        forget_retired(self.index_dir)

    def _listed_on_disk(self) -> dict[str, str | None] | None:
        """Shard name -> tombstone of the manifest on disk ({} for a folder without one); None when there is no
        folder, or its manifest cannot be read (an overwrite may replace a damaged index: nothing is swept)."""
        if not self.index_dir.is_dir():
            return None
        if not (self.index_dir / MANIFEST).is_file():
            return {}
        try:
            on_disk = self.manifest if self.appending else Manifest.load(self.index_dir)
        except (ValueError, TypeError, KeyError):
            return None
        return {s.name: s.deleted for s in on_disk.shards}

    # ------------------------------------------------------------------------------------------ adding

    def add(self, records: Sequence[FeatureRecord], encoded: EncodedBatch) -> ShardInfo | None:
        """Queue one encoded batch (its local features go into the records); returns the shard it completed."""
        if len(records) != len(encoded):
            raise ValueError(f"{len(records)} records but {len(encoded)} encoded items.")
        records = list(records)
        if encoded.local is not None:
            for record, local, positions in zip(records, encoded.local, encoded.local_positions, strict=True):
                record.local, record.local_positions = local, positions
        csr = to_csr(encoded.sparse, self._vocabulary(), self.manifest.scale)
        return self.add_quantised(records, encoded.dense, csr)

    def add_quantised(self, records: Sequence[FeatureRecord], dense: np.ndarray, csr: CSR) -> ShardInfo | None:
        """Queue a batch whose sparse vectors are already the index's integer impacts (a job's spooled chunk)."""
        if len(records) != len(dense) or len(records) != len(csr[0]) - 1:
            raise ValueError(f"{len(records)} records, {len(dense)} dense and {len(csr[0]) - 1} sparse vectors.")
        if records:
            self._pending.append((list(records), np.asarray(dense), csr))
            self._pending_count += len(records)
        if self._pending_count >= self.shard_size:
            return self.flush()
        return None

    def flush(self) -> ShardInfo | None:
        """Write the queued batches as one shard now (in the build folder: not visible before ``commit``)."""
        if not self._pending:
            return None
        records = [r for recs, _, _ in self._pending for r in recs]
        dense = np.concatenate([d for _, d, _ in self._pending])
        csr = concat_csr([c for _, _, c in self._pending])
        name = self._fresh_name(len(self.manifest.shards if self.appending else ()) + len(self.written))
        shard = write_shard(self.build_dir, name, records, dense, csr, self._vocabulary(), self.dense_spec,
                            self.threads, self.manifest.text_fields)
        self.written.append(shard)
        self._pending, self._pending_count = [], 0
        return shard

    def _fresh_name(self, position: int) -> str:
        """A shard name no folder in the index or the build folder has (an overwrite's old shards stay a while)."""
        while True:
            name = shard_name(position)
            if not (shard_dir(self.index_dir, name).exists() or shard_dir(self.build_dir, name).exists()):
                return name

    def _vocabulary(self):
        if self.model is None:
            raise ValueError(f"{self.index_dir} was opened for deletes only: give the model record to add documents.")
        return self.model.vocabulary

    def replace(self, names: Sequence[str]) -> ShardInfo | None:
        """Write what was queued since the last shard as the one shard that takes the place of the adjacent
        published shards ``names`` (in manifest order) at the publish; None (they just go) when nothing was."""
        known = [s.name for s in self.manifest.shards]
        if not self.appending or not names or not set(names) <= set(known):
            raise ValueError(f"{self.index_dir}: only published shards can be replaced, got {list(names)}")
        first = known.index(names[0])
        if known[first:first + len(names)] != list(names):
            raise ValueError(f"{self.index_dir}: shards {list(names)} are not adjacent in the manifest; only a run "
                             f"of adjacent shards keeps every document's order when replaced by one.")
        shard = self.flush()
        self._replacing.append((list(names), shard.name if shard else None))
        return shard

    def stage_file(self, path: Path, name: str) -> None:
        """Publish the file ``path`` (written in the build folder) as ``name`` in the index folder at the commit,
        in the one atomic publish with the shards and the manifest that names it."""
        self._staged.append((Path(path), self.index_dir / name))

    # ------------------------------------------------------------------------------------------ deleting

    def delete(self, ids: Iterable[str]) -> DeleteResult:
        """Delete documents by id without a rebuild: their rows go into fresh per-shard tombstone files.

        Why tombstones: a Lucene, FAISS and parquet rewrite per delete would cost a rebuild of the shard. The
        new files count once ``commit`` swaps the manifest; a kill before that leaves files no manifest names,
        which the next mutation removes."""
        if not self.appending:
            raise ValueError(f"{self.index_dir} is not published yet: nothing to delete from.")
        pending = list(dict.fromkeys(str(i) for i in ids))
        deleted: list[str] = []
        for shard in self.manifest.shards:
            if not pending:
                break
            folder = shard.path(self.index_dir)
            dead = read_tombstone(folder, shard.deleted, shard.name)
            rows_here = _live_rows_of(folder, pending, set(dead.tolist()))
            if not rows_here:
                continue
            all_dead = np.union1d(dead, np.fromiter(rows_here.values(), dtype=np.int64))
            shard.deleted = _write_tombstone(folder, all_dead)
            self._new_tombstones.append(folder / shard.deleted)
            shard.deleted_count = len(all_dead)
            deleted.extend(rows_here)
            pending = [i for i in pending if i not in rows_here]
        return DeleteResult(deleted=deleted, unknown=pending)

    # ------------------------------------------------------------------------------------------ publishing

    def commit(self, skipped: Sequence[Skip] = (), job: str | None = None, merge: bool = True,
               keep_report: bool = True) -> Manifest:
        """Publish everything (index/publish.py: the new shards moved in, then the manifest replaced in one rename)
        and release the lock. ``skipped``: items a job could not index, kept in the index's ``skipped.parquet``
        (after its earlier rows; ``keep_report=False``: in their place, as a sync's report says what is unreadable
        now); ``job``: the key of the job that wrote them; ``merge``: apply the merge policy now (a job does it
        itself, :meth:`apply_policy`, once its journal is gone)."""
        self.flush()
        if job and job not in self.manifest.jobs:
            self.manifest.jobs.append(job)
        try:
            self._publish(skipped, keep_report)
            if self._own_build:
                shutil.rmtree(self.build_dir, ignore_errors=True)
            self.committed = True
            if merge:
                self.apply_policy()
            return self.manifest
        finally:
            self._release()

    def apply_policy(self) -> Manifest:
        """After a commit that appended or deleted: the merges the index's policy asks for, as one more publish
        under the same lock (the change itself is already published: a kill here leaves it, unmerged). Returns
        the manifest published last. The caller holds the lock (``commit`` calls it before releasing its own)."""
        policy = MergePolicy.from_dict(self.manifest.merge_policy)
        wanted = self.merge if self.merge is not None else policy.enabled
        if not (self.committed and wanted and (self.written or self._new_tombstones)):
            return self.manifest
        groups = plan_policy(self.manifest.shards, replace(policy, enabled=True), self.shard_size,
                             appended=bool(self.written))
        if not groups:
            return self.manifest
        with IndexWriter(self.index_dir, self.model or model_record(self.manifest), append=True,
                         shard_size=sys.maxsize, threads=self.threads, lock=self.lock, merge=False) as merger:
            rewrite(merger, groups)
            self.manifest = merger.commit()
        return self.manifest

    def _publish(self, skipped: Sequence[Skip], keep_report: bool = True) -> None:
        """What the new manifest no longer names (shards an overwrite replaced, tombstones a delete replaced) is
        retired, not removed: a reader that resolved the previous manifest a moment ago (a search, a cluster's
        shard replica starting now) can still open it (see index/publish.py)."""
        if not self.appending and not self.written:
            raise ValueError("No documents were added: nothing to index.")
        known = {s.name for s in self.manifest.shards} if self.appending else set()
        new = [s for s in self.written if s.name not in known]  # known: published by an earlier, killed run
        moves: list[Move] = [*((s.path(self.build_dir), s.path(self.index_dir)) for s in new), *self._staged]
        report_moves, removals = self._stage_report(skipped, keep_report)
        self.manifest.shards = self._shards_after(new)
        if (new or self._staged or report_moves or removals or self._new_tombstones or self._replacing
                or self.settings_changed or not self.appending):
            publish(self.index_dir, self.manifest.to_dict(), [*moves, *report_moves], removals)

    def _shards_after(self, new: Sequence[ShardInfo]) -> list[ShardInfo]:
        """The published shards with each replaced run swapped for its new shard (in the run's place), then the
        other new shards."""
        by_name = {s.name: s for s in new}
        first = {names[0]: by_name.get(name) if name else None for names, name in self._replacing}
        gone = {n for names, _ in self._replacing for n in names}
        placed = {name for _, name in self._replacing if name}
        shards: list[ShardInfo] = []
        for shard in self.manifest.shards if self.appending else ():
            if first.get(shard.name) is not None:
                shards.append(first[shard.name])
            if shard.name not in gone:
                shards.append(shard)
        return [*shards, *(s for s in new if s.name not in placed)]

    def _stage_report(self, skipped: Sequence[Skip], keep_report: bool) -> tuple[list[Move], list[Path]]:
        """The index's next ``skipped.parquet``, written in the build folder to be moved in with the shards (an
        append's keeps the earlier rows unless ``keep_report`` is off); an overwrite (or a sync) without skips
        drops the old report, and a report that would not change is not written again."""
        target = self.index_dir / SKIPPED_REPORT
        earlier = [(r["id"], r["source"], r["reason"]) for r in pq.read_table(target).to_pylist()] \
            if self.appending and target.is_file() else []
        rows = list(dict.fromkeys([*(earlier if keep_report else []), *(tuple(s) for s in skipped)]))
        if self.appending and rows == earlier:
            return [], []
        if rows:
            self.build_dir.mkdir(parents=True, exist_ok=True)
            return [(write_skipped_report(self.build_dir, rows), target)], []
        return [], [target] if target.exists() else []

    def abort(self) -> None:
        """Give up: nothing is published; this writer's unpublished files go (a job keeps its own build folder)."""
        try:
            if self._own_build:
                shutil.rmtree(self.build_dir, ignore_errors=True)
            for path in self._new_tombstones:  # named by no manifest on disk
                path.unlink(missing_ok=True)
        finally:
            self._release()

    def _release(self) -> None:
        if self._own_lock:
            self.lock.release()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if not self.committed:
            self.abort()


def delete_documents(index_dir: str | Path, ids: Iterable[str], wait: bool = False) -> DeleteResult:
    """Delete documents by id (the writer's ``delete`` + ``commit``): the CLI's and ``IndexReader.delete``'s path.
    A full disk is one DiskFullError naming the index (nothing is deleted then)."""
    with reporting_full_disk(index_dir, f"deleting from {index_dir}", "nothing was deleted."), \
            IndexWriter(index_dir, wait=wait) as writer:
        result = writer.delete(ids)
        writer.commit()
    return result


def write_shard(root: Path, name: str, records: Sequence[FeatureRecord], dense: np.ndarray, csr: CSR, vocabulary,
                dense_spec: DenseSpec | None = None, threads: int | None = None,
                text_fields: Sequence[str] | None = None) -> ShardInfo:
    """Write one shard (sparse + dense + features, and the text route's BM25 index when ``text_fields`` gives
    its documents any text) under ``root/shards/name``; rows = ``records`` order."""
    shard = ShardInfo(name=name, count=len(records), dense={})
    folder = shard.path(root)
    write_sparse_shard(folder / SPARSE_DIR, csr, vocabulary, threads=threads)
    build_seismic(folder / SPARSE_DIR, *csr, len(vocabulary.tokens), threads)  # skipped without seismic
    if text_fields:
        texts = [document_text(r.caption, r.metadata, text_fields) for r in records]
        shard.text = build_text_index(folder / TEXT_DIR, texts, threads or available_cores())
    index = DenseShard.build(dense, dense_spec)
    index.save(folder / DENSE_FILE)
    shard.dense = index.spec.to_dict()
    write_features(folder / FEATURES_FILE, records)  # format 2: features.arrow + its memory-mapped arrays
    return shard


def _live_rows_of(shard_dir: Path, ids: Sequence[str], dead: set[int]) -> dict[str, int]:
    with FeatureStore.open(store_path(shard_dir)) as store:  # an index built before format 2: features.parquet
        rows = {doc_id: store.row_of(doc_id) for doc_id in ids}
    return {doc_id: row for doc_id, row in rows.items() if row is not None and row not in dead}


def _write_tombstone(shard_dir: Path, rows: np.ndarray) -> str:
    name = tombstone_name()
    with atomic_path(shard_dir / name) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(rows, dtype=np.int64))
    return name
