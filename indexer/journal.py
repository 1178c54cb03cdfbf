"""The job directory: what makes a bulk job resumable after ``kill -9``.

Layout, next to the output index (``.{out}.job-<hash>``, same filesystem so renames are atomic)::

    job.json              the job's identity (source, options, model fingerprint, ...)
    lock                  flock'd while a job runs: two jobs never write one directory
    chunks/000042.npz     one encoded batch + the source positions it accounts for (temp file + rename)
    journal.json          shards written so far, the last chunk they consumed, skipped items (atomic)
    build/shards/<name>/  finished shards (the IndexWriter builds them here, and publishes them)

Why this shape: encoding is the expensive step, so every encoded batch is on disk before the next one
starts, and a restart re-encodes at most one batch. A chunk file exists completely or not at all (written
to a temp name, fsync'd, renamed). Shards are written from whole chunks and only count once the journal
lists them, so a half-written shard directory after a kill is simply removed, with every temporary file or
folder (an interrupted Seismic build leaves a folder). Items are consumed in the source's fixed order, so
"every position below ``end``" identifies exactly what is done. Publishing moves the journal's shards into the
index (index/publish.py); a kill in the middle is finished by the next run before it reads this journal, and a
shard is looked for in the index too when it has left the build folder. A finished job's folder is renamed
aside before it is deleted, so a kill then leaves no half-deleted journal.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stair_search.atomic import TEMP_SUFFIX, atomic_path, atomic_write, discard_dir, remove_path
from stair_search.encode import EncodedBatch
from stair_search.index import ShardInfo
from stair_search.index.skipped import Skip
from stair_search.index.store import FeatureRecord, FeatureStore, store_path

RECORD_FIELDS = ("id", "source", "width", "height", "caption", "metadata")


@dataclass
class Chunk:
    """One encoder batch: its documents, and every source position below ``end`` is accounted for."""

    end: int
    records: list[FeatureRecord] = field(default_factory=list)
    encoded: EncodedBatch | None = None
    csr: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # quantised sparse vectors of the records
    skipped: list[Skip] = field(default_factory=list)


@dataclass
class JournalState:
    shards: list[ShardInfo] = field(default_factory=list)
    last_chunk: int = -1  # chunks up to this sequence number are inside ``shards``
    end: int = 0  # source positions below this are inside ``shards`` (or skipped)
    skipped: list[Skip] = field(default_factory=list)
    complete: bool = False  # every item consumed and every shard written: only publishing is left


def job_key(**identity: Any) -> str:
    """Short hash of everything that changes which documents or vectors a job produces."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_dir_for(out: Path, key: str) -> Path:
    return out.parent / f".{out.name}.job-{key}"


