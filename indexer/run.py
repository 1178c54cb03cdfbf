"""``run``: index any source (same options as ``stair-search index``), resumable after a kill.

The steps: number the source's items (fixed order) -> skip what a killed earlier run already spooled ->
decode + encode (local worker processes, or Ray) -> spool each encoded batch to the job directory ->
write shards from the spool -> publish atomically (a new index: build dir renamed into place, manifest
inside; an append: shards moved in, then the manifest swapped) -> remove the job directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from indexer.decode import DEFAULT_MAX_PIXELS
from indexer.journal import Chunk, JobDir, JournalState, job_dir_for, job_key
from indexer.pipeline import NumberedItem, check_not_reimporting_main, default_workers, local_chunks
from indexer.report import JobProgress, JobSummary, write_skipped_report
from indexer.sources import SourceOptions, iter_items
from stair_search import DEFAULT_MODEL
from stair_search.encode import Encoder
from stair_search.index.dense import DenseSpec
from stair_search.index.manifest import MANIFEST, Manifest
from stair_search.index.reader import Index
from stair_search.index.sparse import DEFAULT_SCALE, concat_csr
from stair_search.index.writer import check_target, new_manifest, open_for_append, publish, shard_name, write_shard

RUNNERS = ("local", "ray")
ALREADY_INDEXED = "already in the index"

__all__ = ["JobSummary", "run"]


def run(source: str | Path, out: str | Path, model: str = DEFAULT_MODEL, pretrained: str | None = None,
        batch_size: int = 32, shard_size: int = 100_000, dense: str | None = None, append: bool = False,
        overwrite: bool = False, device: str | None = None, encoder: Encoder | None = None,
        options: SourceOptions | None = None, workers: int | None = None, runner: str = "local",
        ray_address: str | None = None, resume: bool = True, progress: bool | None = None,
        torch_threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS) -> JobSummary:
    """Index every readable image of ``source`` into ``out``; bad items are skipped and reported.

    A job killed at any moment continues when started again with the same arguments (``resume=False``
    starts over). ``workers`` decode in processes (default ``min(4, cores)``; 0 = in this process);
    ``torch_threads`` sizes the encoder's threads here. ``runner="ray"`` decodes and encodes on Ray
    (``ray_address``: an existing cluster; default a local one) and writes the same shards.
    """
    check_not_reimporting_main()
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    started, out = time.perf_counter(), Path(out)
    if torch_threads:
        torch.set_num_threads(torch_threads)
    encoder = encoder or Encoder(model, batch_size=batch_size, device=device, pretrained=pretrained)
    options = options or SourceOptions()
    dense_spec = DenseSpec(dense) if dense else None
    base = open_for_append(out, encoder) if append and (out / MANIFEST).is_file() else None
    identity = {"source": os.path.abspath(str(source)), "out": os.path.abspath(out), "options": asdict(options),
                "model": encoder.fingerprint, "shard_size": shard_size, "dense": dense, "append": append,
                "max_pixels": max_pixels}
    job = JobDir(job_dir_for(out, job_key(**identity)), identity)
    if not (resume and job.read_journal().complete):  # else this job may have published already
        check_target(out, append, overwrite)
    state = job.open(resume)
    try:
        if state.complete and _published(out, state):  # a kill came after publishing, before the cleanup
            return _finish(job, state, Manifest.load(out), started, 0, 0, out)
        scale = base.scale if base else DEFAULT_SCALE
        job_run = _JobRun(job, state, encoder, shard_size, dense_spec, len(base.shards) if base else 0)
        resumed_from = job_run.start
        if not state.complete:
            existing = set(Index(out).ids()) if base else set()
            items = _numbered_items(str(source), options, job_run.start, existing)
            builder_args = {"batch_size": batch_size, "seen_ids": job_run.seen_ids,
                            "vocabulary": encoder.model.vocabulary, "scale": scale}
            with JobProgress(str(source), job_run.start, progress) as bar:
                for chunk in _chunks(runner, items, encoder, builder_args, workers, ray_address, max_pixels):
                    job_run.add(chunk)
                    bar.advance_to(chunk.end)
            job_run.finish()
        _check_something_usable(job, state, source)
        manifest = _publish(job, state, out, encoder, scale, base is not None)
    except BaseException:
        job.close()  # keep the spool: the next run with the same arguments continues from it
        raise
    return _finish(job, state, manifest, started, job_run.encoded_now, resumed_from, out)


def _chunks(runner: str, items: Iterator[NumberedItem], encoder: Encoder, builder_args: dict, workers: int | None,
            ray_address: str | None, max_pixels: int) -> Iterator[Chunk]:
    workers = default_workers() if workers is None else workers
    if runner == "local":
        return local_chunks(items, encoder, builder_args, workers, max_pixels)
    from indexer.ray_runner import ray_chunks

    return ray_chunks(items, encoder, builder_args, ray_address, max_pixels)


def _numbered_items(source: str, options: SourceOptions, start: int, existing: set[str]) -> Iterator[NumberedItem]:
    """Items from position ``start`` on; those the index already holds (an append) are skipped undecoded."""
    for position, item in enumerate(iter_items(source, options)):
        if position >= start:
            yield position, item, ALREADY_INDEXED if item.id in existing else None


class _JobRun:
    """Spooled chunks -> shards in the job's build directory, journaled so that a restart skips them."""

    def __init__(self, job: JobDir, state: JournalState, encoder: Encoder, shard_size: int,
                 dense_spec: DenseSpec | None, first_shard: int):
        self.job, self.state, self.encoder = job, state, encoder
        self.shard_size, self.dense_spec, self.first_shard = shard_size, dense_spec, first_shard
        self.pending: list[tuple[int, Chunk]] = list(job.pending_chunks(state))
        self.pending_docs = sum(len(c.records) for _, c in self.pending)
        self.seen_ids = set(job.shard_ids(state)) | {r.id for _, c in self.pending for r in c.records}
        self.start = max([state.end, *(c.end for _, c in self.pending)])
        self.next_seq = job.next_sequence(state)
        self.encoded_now = 0

    def add(self, chunk: Chunk) -> None:
        self.job.write_chunk(self.next_seq, chunk)
        self.pending.append((self.next_seq, chunk))
        self.next_seq += 1
        self.encoded_now += len(chunk.records)
        self.pending_docs += len(chunk.records)
        if self.pending_docs >= self.shard_size:
            self._write_shard()

    def finish(self) -> None:
        self._write_shard()
        self.state.complete = True
        self.job.write_journal(self.state)

    def _write_shard(self) -> None:
        """All pending chunks become one shard (whole chunks: a shard may exceed shard_size by < a batch)."""
        if not self.pending:
            return
        chunks = [c for _, c in self.pending]
        records = [r for c in chunks for r in c.records]
        if records:
            with_docs = [c for c in chunks if c.records]
            name = shard_name(self.first_shard + len(self.state.shards))
            shard = write_shard(self.job.build_dir, name, records, np.concatenate([c.encoded.dense for c in with_docs]),
                                concat_csr([c.csr for c in with_docs]), self.encoder.model.vocabulary, self.dense_spec)
            self.state.shards.append(shard)
        self.state.last_chunk, self.state.end = self.pending[-1][0], chunks[-1].end
        self.state.skipped.extend(s for c in chunks for s in c.skipped)
        self.job.write_journal(self.state)  # the commit point of this shard
        self.job.drop_chunks(self.state.last_chunk)
        self.pending, self.pending_docs = [], 0


