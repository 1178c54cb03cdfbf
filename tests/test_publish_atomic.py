"""Publishing under kill -9, a full disk and concurrent readers, as real processes (issue 36's D5-D8).

Each case runs the real command line (``stair-search index`` / ``delete``) in a child process that installs hooks
before ``main()``: at the n-th call of a chosen function whose arguments mention a chosen text, the process
kills itself with SIGKILL (before or after the call), raises the OS's "No space left on device", or sleeps (so
that a reader can land between two steps). Jobs are first taken to the point of publishing in this process (an
interrupted run: spooled, shards built, journal complete, nothing published), so the killed command spends its
time publishing, not encoding. Meanwhile a reader process opens the index and searches it in a loop, bounded in
count and time, and logs what it saw: every search must succeed and see exactly one published version.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import indexer
from indexer import IndexJob
from stair_search.atomic import DiskFullError, is_disk_full, reporting_full_disk
from stair_search.encode import Encoder
from stair_search.index import IndexReader, IndexWriter, Manifest, ShardQuery, delete_documents
from stair_search.index import publish as publish_module
from stair_search.index.layout import MANIFEST, TOMBSTONE_PREFIX
from stair_search.index.publish import INTENT_FILE, RETIRED_FILE, finish_interrupted_publish, manifest_digest
from tests.test_indexer_jobs import JOB_ENV, REPO_ROOT, draw_images, job_dir_of

DEADLINE_S = 120.0
READER_MAX_S = 150.0
READER_MAX_ROUNDS = 3000
JOB = {"batch_size": 4, "shard_size": 4, "workers": 0}
SMALL_DISK = "32m"  # the tmpfs of the full-disk case: an old index of two shards (~7 MiB each: Seismic's file) + one

# Hooks (a JSON list in $STAIR_TEST_HOOKS): {"target": "module:attribute", "match": text, "nth": n,
# "do": "kill-before" | "kill-after" | "enospc" | "sleep", "seconds": s}. At the n-th call whose arguments' repr
# holds ``match``, the process kills itself (SIGKILL) before or after the call, raises ENOSPC, or sleeps.
HOOKS = r'''
import errno, importlib, json, os, signal, time

def install(hook):
    module, _, attribute = hook["target"].partition(":")
    owner = importlib.import_module(module)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original, calls = getattr(owner, name), [0]

    def hooked(*args, **kwargs):
        if hook.get("match", "") not in repr((args, kwargs)):
            return original(*args, **kwargs)
        calls[0] += 1
        action = hook["do"] if calls[0] == hook.get("nth", calls[0]) else None
        if action == "sleep":
            time.sleep(hook["seconds"])
        if action == "kill-before":
            os.kill(os.getpid(), signal.SIGKILL)
        if action == "enospc":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        result = original(*args, **kwargs)
        if action == "kill-after":
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(owner, name, hooked)

for hook in json.loads(os.environ.get("STAIR_TEST_HOOKS", "[]")):
    install(hook)
'''
# The command line's modules imported once (torch and open_clip take seconds); each case is a fork of this process
# that installs its hooks and runs ``main(args)`` as a fresh command would, in a process of its own, killed for
# real. Cases come in on stdin as JSON, the exit status of each goes out on stdout.
ZYGOTE = r'''
import json, os, sys
import open_clip, indexer.job, stair_search.index.writer, stair_search.models  # noqa: F401 - the slow imports
from stair_search.cli import main

for line in sys.stdin:
    case = json.loads(line)
    pid = os.fork()
    if pid == 0:
        log = os.open(case["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ["STAIR_TEST_HOOKS"] = json.dumps(case["hooks"])
        code = 1
        try:
            exec(case["install"])
            main(case["args"])
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
'''

# A reader in another process: open the index, wait a moment (a publish may land in between), search both routes
# with a stored document's own vectors, and log the ids it saw (or the error), until told to stop.
READER = r'''
import json, sys, time, traceback
from pathlib import Path
from stair_search.index import IndexReader, ShardQuery

out, log, stop = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
deadline, rounds = time.monotonic() + float(sys.argv[4]), int(sys.argv[5])
with open(log, "w") as f:
    for n in range(rounds):
        if stop.exists() or time.monotonic() > deadline:
            break
        try:
            with IndexReader(out) as index:
                time.sleep(0.02 * (n % 4))
                ids = index.ids()
                first = next(index.live())[:1]
                query = ShardQuery(50, sparse=index.sparse_vectors(first)[0], dense=index.vectors(first)[0])
                hits = index.search(query)
                found = {d["id"] for route in hits.values() for d in index.documents(route, ["id"])}
                assert found and found <= set(ids) and len(ids) == len(set(ids)), (sorted(found), ids)
            record = {"ids": sorted(ids)}
        except BaseException as exc:
            record = {"error": "".join(traceback.format_exception_only(type(exc), exc)).strip()}
        f.write(json.dumps(record) + "\n")
        f.flush()
        time.sleep(0.05)  # leave the cores to the commands under test
'''


# ------------------------------------------------------------------------------------------------ helpers


def index_args(source: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["index", str(source), "--out", str(out), "--model", str(model), "--batch-size", "4", "--shard-size", "4",
            "--workers", "0", *extra]


class Commands:
    """Command lines run as forks of one process that has imported them (see ZYGOTE). Where this machine lets
    it (root, ``unshare``), that process runs in a mount namespace of its own with a small tmpfs at ``disk``, which
    every command it runs sees and this process reads through ``/proc/<pid>/root`` (``disk_seen``)."""

    def __init__(self, disk: Path) -> None:
        self.disk, self.disk_seen, self.no_disk = disk, None, _why_no_tmpfs(disk)
        command = [sys.executable, "-c", ZYGOTE]
        if not self.no_disk:
            mount = f'mount -t tmpfs -o size={SMALL_DISK} tmpfs {disk} && exec "$0" -c "$1"'
            command = ["unshare", "-m", "sh", "-c", mount, sys.executable, ZYGOTE]
        self.process = subprocess.Popen(command, env=JOB_ENV, cwd=REPO_ROOT, text=True, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
        if not self.no_disk:
            self.disk_seen = Path(f"/proc/{self.process.pid}/root{disk}")

    def run(self, args: list[str], hooks: list[dict], log: Path) -> subprocess.CompletedProcess:
        self.process.stdin.write(json.dumps({"args": args, "hooks": hooks, "log": str(log), "install": HOOKS}) + "\n")
        self.process.stdin.flush()
        ready, _, _ = select.select([self.process.stdout], [], [], DEADLINE_S)
        assert ready, f"{args} did not end within {DEADLINE_S} s:\n{log.read_text()}"
        done = subprocess.CompletedProcess(args, int(self.process.stdout.readline()))
        done.output = log.read_text()
        return done

    def close(self) -> None:
        self.process.stdin.close()
        try:
            self.process.wait(timeout=DEADLINE_S)
        finally:
            self.process.kill()


def _why_no_tmpfs(disk: Path) -> str | None:
    """None when a private tmpfs can be mounted here, else why not."""
    if not shutil.which("unshare"):
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {disk}"],
                           capture_output=True, text=True, timeout=60)
    return None if probe.returncode == 0 else f"cannot mount a private tmpfs: {probe.stderr.strip()}"


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    zygote = Commands(tmp_path_factory.mktemp("disk"))
    yield zygote
    zygote.close()


def kill(target: str, when: str = "after", match: str = "", nth: int = 1) -> dict:
    return {"target": target, "match": match, "nth": nth, "do": f"kill-{when}"}


def prepare_unpublished(source: Path, out: Path, encoder, **options) -> None:
    """Run the job here up to its publish (its commit is interrupted as by Ctrl-C): spooled, shards built,
    journal complete, nothing published. The command line run with the same arguments resumes from there."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(IndexWriter, "commit", interrupted)
        with pytest.raises(KeyboardInterrupt):
            indexer.run(IndexJob(source, out, **JOB, **options), encoder=encoder, progress=False)
    assert json.loads((job_dir_of(out) / "journal.json").read_text())["complete"]