class JobDir:
    """Spooled chunks + journal of one job; ``open`` takes the lock and repairs what a kill left behind."""

    def __init__(self, path: Path, identity: dict[str, Any]):
        self.path = path
        self.identity = identity
        self.chunks_dir = path / "chunks"
        self.build_dir = path / "build"
        self._lock_file = None

    # ---------------------------------------------------------------------------------------------- lifecycle

    def open(self, resume: bool) -> JournalState:
        """Start a job here, or continue the one a previous run left (``resume``); returns the journal."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock()
        if not resume:  # start over, but keep the lock file we hold
            for entry in self.path.iterdir():
                if entry.name != "lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        self.chunks_dir.mkdir(exist_ok=True)
        job_file = self.path / "job.json"
        if job_file.is_file() and json.loads(job_file.read_text()) != json.loads(json.dumps(self.identity)):
            raise RuntimeError(f"{self.path} belongs to another job; remove it or run with --no-resume.")
        atomic_write(job_file, json.dumps(self.identity, indent=2, default=str).encode())
        state = self.read_journal()
        self._remove_leftovers(state)
        return state

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def remove(self) -> None:
        """Delete the job's folder: renamed to ``.<index>.removing-<key>`` first (the index's next mutation sweeps
        it if a kill comes), so a run after a kill never finds a journal without its spool or shards."""
        self.close()
        discard_dir(self.path, self.path.name.replace(".job-", ".removing-", 1))

    def holds_work(self) -> bool:
        """Whether a restart would continue from here: encoded chunks spooled, or shards journaled."""
        return bool(self._chunk_files()) or bool(self.read_journal().shards)

    def _lock(self) -> None:
        self._lock_file = open(self.path / "lock", "w")  # noqa: SIM115 - held for the whole job
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise RuntimeError(f"Another indexing job is writing {self.path}; wait for it to finish.") from None

    def _remove_leftovers(self, state: JournalState) -> None:
        """Temp files and folders, and shard directories the journal does not list, are pieces of an interrupted
        write (deepest first: a temporary folder may hold temporary files)."""
        for tmp in sorted(self.path.rglob(f"*{TEMP_SUFFIX}"), key=lambda p: len(p.parts), reverse=True):
            remove_path(tmp)
        listed = {s.name for s in state.shards}
        shards_root = self.build_dir / "shards"
        if shards_root.is_dir():
            for shard_dir in shards_root.iterdir():
                if shard_dir.name not in listed:
                    shutil.rmtree(shard_dir, ignore_errors=True)
        for seq, path in self._chunk_files():
            if seq <= state.last_chunk:
                path.unlink(missing_ok=True)  # already inside a shard; the kill came before the cleanup

    # ---------------------------------------------------------------------------------------------- journal

    def read_journal(self) -> JournalState:
        path = self.path / "journal.json"
        if not path.is_file():
            return JournalState()
        data = json.loads(path.read_text(encoding="utf-8"))
        return JournalState(shards=[ShardInfo(**s) for s in data["shards"]], last_chunk=data["last_chunk"],
                            end=data["end"], skipped=[tuple(s) for s in data["skipped"]], complete=data["complete"])

    def write_journal(self, state: JournalState) -> None:
        data = asdict(state)
        atomic_write(self.path / "journal.json", json.dumps(data).encode())

    # ---------------------------------------------------------------------------------------------- chunks

    def _chunk_files(self) -> list[tuple[int, Path]]:
        return sorted((int(p.stem), p) for p in self.chunks_dir.glob("*.npz"))

    def pending_chunks(self, state: JournalState) -> Iterator[tuple[int, Chunk]]:
        """Spooled chunks not yet inside a shard, in order."""
        for seq, path in self._chunk_files():
            if seq > state.last_chunk:
                yield seq, read_chunk(path)

    def next_sequence(self, state: JournalState) -> int:
        files = self._chunk_files()
        return max([state.last_chunk, *(seq for seq, _ in files)]) + 1

    def write_chunk(self, seq: int, chunk: Chunk) -> None:
        arrays: dict[str, np.ndarray] = {"end": np.asarray(chunk.end)}
        meta = {"records": [{f: getattr(r, f) for f in RECORD_FIELDS} for r in chunk.records],
                "skipped": chunk.skipped}
        if chunk.records:
            arrays.update(dense=chunk.encoded.dense, indptr=chunk.csr[0], indices=chunk.csr[1], values=chunk.csr[2])
            if chunk.encoded.local is not None:
                arrays.update(local=chunk.encoded.local, local_positions=chunk.encoded.local_positions)
        arrays["meta"] = np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8)
        with atomic_path(self.chunks_dir / f"{seq:06d}.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)

    def drop_chunks(self, up_to: int) -> None:
        for seq, path in self._chunk_files():
            if seq <= up_to:
                path.unlink(missing_ok=True)

    def shard_ids(self, state: JournalState, index_dir: Path) -> Iterator[str]:
        """Ids of the documents inside the journal's shards (to refuse duplicates after a restart)."""
        for shard in state.shards:
            with FeatureStore.open(store_path(self.shard_folder(shard, index_dir))) as store:  # pre-v2: parquet
                yield from store.ids

    def shard_folder(self, shard: ShardInfo, index_dir: Path) -> Path:
        """Where a journaled shard is: the build folder, or the index when a publish moved it in (a job of an
        earlier version, killed between its moves and its manifest, left it there)."""
        for folder in (shard.path(self.build_dir), shard.path(index_dir)):
            if folder.is_dir():
                return folder
        raise FileNotFoundError(f"The journal of {self.path} lists shard {shard.name}, which is neither in "
                                f"{self.build_dir / 'shards'} nor in {index_dir / 'shards'}: run the same command "
                                f"with --no-resume to index the source again.")


def read_chunk(path: Path) -> Chunk:
    with np.load(path) as data:
        meta = json.loads(data["meta"].tobytes().decode())
        records = [FeatureRecord(**r) for r in meta["records"]]
        chunk = Chunk(end=int(data["end"]), records=records, skipped=[tuple(s) for s in meta["skipped"]])
        if records:
            local, positions = data.get("local"), data.get("local_positions")
            chunk.csr = (data["indptr"], data["indices"], data["values"])
            chunk.encoded = EncodedBatch(dense=data["dense"], sparse=[{} for _ in records], local=local,
                                         local_positions=positions)
            if local is not None:
                for record, feats, pos in zip(records, local, positions, strict=True):
                    record.local, record.local_positions = feats, pos
    return chunk