def _check_something_usable(job: JobDir, state: JournalState, source: str | Path) -> None:
    """Stop with a clear error (and no index, no spool) when nothing at all could be indexed."""
    if state.shards or any(reason == ALREADY_INDEXED for _, _, reason in state.skipped):
        return
    reasons = sorted({reason for _, _, reason in state.skipped})
    job.remove()
    raise ValueError(f"Nothing to index in '{source}': {len(state.skipped)} item(s) found, none readable "
                     f"({', '.join(reasons) or 'no images'}).")


def _published(out: Path, state: JournalState) -> bool:
    if not (out / MANIFEST).is_file():
        return False
    names = {s.name for s in Manifest.load(out).shards}
    return all(s.name in names for s in state.shards)


def _publish(job: JobDir, state: JournalState, out: Path, encoder: Encoder, scale: float, append: bool) -> Manifest:
    """Make the job's shards visible in one atomic step (see the module docstring)."""
    if append:
        manifest = open_for_append(out, encoder)
        for shard in state.shards:
            built, target = shard.path(job.build_dir), shard.path(out)
            if built.exists():  # a kill during an earlier publish may have moved it already
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(built, target)
        write_skipped_report(out, state.skipped, merge=True)
        known = {s.name for s in manifest.shards}
        manifest.shards.extend(s for s in state.shards if s.name not in known)
        manifest.save(out)
        return manifest
    manifest = new_manifest(encoder, scale)
    manifest.shards = list(state.shards)
    write_skipped_report(job.build_dir, state.skipped)
    manifest.save(job.build_dir)
    publish(job.build_dir, out)
    return manifest


def _finish(job: JobDir, state: JournalState, manifest: Manifest, started: float, encoded_now: int,
            resumed_from: int, out: Path) -> JobSummary:
    job.remove()
    report = out / "skipped.parquet"
    return JobSummary(manifest=manifest, indexed=sum(s.count for s in state.shards),
                      seconds=time.perf_counter() - started, skipped=list(state.skipped), encoded_now=encoded_now,
                      resumed_from=resumed_from, report=report if report.is_file() and state.skipped else None)
