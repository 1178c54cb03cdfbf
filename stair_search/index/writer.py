"""IndexWriter: the one way an index changes (new build, append, overwrite, delete; the indexing job drives it).

A writer takes the index's mutation lock (index/lock.py) before it reads the manifest and keeps it until the new
manifest is in place, so concurrent mutations queue (``wait=True``) or stop at once naming the holder, and no
mutation ever starts from a manifest another one is about to replace. Under the lock it first removes what an
interrupted mutation left (layout.leftovers): shards no manifest lists, stray tombstones, temporary files.

New shards are always built in a hidden sibling folder (or the job's own build folder) and become visible only
at :meth:`IndexWriter.commit`: a new index is renamed into place whole, an append moves its shards in and then
swaps the manifest. Deletes write fresh per-shard tombstone files that count only once the manifest names them.
A reader therefore sees the previous complete index or the new one, never a mixture.

One shard-cutting rule: whole batches are queued, and a shard is written as soon as ``shard_size`` documents are
queued (so a shard holds up to ``shard_size + batch - 1`` documents; a resumed job cuts exactly where the first
run did, since it replays the same batches).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from stair_search.atomic import atomic_path
from stair_search.index.dense import DenseShard, DenseSpec
from stair_search.index.layout import (
    DENSE_FILE,
    FEATURES_FILE,
    MANIFEST,
    SPARSE_DIR,
    building_dir,
    leftovers,
    read_tombstone,
    retired_dir,
    shard_name,
    stale_builds,
    tombstone_name,
)
from stair_search.index.lock import IndexLock
from stair_search.index.manifest import Manifest, ModelRecord, ShardInfo
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
    """

    def __init__(self, index_dir: str | Path, model: ModelRecord | None = None, *, append: bool = False,
                 overwrite: bool = False, shard_size: int = 100_000, dense_spec: DenseSpec | None = None,
                 scale: float = DEFAULT_SCALE, threads: int | None = None, wait: bool = False,
                 text_fields: Sequence[str] | None = DEFAULT_TEXT_FIELDS,
                 build_dir: Path | None = None, resumed: Sequence[ShardInfo] = (), lock: IndexLock | None = None):
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.index_dir = Path(index_dir)
        self.model, self.shard_size, self.dense_spec, self.threads = model, shard_size, dense_spec, threads
        self._own_lock = lock is None
        self.lock = (lock or IndexLock(self.index_dir, wait=wait)).acquire()
        try:
            self.manifest, self.appending = self._start(append, overwrite, scale, text_fields)
            self._remove_leftovers([s.name for s in resumed])
        except BaseException:
            self._release()
            raise
        self._own_build = build_dir is None
        self.build_dir = Path(build_dir) if build_dir else building_dir(self.index_dir)
        self.written: list[ShardInfo] = list(resumed)  # shards of this writer, not yet published
        self._pending: list[tuple[list[FeatureRecord], np.ndarray, CSR]] = []
        self._pending_count = 0  # documents in ``_pending``
        self._new_tombstones: list[Path] = []  # written by ``delete``: the manifest has changed
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
        """Under the lock nobody else is mid-mutation: whatever an earlier writer left unpublished is stale."""
        for folder in stale_builds(self.index_dir):
            shutil.rmtree(folder, ignore_errors=True)
        if not self.appending:
            return
        listed = {s.name: s.deleted for s in self.manifest.shards}
        for path in list(leftovers(self.index_dir, listed, keep)):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

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
        name = shard_name(len(self.manifest.shards if self.appending else ()) + len(self.written))
        shard = write_shard(self.build_dir, name, records, dense, csr, self._vocabulary(), self.dense_spec,
                            self.threads, self.manifest.text_fields)
        self.written.append(shard)
        self._pending, self._pending_count = [], 0
        return shard

    def _vocabulary(self):
        if self.model is None:
            raise ValueError(f"{self.index_dir} was opened for deletes only: give the model record to add documents.")
        return self.model.vocabulary

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

    def commit(self, skipped: Sequence[Skip] = (), job: str | None = None) -> Manifest:
        """Publish everything (the manifest last, atomically) and release the lock. ``skipped``: items a job could
        not index, kept in the index's ``skipped.parquet``; ``job``: the key of the job that wrote them."""
        self.flush()
        if job and job not in self.manifest.jobs:
            self.manifest.jobs.append(job)
        try:
            if self.appending:
                self._publish_into_index(skipped)
            else:
                self._publish_new(skipped)
            # The tombstones the new manifest no longer names stay until the next mutation sweeps them
            # (layout.leftovers): a reader of the previous version (a cluster's shard replica opening it now) can
            # still read its deletes.
            self.committed = True
            return self.manifest
        finally:
            self._release()

    def _publish_new(self, skipped: Sequence[Skip]) -> None:
        if not self.written:
            raise ValueError("No documents were added: nothing to index.")
        self.manifest.shards = list(self.written)
        self.build_dir.mkdir(parents=True, exist_ok=True)
        write_skipped_report(self.build_dir, skipped)
        self.manifest.save(self.build_dir)
        publish(self.build_dir, self.index_dir)

    def _publish_into_index(self, skipped: Sequence[Skip]) -> None:
        known = {s.name for s in self.manifest.shards}
        for shard in self.written:
            built, target = shard.path(self.build_dir), shard.path(self.index_dir)
            if built.exists():  # a resumed job's shard may have been moved in by a publish a kill interrupted
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(built, target)
        if skipped:
            write_skipped_report(self.index_dir, skipped, merge=True)
        new = [s for s in self.written if s.name not in known]
        if new or self._new_tombstones:
            self.manifest.shards.extend(new)
            self.manifest.save(self.index_dir)
        if self._own_build:
            shutil.rmtree(self.build_dir, ignore_errors=True)

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
    """Delete documents by id (the writer's ``delete`` + ``commit``): the CLI's and ``IndexReader.delete``'s path."""
    with IndexWriter(index_dir, wait=wait) as writer:
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


def publish(build_dir: Path, index_dir: Path) -> None:
    """Move a finished build into place; an existing index is swapped out, then removed."""
    if not index_dir.exists():
        os.replace(build_dir, index_dir)
        return
    retired = retired_dir(index_dir)
    os.replace(index_dir, retired)
    os.replace(build_dir, index_dir)
    shutil.rmtree(retired, ignore_errors=True)


def _live_rows_of(shard_dir: Path, ids: Sequence[str], dead: set[int]) -> dict[str, int]:
    with FeatureStore.open(store_path(shard_dir)) as store:  # an index built before format 2: features.parquet
        rows = {doc_id: store.row_of(doc_id) for doc_id in ids}
    return {doc_id: row for doc_id, row in rows.items() if row is not None and row not in dead}


def _write_tombstone(shard_dir: Path, rows: np.ndarray) -> str:
    name = tombstone_name()
    with atomic_path(shard_dir / name) as tmp, open(tmp, "wb") as f:
        np.save(f, np.asarray(rows, dtype=np.int64))
    return name
