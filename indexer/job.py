"""An indexing job: :class:`IndexJob` (what to index and how, validated once: the CLI's ``stair-search index``
builds the same object) and :func:`run`, which indexes any source, resumable after a kill.

The steps: take the index's mutation lock -> number the source's items (fixed order) -> skip what a killed
earlier run already spooled -> decode + encode (local worker processes, or Ray) -> spool each encoded batch to
the job directory -> hand the batches to the one IndexWriter (which cuts and writes the shards in the job's
build folder, journaled here) -> the writer publishes -> remove the job directory. This module keeps only
the job's part: spooling, the journal and resuming; everything about writing an index is the writer's.

The source is checked (it exists, its columns are there) before the model loads or anything is written. A job
that stops on an error keeps its spool only when the spool holds work to resume; otherwise its job folder is
removed. The published manifest lists the keys of the jobs that built it, so running a finished job again
says so and changes nothing. A kill at any step of the publish is finished by the next run (any mutation of the
index, in fact) before anything else (index/publish.py), and a full disk anywhere is one DiskFullError that says
where, and that the same command resumes once there is space.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from indexer.decode import DEFAULT_MAX_PIXELS, EXIF_BASIC, DecodeLimits
from indexer.embeddings import (
    EmbeddingSource,
    check_embeddings_model,
    embedding_chunks,
    index_bank,
    open_source,
    release_image_tower,
)
from indexer.journal import Chunk, JobDir, JournalState, Skip, job_dir_for, job_key
from indexer.pipeline import NumberedItem, check_not_reimporting_main, default_workers, local_chunks
from indexer.report import JobProgress, JobSummary
from indexer.sources import DEFAULT_MAX_BYTES, Item, SourceOptions, check, iter_items
from indexer.sync import SyncPlan, plan_sync
from stair_search import DEFAULT_MODEL
from stair_search.atomic import reporting_full_disk
from stair_search.encode import Encoder
from stair_search.index import DenseSpec, IndexLock, IndexReader, IndexWriter, Manifest, ShardInfo
from stair_search.index.layout import MANIFEST
from stair_search.index.publish import finish_interrupted_publish
from stair_search.index.text import DEFAULT_TEXT_FIELDS

RUNNERS = ("local", "ray")
ALREADY_INDEXED = "already in the index"

__all__ = ["IndexJob", "JobSummary", "run"]


@dataclass(frozen=True)
class IndexJob:
    """Index every readable image of ``source`` into ``out``; bad items are skipped and reported.

    A job killed at any moment continues when run again with the same settings (``resume=False`` starts over).
    ``workers`` decode in processes (default ``min(4, cores)``; 0 = in the job's process); ``torch_threads``
    sizes the encoder's threads. ``runner="ray"`` decodes and encodes on Ray (``ray_address``: an existing
    cluster; default a local one) and writes the same shards. The job holds the index's mutation lock from start
    to publish: another mutation of ``out`` makes it stop at once naming the holder, or with ``wait`` queue
    behind it. ``max_pixels`` / ``max_bytes`` cap what one image may cost to decode (larger ones are skipped as
    too large). ``text_fields``: what the text route (BM25) indexes, ``"caption"`` and metadata field names
    (None or empty: no text route). ``embeddings``: ``source`` holds image embeddings computed elsewhere
    (indexer/embeddings.py: a clip-retrieval / LAION folder, a parquet of ids and vectors, a .npy with its ids;
    ``vector_column`` names a parquet's vector column), indexed without decoding an image. ``exif``: the photo
    fields read from EXIF into each document's metadata:
    ``basic`` (``taken_at``, ``camera``), ``gps`` (those and ``latitude`` / ``longitude``) or ``none``.
    ``sync``: make the index match the source in one published version (indexer/sync.py: new items indexed,
    gone ones deleted, changed ones indexed again under their ids; nothing published when nothing changed).
    """

    source: str | Path
    out: str | Path
    model: str = DEFAULT_MODEL
    pretrained: str | None = None
    batch_size: int = 32
    shard_size: int = 100_000
    dense: str | None = None
    append: bool = False
    overwrite: bool = False
    device: str | None = None
    options: SourceOptions | None = field(default_factory=SourceOptions)  # None: the defaults
    workers: int | None = None
    runner: str = "local"
    ray_address: str | None = None
    resume: bool = True
    torch_threads: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES
    wait: bool = False
    text_fields: Sequence[str] | None = DEFAULT_TEXT_FIELDS
    exif: str = EXIF_BASIC
    merge: bool | None = None  # apply the index's merge policy once published (None: as its manifest says)
    embeddings: bool = False
    vector_column: str | None = None
    sync: bool = False

    def __post_init__(self) -> None:
        DecodeLimits(exif=self.exif)  # a ValueError naming the choices before anything loads
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "options", self.options or SourceOptions())
        object.__setattr__(self, "text_fields", tuple(self.text_fields) if self.text_fields else None)
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        for name in ("batch_size", "shard_size", "max_pixels", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be 1 or more, got {getattr(self, name)}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be 0 (decode in the job's process) or more, got {self.workers}")
        if self.sync and (self.overwrite or self.embeddings or self.options.hash_ids):
            raise ValueError("sync keeps an index in step with an image source by id: it does not combine with "
                             "overwrite, embeddings or hash_ids (drop those options)")


def run(job: IndexJob, *, encoder: Encoder | None = None, progress: bool | None = None) -> JobSummary:
    """Run ``job`` (see :class:`IndexJob`); ``encoder``: a loaded encoder to index with instead of loading
    ``job.model``; ``progress``: show a progress bar (None: when the output is a terminal)."""
    check_not_reimporting_main()
    if job.runner == "ray":
        from indexer.ray_runner import require_ray

        require_ray()
    source, out, options, text_fields = job.source, job.out, job.options, job.text_fields
    embedded = open_source(source, options, job.vector_column) if job.embeddings else None
    if embedded is None:
        check(str(source), options)
    started = time.perf_counter()
    if job.torch_threads:
        torch.set_num_threads(job.torch_threads)
    own_encoder = encoder is None  # an embeddings job frees the image tower of an encoder it built (never a caller's)
    encoder = encoder or Encoder(job.model, batch_size=job.batch_size, device=job.device, pretrained=job.pretrained)
    batch_size, shard_size, dense, append, overwrite = (job.batch_size, job.shard_size, job.dense, job.append,
                                                        job.overwrite)
    max_pixels, max_bytes, resume, wait = job.max_pixels, job.max_bytes, job.resume, job.wait
    workers, runner, ray_address = job.workers, job.runner, job.ray_address
    limits = DecodeLimits(max_pixels=max_pixels, max_bytes=max_bytes, exif=job.exif)
    identity = {"source": os.path.abspath(str(source)), "out": os.path.abspath(out), "options": asdict(options),
                "model": encoder.fingerprint, "shard_size": shard_size, "dense": dense, "append": append,
                "limits": asdict(limits), "text_fields": list(text_fields) if text_fields else None}
    if embedded is not None:  # an image job's key is unchanged
        check_embeddings_model(embedded, encoder, job.model)
        identity["embeddings"] = {"vector_column": job.vector_column}
    if job.sync:
        identity["sync"] = True
        append = True  # onto the index when there is one; a new index otherwise
    key = job_key(**identity)
    job_dir = JobDir(job_dir_for(out, key), identity)
    with reporting_full_disk(out.parent, f"indexing into {out}", f"the job resumes from its spool, and the index at "
                             f"{out} is as it was before this job."), IndexLock(out, wait=wait) as lock:
        finish_interrupted_publish(out)  # a kill during an earlier publish (this job's or another's)
        journal = job_dir.read_journal() if resume else JournalState()
        if journal.complete and _published(out, journal):  # a kill came after publishing, before the cleanup
            summary = _finish(job_dir, journal, Manifest.load(out), started, 0, 0, out)
            summary.finished_earlier_run = True
            summary.skipped = _problems(summary.skipped) if job.sync else summary.skipped
            return summary
        if resume and not (append or overwrite) and _built_by(out, key):
            return JobSummary(manifest=Manifest.load(out), indexed=0, seconds=time.perf_counter() - started,
                              already_complete=True)
        plan = plan_sync(str(source), options, out, max_bytes) if job.sync else None
        if plan is not None and plan.nothing_to_do and (out / MANIFEST).is_file() and not job_dir.holds_work():
            return JobSummary(manifest=Manifest.load(out), indexed=0, seconds=time.perf_counter() - started,
                              sync=plan)
        with IndexWriter(out, encoder.record, append=append, overwrite=overwrite, shard_size=shard_size,
                         dense_spec=DenseSpec(dense) if dense else None, build_dir=job_dir.build_dir,
                         resumed=journal.shards, lock=lock, text_fields=text_fields, merge=job.merge) as writer:
            state = job_dir.open(resume)
            try:
                job_run = _JobRun(job_dir, state, writer)
                if not state.complete:
                    existing = set(plan.unchanged) if plan else set(IndexReader(out).ids()) if writer.appending \
                        else set()
                    if embedded is not None:
                        _index_embeddings(job_run, embedded, encoder, batch_size, existing, progress, own_encoder)
                    else:
                        _encode_source(job_run, str(source), options, encoder, batch_size, workers, runner,
                                       ray_address, limits, existing, progress)
                if plan is None:
                    manifest = _commit(writer, job_dir, state, source, key)
                else:
                    manifest = _commit_sync(writer, state, plan, key)
            except BaseException:
                # keep a spool that holds work: the next run with the same arguments continues from it
                job_dir.close() if job_dir.holds_work() else job_dir.remove()
                raise
        summary = _finish(job_dir, state, manifest, started, job_run.encoded_now, job_run.resumed_from, out)
        summary.sync = plan
        if plan is not None:
            summary.skipped = _problems(state.skipped)
        summary.manifest = writer.apply_policy()  # after the journal is gone: a rerun never looks for its shards
    return summary


def _encode_source(job_run: _JobRun, source: str, options: SourceOptions, encoder: Encoder, batch_size: int,
                   workers: int | None, runner: str, ray_address: str | None, limits: DecodeLimits,
                   existing: set[str], progress: bool | None) -> None:
    items = _numbered_items(source, options, job_run.start, existing, limits.max_bytes)
    builder_args = {"batch_size": batch_size, "seen_ids": job_run.seen_ids, "vocabulary": encoder.model.vocabulary,
                    "scale": job_run.writer.manifest.scale}
    with JobProgress(source, job_run.start, progress) as bar:
        for chunk in _chunks(runner, items, encoder, builder_args, workers, ray_address, limits):
            job_run.add(chunk)
            bar.advance_to(chunk.end)
    job_run.finish()


def _index_embeddings(job_run: _JobRun, embedded: EmbeddingSource, encoder: Encoder, batch_size: int,
                      existing: set[str], progress: bool | None, release: bool) -> None:
    """The embeddings source's items as chunks (no decode; the image tower never runs, and once the bank is made
    it is freed when ``release``), its calibration in the manifest."""
    bank = index_bank(encoder, embedded, job_run.writer)
    if release:
        release_image_tower(encoder)
    builder_args = {"batch_size": batch_size, "seen_ids": job_run.seen_ids, "vocabulary": encoder.model.vocabulary,
                    "scale": job_run.writer.manifest.scale}
    chunks = embedding_chunks(embedded, job_run.start, existing, bank, encoder.model.config.image_top_k, builder_args,
                              _skip_reason)
    with JobProgress(embedded.spec, job_run.start, progress) as bar:
        for chunk in chunks:
            job_run.add(chunk)
            bar.advance_to(chunk.end)
    job_run.finish()


def _skip_reason(item: Item, existing: set[str]) -> str | None:
    return item.problem or (ALREADY_INDEXED if item.id in existing else None)


def _chunks(runner: str, items: Iterator[NumberedItem], encoder: Encoder, builder_args: dict, workers: int | None,
            ray_address: str | None, limits: DecodeLimits) -> Iterator[Chunk]:
    workers = default_workers() if workers is None else workers
    if runner == "local":
        return local_chunks(items, encoder, builder_args, workers, limits)
    from indexer.ray_runner import ray_chunks

    return ray_chunks(items, encoder, builder_args, ray_address, limits)


def _numbered_items(source: str, options: SourceOptions, start: int, existing: set[str],
                    max_bytes: int) -> Iterator[NumberedItem]:
    """Items from position ``start`` on; those the index already holds (an append) and those the source
    already knows are unusable are skipped undecoded."""
    for position, item in enumerate(iter_items(source, options, max_bytes)):
        if position >= start:
            yield position, item, item.problem or (ALREADY_INDEXED if item.id in existing else None)


class _JobRun:
    """Spooled chunks -> the writer's shards (in the job's build folder), journaled so that a restart skips them."""

    def __init__(self, job: JobDir, state: JournalState, writer: IndexWriter):
        self.job, self.state, self.writer = job, state, writer
        spooled = list(job.pending_chunks(state))
        self.seen_ids = set(job.shard_ids(state, writer.index_dir)) | {r.id for _, c in spooled for r in c.records}
        self.start = self.resumed_from = max([state.end, *(c.end for _, c in spooled)])
        self.next_seq = job.next_sequence(state)
        self.encoded_now = 0
        self.pending: list[tuple[int, Chunk]] = []
        for seq, chunk in spooled:
            self._queue(seq, chunk)

    def add(self, chunk: Chunk) -> None:
        self.job.write_chunk(self.next_seq, chunk)
        self._queue(self.next_seq, chunk)
        self.next_seq += 1
        self.encoded_now += len(chunk.records)

    def finish(self) -> None:
        self._journal(self.writer.flush())
        self.state.complete = True
        self.job.write_journal(self.state)

    def _queue(self, seq: int, chunk: Chunk) -> None:
        self.pending.append((seq, chunk))
        if chunk.records:
            shard = self.writer.add_quantised(chunk.records, chunk.encoded.dense, chunk.csr)
            if shard is not None:
                self._journal(shard)

    def _journal(self, shard: ShardInfo | None) -> None:
        """The commit point of the pending chunks: the shard they became (if any) and their skips."""
        if not self.pending:
            return
        if shard is not None:
            self.state.shards.append(shard)
        chunks = [c for _, c in self.pending]
        self.state.last_chunk, self.state.end = self.pending[-1][0], chunks[-1].end
        self.state.skipped.extend(s for c in chunks for s in c.skipped)
        self.job.write_journal(self.state)
        self.job.drop_chunks(self.state.last_chunk)
        self.pending = []


def _commit(writer: IndexWriter, job_dir: JobDir, state: JournalState, source: str | Path, key: str) -> Manifest:
    _check_something_usable(job_dir, state, source)
    return writer.commit(state.skipped, job=key, merge=False)


def _commit_sync(writer: IndexWriter, state: JournalState, plan: SyncPlan, key: str) -> Manifest:
    """The sync's deletions with its new shards, in one published version; its report says what is unreadable
    now (the unchanged items it skipped are not problems)."""
    if plan.deletions and not plan.unchanged and not state.shards:
        raise ValueError(f"the source holds no readable image now, and a sync would delete all {len(plan.deletions)} "
                         f"documents of the index: check the source is mounted and readable (or delete them with "
                         f"`stair-search delete`, or rebuild with --overwrite)")
    if plan.deletions:
        writer.delete(plan.deletions)
    if not writer.appending and not state.shards:
        raise ValueError(f"Nothing to index: {len(state.skipped)} item(s) found, none readable.")
    return writer.commit(_problems(state.skipped), job=key, merge=False, keep_report=False)


def _problems(skipped: Sequence[Skip]) -> list[Skip]:
    return [s for s in skipped if s[2] != ALREADY_INDEXED]


def _check_something_usable(job: JobDir, state: JournalState, source: str | Path) -> None:
    """Stop with a clear error (and no index, no spool) when nothing at all could be indexed."""
    if state.shards or any(reason == ALREADY_INDEXED for _, _, reason in state.skipped):
        return
    reasons = sorted({reason for _, _, reason in state.skipped})
    job.remove()
    raise ValueError(f"Nothing to index in '{source}': {len(state.skipped)} item(s) found, none readable "
                     f"({', '.join(reasons) or 'no images'}).")


def _built_by(out: Path, key: str) -> bool:
    """Whether the published index lists this job among those that built it (a finished job run again)."""
    return (out / MANIFEST).is_file() and key in Manifest.load(out).jobs


def _published(out: Path, state: JournalState) -> bool:
    if not (out / MANIFEST).is_file():
        return False
    names = {s.name for s in Manifest.load(out).shards}
    return all(s.name in names for s in state.shards)


def _finish(job: JobDir, state: JournalState, manifest: Manifest, started: float, encoded_now: int,
            resumed_from: int, out: Path) -> JobSummary:
    job.remove()
    report = out / "skipped.parquet"
    return JobSummary(manifest=manifest, indexed=sum(s.count for s in state.shards),
                      seconds=time.perf_counter() - started, skipped=list(state.skipped), encoded_now=encoded_now,
                      resumed_from=resumed_from, report=report if report.is_file() and state.skipped else None)
