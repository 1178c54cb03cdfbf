"""Concurrent mutations of one index, as real processes: nothing lost, nothing duplicated, nothing orphaned.

A job that holds the mutation lock is a real ``stair-search index`` reading its list of paths from a named pipe:
the test starts it, waits until it has taken the lock (its pid is in the lock file), runs the competing
command while the job is blocked on the pipe, then lets the job finish. Who holds the lock when is decided by
the pipe, not by sleeps.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import indexer
from indexer import IndexJob
from stair_search.index import IndexReader, Manifest
from stair_search.index.layout import TOMBSTONE_PREFIX
from stair_search.index.lock import IndexLock, IndexLockedError, lock_path
from stair_search.index.publish import INTENT_FILE
from tests.test_indexer_jobs import (
    CLI,
    DEADLINE_S,
    JOB_ENV,
    REPO_ROOT,
    cli_args,
    draw_images,
    open_pipe_for_writing,
    run_cli_process,
    wait_for,
)


def start_piped_job(args: list[str], fifo: Path, out: Path, log: Path) -> tuple[subprocess.Popen, int]:
    """A job reading its paths from ``fifo``, started and holding the lock of ``out``; returns it and the pipe."""
    os.mkfifo(fifo)
    with open(log, "w") as log_file:
        process = subprocess.Popen([*CLI, *args], env=JOB_ENV, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    fd = open_pipe_for_writing(fifo, process, log)
    wait_for(lambda: lock_holder(out) == process.pid, "the job took the index lock", process, log)
    return process, fd


def lock_holder(out: Path) -> int | None:
    try:
        return json.loads(lock_path(out).read_text() or "{}").get("pid")
    except (FileNotFoundError, ValueError):
        return None


def blocked_on(path: Path) -> bool:
    """Whether some process waits for an flock on ``path`` (a "->" line of /proc/locks names its inode)."""
    inode = os.stat(path).st_ino
    return any("->" in line and line.split()[-3].endswith(f":{inode}")
               for line in Path("/proc/locks").read_text().splitlines())


def finish_piped_job(process: subprocess.Popen, fd: int, lines: list[str], log: Path) -> str:
    os.write(fd, "".join(f"{line}\n" for line in lines).encode())
    os.close(fd)
    process.wait(timeout=DEADLINE_S)
    output = log.read_text()
    assert process.returncode == 0, output
    return output


def start_cli(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as log_file:
        return subprocess.Popen([*CLI, *args], env=JOB_ENV, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)


def assert_nothing_orphaned(out: Path) -> None:
    """Every shard folder is in the manifest, every tombstone file is the one its shard lists or the one that
    list replaced (retired, kept for readers of the previous version until a mutation after publish's
    RETIRED_GRACE_S sweeps it), and nothing of a mutation (build folder, lock file, publish record, temporary file)
    is left beside the index or in it."""
    manifest = Manifest.load(out)
    listed = {s.name: s for s in manifest.shards}
    assert {p.name for p in (out / "shards").iterdir()} == set(listed)
    for name, shard in listed.items():
        tombstones = {p.name for p in (out / "shards" / name).iterdir() if p.name.startswith(TOMBSTONE_PREFIX)}
        assert ({shard.deleted} if shard.deleted else set()) <= tombstones and len(tombstones) <= 2, name
    assert not [p for p in out.rglob("*.tmp")] and not (out / INTENT_FILE).exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_a_held_lock_stops_a_mutation_naming_the_holder_and_in_process_writers_exclude_each_other(tmp_path):
    with IndexLock(tmp_path / "idx", command="test holder"):
        try:
            IndexLock(tmp_path / "idx").acquire()
        except IndexLockedError as exc:
            assert f"pid {os.getpid()} (test holder" in str(exc) and "--wait" in str(exc)
        else:
            raise AssertionError("a second lock on the same index was granted")
    assert not lock_path(tmp_path / "idx").exists()  # released and removed
    with IndexLock(tmp_path / "idx"):  # free again
        assert lock_path(tmp_path / "idx").exists()


def test_a_delete_during_an_append_stops_or_waits_and_loses_nothing(tmp_path, tiny_config_path, tiny_encoder):
    out = tmp_path / "index"
    base = draw_images(tmp_path / "base", 10)
    indexer.run(IndexJob(tmp_path / "base", out, workers=0, shard_size=8), encoder=tiny_encoder, progress=False)
    base_ids = sorted(IndexReader(out).ids())
    new = draw_images(tmp_path / "new", 12, prefix="new-", skip=10)
    fifo = tmp_path / "list.txt"
    job, fd = start_piped_job(cli_args(fifo, out, tiny_config_path, "--append"), fifo, out, tmp_path / "job.log")

    refused = run_cli_process(["delete", str(out), base_ids[0]], tmp_path / "refused.log")
    assert refused.returncode == 1
    assert f"is being changed by pid {job.pid}" in refused.output and "Traceback" not in refused.output
    assert len(refused.output.strip().splitlines()) == 1  # one clear line
    waiting = start_cli(["delete", str(out), *base_ids[:5], "--wait"], tmp_path / "waiting.log")
    wait_for(lambda: blocked_on(lock_path(out)), "the delete queued on the index lock", waiting,
             tmp_path / "waiting.log")
    assert sorted(IndexReader(out).ids()) == base_ids  # queued behind the append: nothing deleted yet

    finish_piped_job(job, fd, [str(p) for p in new], tmp_path / "job.log")
    waiting.wait(timeout=DEADLINE_S)
    assert waiting.returncode == 0 and "deleted 5 document(s)" in (tmp_path / "waiting.log").read_text()
    index = IndexReader(out)
    expected = set(base_ids[5:]) | {str(p) for p in new}
    assert len(index.ids()) == len(set(index.ids())) == len(index) == len(expected) == 5 + 12
    assert {Path(i).name for i in index.ids()} == {Path(i).name for i in expected}
    assert len(base) == 10
    assert_nothing_orphaned(out)


def test_two_deletes_at_once_both_count_every_trial(tmp_path, tiny_encoder):
    source = tmp_path / "source"
    indexer.run(IndexJob(draw_images(tmp_path / "images", 20)[0].parent, source, workers=0, shard_size=8),
                encoder=tiny_encoder, progress=False)
    ids = sorted(IndexReader(source).ids())
    for trial in range(3):
        out = tmp_path / f"trial-{trial}"
        shutil.copytree(source, out)
        first = start_cli(["delete", str(out), *ids[:10], "--wait"], tmp_path / f"a{trial}.log")
        second = start_cli(["delete", str(out), *ids[10:], "--wait"], tmp_path / f"b{trial}.log")
        for process, log in ((first, "a"), (second, "b")):
            process.wait(timeout=DEADLINE_S)
            output = (tmp_path / f"{log}{trial}.log").read_text()
            assert process.returncode == 0 and "deleted 10 document(s)" in output, output
        assert IndexReader(out).ids() == [] and Manifest.load(out).count == 0
        assert_nothing_orphaned(out)


def test_a_second_new_build_of_one_out_is_refused_and_the_first_keeps_its_documents(tmp_path, tiny_config_path):
    out = tmp_path / "index"
    first = draw_images(tmp_path / "first", 9)
    draw_images(tmp_path / "second", 6, prefix="second-", skip=9)
    fifo = tmp_path / "list.txt"
    job, fd = start_piped_job(cli_args(fifo, out, tiny_config_path), fifo, out, tmp_path / "job.log")

    refused = run_cli_process(cli_args(tmp_path / "second", out, tiny_config_path), tmp_path / "refused.log")
    assert refused.returncode == 1 and f"is being changed by pid {job.pid}" in refused.output, refused.output
    queued = start_cli([*cli_args(tmp_path / "second", out, tiny_config_path), "--wait"], tmp_path / "queued.log")
    finish_piped_job(job, fd, [str(p) for p in first], tmp_path / "job.log")
    queued.wait(timeout=DEADLINE_S)
    output = (tmp_path / "queued.log").read_text()
    assert queued.returncode == 1 and "already holds an index" in output, output  # never a silent replace
    assert sorted(Path(i).name for i in IndexReader(out).ids()) == sorted(p.name for p in first)
    assert_nothing_orphaned(out)