def ids_of(out: Path) -> list[str]:
    with IndexReader(out) as index:
        return sorted(index.ids())


def names(images: list[Path]) -> list[str]:
    return sorted(p.name for p in images)


def assert_one_line_error(done: subprocess.CompletedProcess, *texts: str) -> None:
    assert done.returncode == 1, done.output
    assert "Traceback" not in done.output, done.output
    errors = [line for line in done.output.splitlines() if line.startswith("stair-search: error:")]
    assert len(errors) == 1 and all(text in errors[0] for text in texts), done.output


def assert_clean(out: Path) -> None:
    """No intent, temporary file, build, job or lock folder left, in or beside the index."""
    assert not (out / INTENT_FILE).exists()
    assert not list(out.rglob("*.tmp"))
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


class Reader:
    """The reader process (see READER); ``stop`` ends it and returns the records it logged."""

    def __init__(self, out: Path, folder: Path):
        self.log, self.stop_file = folder / "reader.jsonl", folder / "reader.stop"
        self.process = subprocess.Popen(
            [sys.executable, "-c", READER, str(out), str(self.log), str(self.stop_file), str(READER_MAX_S),
             str(READER_MAX_ROUNDS)], env=JOB_ENV, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + DEADLINE_S
        while not (self.log.is_file() and self.log.read_text().strip()) and time.monotonic() < deadline:
            assert self.process.poll() is None, "the reader process ended before its first search"
            time.sleep(0.05)

    def stop(self) -> list[dict]:
        self.stop_file.touch()
        try:
            self.process.wait(timeout=DEADLINE_S)
        finally:
            self.process.kill()
        return [json.loads(line) for line in self.log.read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ kill -9 at every step


@dataclass
class Chain:
    """One index changed case after case by killed and rerun commands, and every version it held (what a reader
    may see)."""

    out: Path
    folder: Path
    model: Path
    encoder: Encoder
    commands: Commands
    versions: list[list[str]] = field(default_factory=list)

    def source(self, name: str, count: int) -> tuple[Path, list[str]]:
        folder = self.folder / name
        return folder, names(draw_images(folder, count, prefix=f"{name}-"))

    def run(self, args: list[str], hooks: list[dict], log: str) -> subprocess.CompletedProcess:
        return self.commands.run(args, hooks, self.folder / f"{log}.log")

    def index(self, source: Path, flag: str, hooks: list[dict], log: str) -> subprocess.CompletedProcess:
        return self.run(index_args(source, self.out, self.model, flag), hooks, log)

    def rerun_here(self, source: Path, flag: str) -> None:
        """The same job again, in this process (``flag``: --overwrite or --append)."""
        options = {flag.lstrip("-"): True}
        indexer.run(IndexJob(source, self.out, **JOB, **options), encoder=self.encoder, progress=False)


OVERWRITE_KILLS = [  # (where an overwrite is killed, which version the path then holds)
    (kill("os:replace", "after", INTENT_FILE), "old"),  # the intent written, nothing moved
    (kill("stair_search.index.publish:move_in", "after"), "old"),  # one of two shards moved in
    (kill("os:replace", "before", MANIFEST), "old"),  # the new manifest written and synced, not renamed
    (kill("os:replace", "after", MANIFEST), "new"),  # renamed: published; the intent not yet deleted
    (kill("indexer.journal:JobDir.remove", "before"), "new"),  # the job folder not yet deleted
    (kill("shutil:rmtree", "before", ".removing-"), "new"),  # the job folder renamed aside, not yet deleted
]


def overwrite_killed_at_every_step(chain: Chain) -> int:
    """Each overwrite step killed, then rerun (by the command line or in this process); returns the kills."""
    for case, (hook, holds) in enumerate(OVERWRITE_KILLS, start=1):
        source, new = chain.source(f"ov{case}", 5)
        chain.versions.append(new)
        prepare_unpublished(source, chain.out, chain.encoder, overwrite=True)
        killed = chain.index(source, "--overwrite", [hook], f"ov{case}-kill")
        assert killed.returncode == -signal.SIGKILL, killed.output
        assert ids_of(chain.out) == (chain.versions[-2] if holds == "old" else new), hook
        if case % 2:
            assert chain.index(source, "--overwrite", [], f"ov{case}-rerun").returncode == 0
        else:
            chain.rerun_here(source, "--overwrite")
        assert ids_of(chain.out) == new and (chain.out / MANIFEST).is_file(), hook
        assert_clean(chain.out)
    return len(OVERWRITE_KILLS)


def rerun_killed_while_it_finishes_the_publish(chain: Chain) -> int:
    """An overwrite killed once its intent is written, then its rerun killed while it carries that publish out
    (both shards moved in, no manifest yet); the third run ends it. Each step is slowed (0.2 s) so that the reader
    lands between steps."""
    source, new = chain.source("again", 5)
    chain.versions.append(new)
    prepare_unpublished(source, chain.out, chain.encoder, overwrite=True)
    slow = [{"target": "stair_search.index.publish:move_in", "do": "sleep", "seconds": 0.2},
            {"target": "stair_search.index.publish:write_manifest", "do": "sleep", "seconds": 0.2}]
    for attempt, hook in enumerate([kill("os:replace", "after", INTENT_FILE),
                                    kill("stair_search.index.publish:move_in", "after", nth=2)]):
        killed = chain.index(source, "--overwrite", [*slow, hook], f"again-{attempt}")
        assert killed.returncode == -signal.SIGKILL and ids_of(chain.out) == chain.versions[-2], killed.output
    done = chain.index(source, "--overwrite", slow, "again-done")
    assert done.returncode == 0 and ids_of(chain.out) == new, done.output
    return 2


def append_killed(chain: Chain) -> int:
    """An append killed while it saves its manifest (D5: its rerun used to fail, every time) and between its
    moves."""
    hooks = [kill("os:replace", "before", MANIFEST), kill("stair_search.index.publish:move_in", "after")]
    for case, hook in enumerate(hooks):
        source, added = chain.source(f"add{case}", 5)
        chain.versions.append(sorted(chain.versions[-1] + added))
        shards_before = len(Manifest.load(chain.out).shards)
        prepare_unpublished(source, chain.out, chain.encoder, append=True)
        killed = chain.index(source, "--append", [hook], f"add{case}-kill")
        assert killed.returncode == -signal.SIGKILL and ids_of(chain.out) == chain.versions[-2], killed.output
        rerun = chain.index(source, "--append", [], f"add{case}-rerun")
        assert rerun.returncode == 0, rerun.output
        assert ids_of(chain.out) == chain.versions[-1] and len(Manifest.load(chain.out).shards) == shards_before + 2
        assert_clean(chain.out)
    return len(hooks)


def delete_killed(chain: Chain) -> int:
    """A delete killed after writing its tombstone and while it saves the manifest; rerun, each counts once."""
    hooks = [kill("os:replace", "after", TOMBSTONE_PREFIX), kill("os:replace", "before", MANIFEST)]
    for step, hook in enumerate(hooks):
        doomed = chain.versions[-1][step * 3 : step * 3 + 2]
        killed = chain.run(["delete", str(chain.out), *doomed], [hook], f"delete{step}")
        assert killed.returncode == -signal.SIGKILL and ids_of(chain.out) == chain.versions[-1], killed.output
        again = chain.run(["delete", str(chain.out), *doomed], [], f"delete{step}-rerun")
        assert again.returncode == 0 and "deleted 2 document(s)" in again.output, again.output
        chain.versions.append(sorted(set(chain.versions[-1]) - set(doomed)))
        assert ids_of(chain.out) == chain.versions[-1]
    return len(hooks)


def disk_fills(chain: Chain) -> None:
    """ENOSPC while a delete writes its tombstone and while an overwrite saves its manifest: one line, exit 1,
    the old index at the path; the rerun finishes."""
    full = chain.run(["delete", str(chain.out), chain.versions[-1][0]],
                     [{"target": "numpy:save", "match": TOMBSTONE_PREFIX, "do": "enospc"}], "full-delete")
    assert_one_line_error(full, "No space left on device while deleting", "nothing was deleted")
    assert ids_of(chain.out) == chain.versions[-1]
    source, new = chain.source("full", 3)
    chain.versions.append(new)
    prepare_unpublished(source, chain.out, chain.encoder, overwrite=True)
    full = chain.index(source, "--overwrite", [{"target": "stair_search.index.publish:write_manifest",
                                                "do": "enospc"}], "full-overwrite")
    assert_one_line_error(full, "No space left on device while indexing into", "run the same command again",
                          "the job resumes")
    assert ids_of(chain.out) == chain.versions[-2] and (chain.out / INTENT_FILE).is_file()  # old; publish pending
    chain.rerun_here(source, "--overwrite")
    assert ids_of(chain.out) == new
    assert_clean(chain.out)


def test_kill_9_at_every_publish_step_leaves_one_version_and_the_rerun_finishes_it(tmp_path, tiny_config_path,
                                                                                   tiny_encoder, commands):
    """Overwrite, append and delete killed at each step of their publish (and on a disk that fills), with a reader
    searching throughout in another process: it never fails and always sees one whole published version; after
    each kill the path holds the old or the new index, and the rerun ends with exactly the new documents."""
    out = tmp_path / "index"
    chain = Chain(out, tmp_path, tiny_config_path, tiny_encoder, commands)
    source, first = chain.source("v0", 6)
    indexer.run(IndexJob(source, out, **JOB), encoder=tiny_encoder, progress=False)
    chain.versions.append(first)
    reader = Reader(out, tmp_path)
    try:
        kills = overwrite_killed_at_every_step(chain) + rerun_killed_while_it_finishes_the_publish(chain)
        kills += append_killed(chain) + delete_killed(chain)
        disk_fills(chain)
    finally:
        records = reader.stop()
    errors = [r["error"] for r in records if "error" in r]
    assert not errors, errors[:3]
    seen = {tuple(r["ids"]) for r in records}
    assert seen <= {tuple(v) for v in chain.versions}, seen - {tuple(v) for v in chain.versions}  # never a mix
    assert kills == 12 and len(records) >= 30 and len(seen) >= 4, (kills, len(records), len(seen))


def test_another_command_finishes_a_killed_publish_before_its_own_change(tmp_path, tiny_config_path, tiny_encoder,
                                                                         commands):
    """An overwrite killed between its moves; then a delete (another command) finishes that publish first and
    deletes from the new index; the overwrite's rerun finds itself published: the deleted document stays deleted."""
    out = tmp_path / "index"
    old = names(draw_images(tmp_path / "old", 5, prefix="old-"))
    indexer.run(IndexJob(tmp_path / "old", out, **JOB), encoder=tiny_encoder, progress=False)
    new = names(draw_images(tmp_path / "new", 6, prefix="new-"))
    prepare_unpublished(tmp_path / "new", out, tiny_encoder, overwrite=True)
    args = index_args(tmp_path / "new", out, tiny_config_path, "--overwrite")
    killed = commands.run(args, [kill("stair_search.index.publish:move_in", "after")], tmp_path / "kill.log")
    assert killed.returncode == -signal.SIGKILL and ids_of(out) == old, killed.output
    deleted = commands.run(["delete", str(out), new[0]], [], tmp_path / "delete.log")
    assert deleted.returncode == 0 and "deleted 1 document(s)" in deleted.output, deleted.output
    rerun = commands.run(args, [], tmp_path / "rerun.log")
    assert rerun.returncode == 0, rerun.output
    assert ids_of(out) == new[1:]
    assert_clean(out)


# ------------------------------------------------------------------------------------------------ the accelerated build


def test_a_kill_or_a_full_disk_in_the_accelerated_build_resumes(tmp_path, tiny_config_path, tiny_encoder, commands):
    """D6: a job killed while Seismic's folder is written leaves a temporary folder, which the rerun removes
    (it used to stop every rerun with IsADirectoryError); a full disk there is one line, and the rerun resumes."""
    draw_images(tmp_path / "images", 6)
    out = tmp_path / "index"
    args = index_args(tmp_path / "images", out, tiny_config_path)
    killed = commands.run(args, [kill("numpy:save", "before", "accelerated", nth=2)], tmp_path / "kill.log")
    assert killed.returncode == -signal.SIGKILL, killed.output
    assert [p for p in job_dir_of(out).rglob("*.tmp") if p.is_dir()], "killed outside the accelerated build"
    summary = indexer.run(IndexJob(tmp_path / "images", out, **JOB), encoder=tiny_encoder, progress=False)
    assert summary.resumed_from > 0 and ids_of(out) == names(sorted((tmp_path / "images").iterdir()))
    assert_clean(out)

    more = draw_images(tmp_path / "more", 5, prefix="more-", skip=6)
    args = index_args(tmp_path / "more", out, tiny_config_path, "--append")
    full = commands.run(args, [{"target": "numpy:save", "match": "accelerated", "nth": 4, "do": "enospc"}],
                        tmp_path / "full.log")
    assert_one_line_error(full, "No space left on device while indexing into", "the job resumes")
    assert len(ids_of(out)) == 6
    rerun = commands.run(args, [], tmp_path / "rerun.log")
    assert rerun.returncode == 0 and "resumed at item" in rerun.output, rerun.output
    assert ids_of(out) == sorted([*names(sorted((tmp_path / "images").iterdir())), *names(more)])
    assert_clean(out)


# ------------------------------------------------------------------------------------------------ a disk that fills


def test_a_disk_that_fills_during_an_overwrite_is_one_line_and_the_rerun_resumes(tmp_path, tiny_config_path,
                                                                                  tiny_encoder, commands):
    """A real full disk: a 32 MiB tmpfs holding the old index (two shards of ~7 MiB: Seismic's file) and 6 MiB of
    filler. The overwrite fails in its second shard with one line and exit 1, and the old index still answers;
    once the filler is gone the rerun resumes from its spool and journal (no image encoded again)."""
    if commands.no_disk:
        pytest.skip(f"the real full-disk case needs a private tmpfs: {commands.no_disk}")
    old = draw_images(tmp_path / "old", 6, prefix="old-")
    new = draw_images(tmp_path / "new", 6, prefix="new-")
    indexer.run(IndexJob(tmp_path / "old", tmp_path / "built", **JOB), encoder=tiny_encoder, progress=False)
    seen = commands.disk_seen / "index"  # the commands write commands.disk / "index"; this process reads it here
    shutil.copytree(tmp_path / "built", seen)
    (commands.disk_seen / "filler").write_bytes(b"\0" * (6 * 2**20))
    args = index_args(tmp_path / "new", commands.disk / "index", tiny_config_path, "--overwrite")
    full = commands.run(args, [], tmp_path / "full.log")
    assert_one_line_error(full, "No space left on device while indexing into", "MiB free on",
                          "run the same command again")
    assert ids_of(seen) == names(old)
    assert json.loads((job_dir_of(seen) / "journal.json").read_text())["shards"]  # the first shard fitted
    (commands.disk_seen / "filler").unlink()
    rerun = commands.run(args, [], tmp_path / "rerun.log")
    assert rerun.returncode == 0 and "resumed at item" in rerun.output, rerun.output
    assert ids_of(seen) == names(new)
    assert_clean(seen)


# ------------------------------------------------------------------------------------------------ in this process


def test_a_reader_opened_before_an_overwrite_still_answers_from_the_old_version(tmp_path, tiny_encoder, monkeypatch):
    """The overwrite never renames the index folder and keeps the replaced shards (for RETIRED_GRACE_S, and until
    a mutation after that), so a reader that resolved the old manifest (its parts opened lazily, later) still
    answers with the old documents; a mutation soon after keeps them, one after the grace removes them."""
    old = draw_images(tmp_path / "old", 5, prefix="old-")
    out = tmp_path / "index"
    indexer.run(IndexJob(tmp_path / "old", out, **JOB), encoder=tiny_encoder, progress=False)
    stale = IndexReader(out)
    draw_images(tmp_path / "new", 3, prefix="new-")
    indexer.run(IndexJob(tmp_path / "new", out, overwrite=True, **JOB), encoder=tiny_encoder, progress=False)
    first = next(stale.live())[:1]
    hits = stale.search(ShardQuery(10, sparse=stale.sparse_vectors(first)[0], dense=stale.vectors(first)[0]))
    assert {d["id"] for d in stale.documents(hits["dense"], ["id"])} == set(names(old))
    assert sorted(stale.ids()) == names(old) and len(ids_of(out)) == 3
    stale.close()
    replaced = {p.name for p in (out / "shards").iterdir()} - {s.name for s in Manifest.load(out).shards}
    assert len(replaced) == 2 and set(json.loads((out / RETIRED_FILE).read_text())) == {f"shards/{n}" for n in replaced}
    delete_documents(out, [ids_of(out)[0]])  # a mutation within the grace: the replaced shards stay
    assert replaced <= {p.name for p in (out / "shards").iterdir()}
    monkeypatch.setattr(publish_module, "RETIRED_GRACE_S", 0.0)
    delete_documents(out, [ids_of(out)[0]])  # after it: they go; the tombstone it replaces stays (retired now)
    shards = Manifest.load(out).shards
    assert {p.name for p in (out / "shards").iterdir()} == {s.name for s in shards}
    tombstones = {p.relative_to(out).as_posix() for p in out.glob(f"shards/*/{TOMBSTONE_PREFIX}*")}
    current = {f"shards/{s.name}/{s.deleted}" for s in shards if s.deleted}
    assert len(current) == 1 and set(json.loads((out / RETIRED_FILE).read_text())) == tombstones - current


def test_what_an_earlier_version_left_is_recovered(tmp_path, tiny_encoder):
    """D8 as the old code left it (the index renamed to .NAME.retired-*, nothing at the path) is put back by the
    next mutation; D5 as it left it (an append's shards moved in, no manifest naming them, no intent) resumes."""
    out = tmp_path / "index"
    old = draw_images(tmp_path / "old", 5, prefix="old-")
    indexer.run(IndexJob(tmp_path / "old", out, **JOB), encoder=tiny_encoder, progress=False)
    os.replace(out, tmp_path / ".index.retired-0123abcd")
    assert finish_interrupted_publish(out) == "restored" and ids_of(out) == names(old)

    added = draw_images(tmp_path / "new", 5, prefix="new-")
    prepare_unpublished(tmp_path / "new", out, tiny_encoder, append=True)
    job = job_dir_of(out)
    for shard in json.loads((job / "journal.json").read_text())["shards"]:  # the old code's moves, no intent
        os.replace(job / "build" / "shards" / shard["name"], out / "shards" / shard["name"])
    indexer.run(IndexJob(tmp_path / "new", out, append=True, **JOB), encoder=tiny_encoder, progress=False)
    assert ids_of(out) == sorted(names(old) + names(added))
    assert_clean(out)


def test_an_intent_that_cannot_complete_or_is_not_ours_is_dropped(tmp_path, tiny_encoder):
    """Recovery carries an intent out only when every part is there and the manifest is the one it replaced;
    otherwise (parts gone, another manifest, damaged or tampered JSON) it is dropped and nothing moves."""
    out = tmp_path / "index"
    old = draw_images(tmp_path / "old", 5, prefix="old-")
    indexer.run(IndexJob(tmp_path / "old", out, **JOB), encoder=tiny_encoder, progress=False)
    manifest = (out / MANIFEST).read_bytes()
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    base = {"format": 1, "replaces": manifest_digest(out), "manifest": {"shards": [{"name": "00009-gone00"}]},
            "moves": [[".index.building-x/shards/00009-gone00", "shards/00009-gone00"]], "remove": []}
    bad = [base, {**base, "manifest": {"shards": []}, "replaces": "0" * 64, "moves": []},
           {**base, "moves": [["../precious.txt", "shards/x"]]}, {**base, "remove": ["../precious.txt"]}]
    for intent in [*bad, "{not json"]:
        (out / INTENT_FILE).write_text(intent if isinstance(intent, str) else json.dumps(intent))
        assert finish_interrupted_publish(out) == "dropped", intent
        assert (out / MANIFEST).read_bytes() == manifest and not (out / INTENT_FILE).exists()
    assert outside.read_text() == "keep me" and ids_of(out) == names(old)


def test_every_shape_of_a_full_disk_is_recognised_and_reported_in_one_message(tmp_path):
    faiss_text = ("Error in void faiss::write_index(...): Error: 'ret == (size * 4)' failed: write error in "
                  "/x/dense.faiss: 4051 != 5120000 (No space left on device)")
    seismic_text = ("Failed to write index to '/x/seismic.index.seismic': Encode(Io { inner: Os { code: 28, kind: "
                    "StorageFull, message: \"No space left on device\" } })")
    full = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
            OSError("192000 requested and 92128 written"), RuntimeError(faiss_text), OSError(seismic_text)]
    for error in full:
        assert is_disk_full(error), error
    chained = ValueError("wrapped")
    chained.__cause__ = full[0]
    assert is_disk_full(chained) and not is_disk_full(OSError(errno.EACCES, "Permission denied"))
    with pytest.raises(DiskFullError) as caught, reporting_full_disk(tmp_path, "doing X", "nothing changed."):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f.npy"))
    message = str(caught.value)
    assert message.startswith("No space left on device while doing X (writing ") and "f.npy" in message
    assert "MiB free on" in message and message.endswith("run the same command again: nothing changed.")
    assert "\n" not in message and caught.value.errno == errno.ENOSPC
