"""Whole indexing jobs on images drawn here: kill -9 and resume, bad input in skipped.parquet, append and
delete through the CLI, and a killed job that leaves the published index as it was.

The killed jobs are real ``stair-search index`` processes reading their list of paths from a named pipe:
the test feeds part of the list, waits (polling with a deadline) until the job has written a shard and
spooled a further chunk, and kills it while it waits for the next line. No sleeps decide the outcome.
"""

from __future__ import annotations

import contextlib
import decimal
import errno
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

import indexer
from indexer import IndexJob
from indexer.journal import read_chunk
from indexer.pipeline import PREFETCH_PER_WORKER
from indexer.sources import SourceOptions
from stair_search.cli import app
from stair_search.encode import Encoder
from stair_search.index import STORED_FIELDS, Candidate, IndexReader, ShardQuery
from stair_search.index.layout import (
    DENSE_FILE,
    FEATURES_FILE,
    LEGACY_FEATURES_FILE,
    SKIPPED_REPORT,
    SPARSE_DIR,
    read_tombstone,
)
from stair_search.index.manifest import MANIFEST, Manifest
from stair_search.index.store import FeatureRecord, FeatureStore, store_files, store_path
from tests.conftest import COLOURS, draw_shape, png_header
from tests.test_store import write_v1

BACKGROUNDS = ("white", "black", "gray", "pink", "orange")
SHAPES = ("circle", "square", "triangle")
DEADLINE_S = 240.0
JOB_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
REPO_ROOT = Path(__file__).resolve().parents[1]  # the job processes import this checkout's packages
CLI = [sys.executable, "-c", "from stair_search.cli import main; main()"]


# ------------------------------------------------------------------------------------------------ helpers


def draw_images(folder: Path, count: int, prefix: str = "", skip: int = 0) -> list[Path]:
    """``count`` different PNGs (colour x shape x background, after the first ``skip``) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    combos = [(c, s, b) for b in BACKGROUNDS for c in COLOURS for s in SHAPES]
    paths = []
    for colour, shape, background in combos[skip : skip + count]:
        path = folder / f"{prefix}{colour}-{shape}-{background}.png"
        draw_shape(colour, shape, background=background).save(path)
        paths.append(path)
    return paths


def index_contents(index_dir: Path) -> dict[str, tuple[np.ndarray, dict[int, float]]]:
    """Every live document's (dense vector, sparse {column: quantised weight}), read from the shard files."""
    import faiss

    contents = {}
    for shard in Manifest.load(index_dir).shards:
        folder = shard.path(index_dir)
        dense = faiss.read_index(str(folder / DENSE_FILE))
        vectors = dense.reconstruct_n(0, dense.ntotal)
        indptr, indices, values = (np.load(folder / SPARSE_DIR / f"{part}.npy")
                                   for part in ("indptr", "indices", "values"))
        deleted = set(read_tombstone(folder, shard.deleted, shard.name).tolist())
        with FeatureStore.open(folder / FEATURES_FILE) as store:
            ids = store.ids
        for row, doc_id in enumerate(ids):
            if row not in deleted:
                span = slice(indptr[row], indptr[row + 1])
                contents[doc_id] = (vectors[row], dict(zip(indices[span].tolist(), values[span].tolist(), strict=True)))
    return contents


def assert_same_documents(got: dict, expected: dict) -> None:
    assert sorted(got) == sorted(expected)
    for doc_id, (dense, sparse) in expected.items():
        np.testing.assert_allclose(got[doc_id][0], dense, atol=1e-5, err_msg=doc_id)
        assert got[doc_id][1].keys() == sparse.keys(), doc_id
        np.testing.assert_allclose([got[doc_id][1][t] for t in sparse], list(sparse.values()), atol=1, err_msg=doc_id)


def cli_args(source: Path, out: Path, model: Path, *extra: str) -> list[str]:
    return ["index", str(source), "--out", str(out), "--model", str(model), "--batch-size", "4",
            "--shard-size", "8", "--workers", "1", *extra]


def run_cli_process(args: list[str], log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as log_file:
        done = subprocess.run([*CLI, *args], env=JOB_ENV, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                              timeout=DEADLINE_S)
    done.output = log.read_text()
    return done


def wait_for(condition, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the job ended (rc {process.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()}")
        time.sleep(0.05)


def open_pipe_for_writing(fifo: Path, process: subprocess.Popen, log: Path) -> int:
    """The write end of ``fifo``, once the job has opened it for reading (ENXIO until then)."""
    fd = None

    def reader_is_there() -> bool:
        nonlocal fd
        try:
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                raise
        return fd is not None

    wait_for(reader_is_there, "the job opened its source", process, log)
    return fd


def job_dir_of(out: Path) -> Path | None:
    found = list(out.parent.glob(f".{out.name}.job-*"))
    return found[0] if found else None


def descendants(pid: int) -> set[int]:
    """Every living process below ``pid`` (children, grandchildren, ...), read from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its parent to read its status."""
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def kill_job_after_one_shard_and_one_spooled_chunk(args: list[str], fifo: Path, out: Path, lines: list[str],
                                                  log: Path) -> Path:
    """Start the job on ``fifo``, feed it part of ``lines``, kill -9 it mid-run; returns its job directory.
    Its helper processes (the decode workers' forkserver, the workers, the resource tracker) must end too.

    One decode worker keeps ``PREFETCH_PER_WORKER`` items in flight, so after ``PREFETCH + 14`` lines the job
    has encoded items 0..13: chunks 0 and 1 (batch 4) made shard 0 (shard size 8), chunk 2 is spooled, and
    the job blocks reading the next line.
    """
    os.mkfifo(fifo)
    with open(log, "w") as log_file:
        process = subprocess.Popen([*CLI, *args], env=JOB_ENV, cwd=REPO_ROOT, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        fd = open_pipe_for_writing(fifo, process, log)
        os.write(fd, "".join(f"{line}\n" for line in lines[: PREFETCH_PER_WORKER + 14]).encode())

        def shard_and_chunk_written() -> bool:
            job = job_dir_of(out)
            journal = job / "journal.json" if job else None
            return bool(journal and journal.is_file() and json.loads(journal.read_text())["shards"]
                        and any((job / "chunks").glob("*.npz")))

        wait_for(shard_and_chunk_written, "a shard and a spooled chunk", process, log)
        helpers = descendants(process.pid)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert helpers, "the job started no decode worker processes"
    deadline = time.monotonic() + DEADLINE_S
    while (orphans := {pid for pid in helpers if alive(pid)}) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not orphans, f"processes of the killed job still run: {orphans}"
    os.close(fd)
    fifo.unlink()
    return job_dir_of(out)


# ------------------------------------------------------------------------------------------------ resume


def test_a_job_killed_mid_run_resumes_without_losing_or_repeating_documents(tmp_path, tiny_config_path,
                                                                           tiny_encoder):
    images = draw_images(tmp_path / "images", 60)
    lines = [str(p) for p in images]
    source, out = tmp_path / "list.txt", tmp_path / "index"
    args = cli_args(source, out, tiny_config_path)
    job = kill_job_after_one_shard_and_one_spooled_chunk(args, source, out, lines, tmp_path / "killed.log")

    assert not out.exists()  # nothing published by the killed run
    journal = json.loads((job / "journal.json").read_text())
    spooled = [read_chunk(p) for p in sorted((job / "chunks").glob("*.npz"))]
    resume_at = max([journal["end"], *(c.end for c in spooled)])
    assert len(journal["shards"]) == 1 and spooled and 0 < resume_at < len(lines)

    source.write_text("".join(f"{line}\n" for line in lines))  # the same path, now the whole list
    resumed = run_cli_process(args, tmp_path / "resumed.log")
    assert resumed.returncode == 0, resumed.output
    assert f"resumed at item {resume_at}" in resumed.output and "indexed 60" in resumed.output
    assert not job.exists()

    ids = IndexReader(out).ids()
    assert len(ids) == len(set(ids)) == 60 and set(ids) == set(lines)  # each once, id = the listed path
    clean = tmp_path / "clean"
    indexer.run(IndexJob(source, clean, batch_size=4, shard_size=8, workers=0), encoder=tiny_encoder, progress=False)
    assert_same_documents(index_contents(out), index_contents(clean))


class CtrlCAfter(Encoder):
    """The real encoder, interrupted by ``error`` (default a Ctrl-C) once ``batches`` batches are encoded."""

    def __init__(self, model, batches: int, error: BaseException | type[BaseException] = KeyboardInterrupt):
        super().__init__(model, batch_size=4)
        self.left, self.error = batches, error

    def encode_pixels(self, pixels):
        if self.left == 0:
            raise self.error
        self.left -= 1
        return super().encode_pixels(pixels)


def test_ctrl_c_keeps_the_spool_for_a_resume_and_no_resume_starts_over(tmp_path, tiny_encoder):
    images = draw_images(tmp_path / "images", 12)
    options = {"batch_size": 4, "shard_size": 100, "workers": 0}
    for resume, out in ((True, tmp_path / "resumed"), (False, tmp_path / "restarted")):
        with pytest.raises(KeyboardInterrupt):
            indexer.run(IndexJob(tmp_path / "images", out, **options), encoder=CtrlCAfter(tiny_encoder.model,
                                                                                          batches=2), progress=False)
        assert not out.exists() and list((job_dir_of(out) / "chunks").glob("*.npz"))  # 2 batches spooled
        summary = indexer.run(IndexJob(tmp_path / "images", out, resume=resume, **options), encoder=tiny_encoder,
                              progress=False)
        assert (summary.resumed_from, summary.encoded_now) == ((8, 4) if resume else (0, 12))
        assert sorted(IndexReader(out).ids()) == sorted(p.name for p in images) and job_dir_of(out) is None
    assert_same_documents(index_contents(tmp_path / "resumed"), index_contents(tmp_path / "restarted"))


def test_a_job_that_fails_before_spooling_anything_leaves_nothing_behind(tmp_path, tiny_encoder):
    draw_images(tmp_path / "images", 6)
    pq.write_table(pa.table({"path": ["a.png"]}), tmp_path / "data.parquet")
    out = tmp_path / "index"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        indexer.run(IndexJob(tmp_path / "no-such-folder", out, workers=0), encoder=tiny_encoder, progress=False)
    with pytest.raises(ValueError, match="not found"):
        indexer.run(IndexJob(tmp_path / "data.parquet", out, workers=0,
                             options=SourceOptions(caption_column="caption_en")), encoder=tiny_encoder, progress=False)
    crash = CtrlCAfter(tiny_encoder.model, batches=0, error=RuntimeError("the encoder crashed"))
    with pytest.raises(RuntimeError, match="crashed"):
        indexer.run(IndexJob(tmp_path / "images", out, workers=0), encoder=crash, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.parquet", "images"]  # no index, job or lock
    crash = CtrlCAfter(tiny_encoder.model, batches=1, error=RuntimeError("the encoder crashed"))
    with pytest.raises(RuntimeError, match="crashed"):  # after one batch: its spool is kept for a resume
        indexer.run(IndexJob(tmp_path / "images", out, workers=0, batch_size=4), encoder=crash, progress=False)
    assert list((job_dir_of(out) / "chunks").glob("*.npz"))
    summary = indexer.run(IndexJob(tmp_path / "images", out, workers=0, batch_size=4), encoder=tiny_encoder,
                          progress=False)
    assert (summary.resumed_from, summary.indexed) == (4, 6) and job_dir_of(out) is None


def test_running_a_finished_job_again_says_it_is_complete_and_changes_nothing(tmp_path, tiny_config_path):
    draw_images(tmp_path / "images", 3)
    out = tmp_path / "index"
    args = ["index", str(tmp_path / "images"), "--out", str(out), "--model", str(tiny_config_path), "--workers", "0"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    manifest = (out / MANIFEST).read_bytes()
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0 and "already complete" in again.output, again.output
    assert "holds 3 documents" in again.output and (out / MANIFEST).read_bytes() == manifest
    changed = CliRunner().invoke(app, [*args, "--max-pixels", "1000"])  # another job: the index is not its own
    assert changed.exit_code == 1 and "already holds an index" in str(changed.exception)


# ------------------------------------------------------------------------------------------------ bad input


def encoded_bytes(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def write_bad_and_odd_files(folder: Path) -> dict[str, str]:
    """Every kind of bad input the job must skip; returns {file name: expected reason (prefix)}."""
    folder.mkdir()
    good_jpeg = encoded_bytes(draw_shape("red", "circle"), "JPEG")
    (folder / "empty.png").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "notes.jpg").write_text("a text file with an image suffix")
    (folder / "bomb.png").write_bytes(png_header(30000, 30000))  # over twice PIL's limit: it refuses to open it
    (folder / "photo.png").write_bytes(encoded_bytes(Image.new("L", (12000, 9000)), "PNG"))  # over PIL's warning
    (folder / "huge.png").write_bytes(encoded_bytes(Image.new("L", (1200, 1000)), "PNG"))  # > max_pixels below
    os.mkfifo(folder / ".fifo")
    (folder / "pipe.png").symlink_to(folder / ".fifo")  # a plain open() would block the job forever
    (folder / "zero.png").symlink_to("/dev/zero")  # a plain read() would fill the memory
    (folder / "IMG_0001.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic")
    expected = {"empty.png": "empty file", "truncated.jpg": "corrupt or truncated image",
                "notes.jpg": "not an image", "bomb.png": "too large: 900000000 > 178956970 pixels",
                "photo.png": "too large: 12000x9000 > 1000000 pixels",
                "huge.png": "too large: 1200x1000 > 1000000 pixels",
                "pipe.png": "not a regular file (a FIFO, device or socket)",
                "zero.png": "not a regular file (a FIFO, device or socket)",
                "IMG_0001.heic": "unsupported image format (.heic): convert it to JPEG or PNG"}
    if os.geteuid() != 0:  # root reads a chmod 000 file anyway, so the case only exists for other users
        draw_shape("red", "circle").save(folder / "unreadable.png")
        (folder / "unreadable.png").chmod(0)
        expected["unreadable.png"] = "unreadable: permission denied"
    return expected


def write_convertible_files(folder: Path) -> dict[str, Image.Image]:
    """Valid but unusual images (lossless, so the expected pixels are exact); returns {file name: the RGB
    picture the model must see}."""
    cmyk = Image.new("CMYK", (64, 64), (0, 255, 255, 0))  # magenta + yellow ink = red
    (folder / "cmyk.tif").write_bytes(encoded_bytes(cmyk, "TIFF"))
    sixteen = np.tile(np.linspace(0, 65535, 64, dtype=np.uint16), (64, 1))
    (folder / "sixteen.png").write_bytes(encoded_bytes(Image.fromarray(sixteen), "PNG"))
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(0, (0, 0, 32, 64))  # left half transparent
    (folder / "palette.png").write_bytes(encoded_bytes(palette, "PNG", transparency=0))
    frames = [draw_shape("blue", "square"), draw_shape("green", "triangle")]
    (folder / "animated.gif").write_bytes(encoded_bytes(frames[0], "GIF", save_all=True, append_images=frames[1:]))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    upright = draw_shape("yellow", "triangle")
    (folder / "rotated.png").write_bytes(encoded_bytes(upright.transpose(Image.Transpose.ROTATE_90), "PNG", exif=exif))
    left_white = Image.new("RGB", (64, 64), (255, 0, 0))
    left_white.paste((255, 255, 255), (0, 0, 32, 64))
    grey = Image.fromarray((sixteen // 256).astype(np.uint8)).convert("RGB")
    return {"cmyk.tif": Image.new("RGB", (64, 64), (255, 0, 0)), "sixteen.png": grey, "palette.png": left_white,
            "animated.gif": frames[0], "rotated.png": upright}


def test_every_bad_input_is_skipped_with_its_reason_and_odd_images_are_converted(tmp_path, tiny_encoder):
    folder = tmp_path / "photos"
    expected_skips = write_bad_and_odd_files(folder)
    expected_pictures = write_convertible_files(folder)
    draw_shape("green", "circle").save(folder / "good.png")
    out = tmp_path / "index"
    summary = indexer.run(IndexJob(folder, out, workers=1, max_pixels=1_000_000), encoder=tiny_encoder, progress=False)

    report = pq.read_table(out / SKIPPED_REPORT).to_pylist()
    reasons = {row["id"]: row["reason"] for row in report}
    assert sorted(reasons) == sorted(expected_skips)
    for name, reason in expected_skips.items():
        assert reasons[name].startswith(reason), (name, reasons[name])
    assert summary.indexed == len(expected_pictures) + 1 and "skipped" in summary.describe()

    contents = index_contents(out)
    assert sorted(contents) == sorted([*expected_pictures, "good.png"])
    wanted = tiny_encoder.encode_images(list(expected_pictures.values())).dense
    for name, vector in zip(expected_pictures, wanted, strict=True):
        np.testing.assert_allclose(contents[name][0], vector, atol=1e-5, err_msg=name)
    as_stored = Image.fromarray(np.asarray(Image.open(folder / "rotated.png").convert("RGB")))  # EXIF dropped
    second_frame, unrotated = tiny_encoder.encode_images([draw_shape("green", "triangle"), as_stored]).dense
    for name, wrong in (("animated.gif", second_frame), ("rotated.png", unrotated)):  # the checks can tell
        assert np.abs(contents[name][0] - wrong).max() > 1e-4, name


def test_names_that_are_not_utf8_and_metadata_json_cannot_hold_are_indexed(tmp_path, tiny_encoder):
    folder = tmp_path / "photos"
    folder.mkdir()
    draw_shape("red", "circle").save(folder / "red.png")
    (Path(os.fsencode(folder).decode() + "/caf\udce9.png")).write_bytes(  # b"caf\xe9.png": Latin-1, not UTF-8
        encoded_bytes(draw_shape("blue", "circle"), "PNG"))
    summary = indexer.run(IndexJob(folder, tmp_path / "folder-index", workers=0), encoder=tiny_encoder, progress=False)
    assert summary.indexed == 2 and sorted(IndexReader(tmp_path / "folder-index").ids()) == ["caf\\xe9.png", "red.png"]
    images = [encoded_bytes(draw_shape(colour, "square"), "PNG") for colour in ("red", "blue")]
    table = pa.table({"id": ["a", "b"], "image": images,
                      "taken": pa.array([1_700_000_000, None], pa.timestamp("s")),
                      "price": pa.array([decimal.Decimal("1.50"), decimal.Decimal("2")], pa.decimal128(5, 2)),
                      "score": [float("nan"), 0.5]})
    pq.write_table(table, tmp_path / "odd.parquet")
    options = SourceOptions(id_column="id", metadata_columns=("taken", "price", "score"))
    indexer.run(IndexJob(tmp_path / "odd.parquet", tmp_path / "parquet-index", workers=0, options=options),
                encoder=tiny_encoder, progress=False)
    index = IndexReader(tmp_path / "parquet-index")
    rows = index.documents([Candidate(0, 0, 0.0), Candidate(0, 1, 0.0)], ["id", "metadata"])
    assert [r["metadata"] for r in rows] == [{"taken": "2023-11-14T22:13:20", "price": 1.5, "score": None},
                                             {"taken": None, "price": 2.0, "score": 0.5}]


def test_missing_files_named_in_a_parquet_or_a_list_are_reported(tmp_path, tiny_encoder):
    good = draw_images(tmp_path / "images", 2)
    gone = tmp_path / "images" / "gone.png"
    pq.write_table(pa.table({"path": [str(good[0]), str(gone), str(good[1])], "caption": ["a", "b", "c"]}),
                   tmp_path / "data.parquet")
    (tmp_path / "list.txt").write_text(f"{good[0]}\n{gone}\n")
    for source, indexed in ((tmp_path / "data.parquet", 2), (tmp_path / "list.txt", 1)):
        out = tmp_path / f"index-{source.suffix[1:]}"
        summary = indexer.run(IndexJob(source, out, workers=0), encoder=tiny_encoder, progress=False)
        assert summary.indexed == indexed
        assert pq.read_table(out / SKIPPED_REPORT).to_pylist() == [
            {"id": str(gone), "source": str(gone), "reason": "missing file"}]


def test_nothing_usable_is_a_clear_error_that_leaves_nothing_behind(tmp_path, tiny_encoder):
    folder = tmp_path / "photos"
    write_bad_and_odd_files(folder)
    with pytest.raises(ValueError, match=r"Nothing to index in .*photos.*none readable .*empty file"):
        indexer.run(IndexJob(folder, tmp_path / "index", workers=0, max_pixels=1_000_000), encoder=tiny_encoder,
                    progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no index, no job directory


def test_a_script_without_a_main_guard_gets_a_clear_error_instead_of_a_hang(tmp_path, tiny_config_path):
    """Decode workers import the caller's script again; unguarded, it would index again in every worker."""
    draw_images(tmp_path / "photos", 4)
    call = (f"indexer.run(indexer.IndexJob({str(tmp_path / 'photos')!r}, {str(tmp_path / 'index')!r}, "
            f"model={str(tiny_config_path)!r}, workers=1), progress=False)")
    for name, body in (("unguarded", f"import indexer\n{call}\n"),
                       ("guarded", f"import indexer\nif __name__ == '__main__':\n    {call}\n")):
        script = tmp_path / f"{name}.py"
        script.write_text(body)
        done = subprocess.run([sys.executable, str(script)], env={**JOB_ENV, "PYTHONPATH": str(REPO_ROOT)},
                              cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE_S)
        if name == "unguarded":
            assert done.returncode == 1 and "put the call under `if __name__ == \"__main__\":`" in done.stderr
            assert not (tmp_path / "index").exists()
        else:
            assert done.returncode == 0, done.stderr
            indexed = IndexReader(tmp_path / "index").ids()
            assert sorted(indexed) == sorted(p.name for p in (tmp_path / "photos").iterdir())


def test_progress_bar_shows_rate_and_eta_and_the_summary_counts_skips_by_reason(tmp_path, tiny_encoder, capsys):
    folder = tmp_path / "photos"
    draw_images(folder, 5)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    summary = indexer.run(IndexJob(folder, tmp_path / "index", workers=0), encoder=tiny_encoder, progress=True)
    bar = capsys.readouterr().err
    assert "images/s" in bar and "ETA" in bar and "7/7" in bar  # the total is known for a folder
    assert summary.reasons() == {"empty file": 1, "not an image": 1}
    text = summary.describe()
    assert text.startswith("indexed 5 in ") and " images/s)" in text
    assert "skipped 2: 1 empty file, 1 not an image" in text and SKIPPED_REPORT in text


def test_cli_takes_ids_captions_and_metadata_from_the_columns_it_is_given(tmp_path, tiny_config_path):
    pictures = {"k1": draw_shape("red", "circle"), "k2": draw_shape("blue", "square")}
    pq.write_table(pa.table({"key": list(pictures), "jpeg": [encoded_bytes(im, "PNG") for im in pictures.values()],
                             "alt": ["a red circle", "a blue square"], "colour": ["red", "blue"], "other": [1, 2]}),
                   tmp_path / "data.parquet")
    out = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", str(tmp_path / "data.parquet"), "--out", str(out), "--model",
                                      str(tiny_config_path), "--workers", "0", "--id-column", "key", "--bytes-column",
                                      "jpeg", "--caption-column", "alt", "--metadata-column", "colour"])
    assert result.exit_code == 0, result.output
    index = IndexReader(out)
    rows = index.documents([Candidate(0, 0, 1.0), Candidate(0, 1, 1.0)], ["id", "caption", "metadata"])
    assert [(r["id"], r["caption"], r["metadata"]) for r in rows] == [
        ("k1", "a red circle", {"colour": "red"}), ("k2", "a blue square", {"colour": "blue"})]


def test_a_truncated_tar_among_good_shards_is_skipped_and_the_job_completes(tmp_path, tiny_encoder):
    for shard, colours in enumerate([("red", "blue"), ("green", "yellow"), ("red", "green")]):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for colour in colours:
                data = encoded_bytes(draw_shape(colour, "circle"), "PNG", compress_level=0)
                info = tarfile.TarInfo(f"{colour}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    middle = tmp_path / "shard-001.tar"
    middle.write_bytes(middle.read_bytes()[:1800])  # a copy that stopped inside the first image
    (tmp_path / "shard-002.tar").write_bytes((tmp_path / "shard-002.tar").read_bytes()[:-5000])  # inside the 2nd
    summary = indexer.run(IndexJob(str(tmp_path / "shard-{000..002}.tar"), tmp_path / "index", workers=1),
                          encoder=tiny_encoder, progress=False)
    assert sorted(IndexReader(tmp_path / "index").ids()) == ["shard-000.tar/blue", "shard-000.tar/red",
                                                       "shard-002.tar/red"]
    report = pq.read_table(tmp_path / "index" / SKIPPED_REPORT).to_pylist()
    assert [(r["id"], r["reason"].split(":")[0]) for r in report] == [
        ("shard-001.tar#0", "corrupt or truncated tar"), ("shard-002.tar#1", "corrupt or truncated tar")]
    assert summary.indexed == 3


def test_a_webdataset_shard_set_is_indexed_through_worker_processes(tmp_path, tiny_encoder):
    """``{000..001}.tar`` shards: members grouped by key, .txt captions and .json metadata, bytes decoded in
    real worker processes; the vectors equal encoding the same pictures directly."""
    pictures = {}
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for key, (colour, shape) in enumerate([("red", "circle"), ("blue", "square")][: shard + 1]):
                pictures[f"shard-{shard:03d}.tar/{colour}{key}"] = draw_shape(colour, shape)
                members = {f"{colour}{key}.png": encoded_bytes(draw_shape(colour, shape), "PNG"),
                           f"{colour}{key}.txt": f"a {colour} {shape}".encode(),
                           f"{colour}{key}.json": json.dumps({"colour": colour}).encode()}
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    summary = indexer.run(IndexJob(str(tmp_path / "shard-{000..001}.tar"), tmp_path / "index", workers=1),
                          encoder=tiny_encoder, progress=False)
    assert summary.indexed == 3 and not summary.skipped
    index = IndexReader(tmp_path / "index")
    rows = index.documents([Candidate(0, row, 0.0) for row in range(3)], ["id", "caption", "metadata"])
    assert [(r["id"], r["caption"], r["metadata"]["colour"]) for r in rows] == [
        ("shard-000.tar/red0", "a red circle", "red"), ("shard-001.tar/red0", "a red circle", "red"),
        ("shard-001.tar/blue1", "a blue square", "blue")]
    expected = tiny_encoder.encode_images(list(pictures.values()))
    got = index_contents(tmp_path / "index")
    for doc_id, dense in zip(pictures, expected.dense, strict=True):
        np.testing.assert_allclose(got[doc_id][0], dense, atol=1e-5, err_msg=doc_id)


# ------------------------------------------------------------------------------------------------ append, delete


def test_cli_append_adds_new_images_and_delete_removes_them_from_every_part(tmp_path, tiny_config_path,
                                                                              tiny_encoder):
    first, second = tmp_path / "first", tmp_path / "second"
    draw_images(first, 6)
    draw_images(second, 4, prefix="new-", skip=6)
    draw_shape("red", "circle", background="white").save(second / "red-circle-white.png")  # id already indexed
    out = tmp_path / "index"
    runner = CliRunner()
    model = ["--model", str(tiny_config_path), "--workers", "0"]
    built = runner.invoke(app, ["index", str(first), "--out", str(out), *model])
    assert built.exit_code == 0, built.output
    shards_before = len(Manifest.load(out).shards)
    # --no-merge: the merge policy would merge two shards this small into one (tests/test_compaction.py)
    appended = runner.invoke(app, ["index", str(second), "--out", str(out), "--append", "--no-merge", *model])
    assert appended.exit_code == 0, appended.output
    assert "indexed 4" in appended.output and "1 already in the index" in appended.output  # the end summary
    assert "images/s" in appended.output and "the index holds 10 documents" in appended.output
    assert len(Manifest.load(out).shards) == shards_before + 1  # a new shard, the old ones untouched
    everything = index_contents(out)
    assert len(everything) == 10

    doomed = ["new-blue-square-white.png", "green-circle-white.png"]

    def top_ids(index: IndexReader, doc_id: str) -> tuple[list[str], list[str]]:
        """The dense and the sparse route's hits for the document's own vectors."""
        dense, sparse = everything[doc_id]
        query = {index.vocabulary.tokens[t]: w / index.manifest.scale for t, w in sparse.items()}
        found = index.search(ShardQuery(10, sparse=query, dense=dense))
        return tuple([d["id"] for d in index.documents(hits, ["id"])] for hits in (found["dense"], found["sparse"]))

    for doc_id in doomed:
        assert [ids[0] for ids in top_ids(IndexReader(out), doc_id)] == [doc_id, doc_id]
    deleted = runner.invoke(app, ["delete", str(out), *doomed, "no-such-id"])
    assert deleted.exit_code == 1
    assert "deleted 2 document(s)" in deleted.output and "no-such-id" in deleted.output

    index = IndexReader(out)
    assert sorted(index.ids()) == sorted(set(everything) - set(doomed))
    for doc_id in doomed:
        dense_ids, sparse_ids = top_ids(index, doc_id)
        assert len(dense_ids) == 8 and sparse_ids and not set(doomed) & {*dense_ids, *sparse_ids}
    assert index.find(doomed[0]) is None  # the store never hands it out
    survivor = next(doc_id for doc_id in everything if doc_id not in doomed)
    assert index.find(survivor) is not None and index.documents([index.find(survivor)])[0]["id"] == survivor
    again = runner.invoke(app, ["delete", str(out), doomed[0]])
    assert again.exit_code == 1 and "deleted 0" in again.output


# ------------------------------------------------------------------------------------------------ atomic publish


def test_a_killed_append_leaves_the_published_index_readable_and_unchanged(tmp_path, tiny_config_path,
                                                                           tiny_encoder):
    out = tmp_path / "index"
    draw_images(tmp_path / "old", 5)
    indexer.run(IndexJob(tmp_path / "old", out, workers=0), encoder=tiny_encoder, progress=False)
    manifest_before = (out / MANIFEST).read_bytes()
    contents_before = index_contents(out)
    new_images = draw_images(tmp_path / "new", 40, prefix="new-")
    source = tmp_path / "more.txt"
    args = cli_args(source, out, tiny_config_path, "--append")
    job = kill_job_after_one_shard_and_one_spooled_chunk(args, source, out, [str(p) for p in new_images],
                                                        tmp_path / "killed.log")

    assert json.loads((job / "journal.json").read_text())["shards"]  # a shard was built, but not published
    assert (out / MANIFEST).read_bytes() == manifest_before
    assert_same_documents(index_contents(out), contents_before)
    assert sorted(p.name for p in out.iterdir()) == sorted([MANIFEST, "shards"])  # nothing half-moved in
    assert all((shard.path(out) / FEATURES_FILE).is_file() for shard in Manifest.load(out).shards)

    source.write_text("".join(f"{p}\n" for p in new_images))
    resumed = run_cli_process(args, tmp_path / "resumed.log")
    assert resumed.returncode == 0, resumed.output
    assert sorted(IndexReader(out).ids()) == sorted([*contents_before, *map(str, new_images)])


# ------------------------------------------------------------------------------------------------ store format 1


def test_an_index_built_before_store_format_2_still_reads_filters_appends_deletes_and_exports(tmp_path,
                                                                                               tiny_encoder):
    """Its shards hold features.parquet (format 1, written as the parquet writer made it): reads give the same
    answers, an append writes format 2 shards beside them, and deletes and exports span both formats."""
    out = tmp_path / "index"
    draw_images(tmp_path / "old", 6)
    indexer.run(IndexJob(tmp_path / "old", out, workers=0), encoder=tiny_encoder, progress=False)
    with IndexReader(out) as index:
        ids = sorted(index.ids())
        found = [index.find(doc_id) for doc_id in ids]
        fields_before, local_before = index.documents(found, STORED_FIELDS), index.features(found)[1:]
        dense = index.vectors(found)
    for shard in Manifest.load(out).shards:
        folder = shard.path(out)
        with FeatureStore.open(folder / FEATURES_FILE) as store:
            records = [FeatureRecord(**row) for row in store.rows(range(len(store)))]
        for row, record in enumerate(records):
            record.metadata = {"row": row}  # something for a filter to read (a folder's images have no metadata)
        write_v1(folder / LEGACY_FEATURES_FILE, records, row_group_size=4)
        for path in store_files(folder / FEATURES_FILE):
            path.unlink()
    assert not list(out.glob(f"shards/*/{FEATURES_FILE}")) and list(out.glob(f"shards/*/{LEGACY_FEATURES_FILE}"))

    with IndexReader(out) as index:
        assert sorted(index.ids()) == ids
        found = [index.find(doc_id) for doc_id in ids]
        assert index.documents(found, STORED_FIELDS) == [{**f, "metadata": {"row": c.row}}
                                                         for f, c in zip(fields_before, found, strict=True)]
        for got, want in zip(index.features(found)[1:], local_before, strict=True):
            np.testing.assert_array_equal(got, want)
        kept = index.check_filter({"row": [found[2].row, found[4].row]})
        hits = index.search(ShardQuery(3, dense=dense[2], filter=kept))["dense"]
        assert [doc["id"] for doc in index.documents(hits, ["id"])] == [ids[2], ids[4]]

    draw_images(tmp_path / "new", 3, prefix="new-", skip=6)
    # merge=False: the merge policy would rewrite the old shard in the new format (tests/test_compaction.py)
    indexer.run(IndexJob(tmp_path / "new", out, workers=0, append=True, merge=False), encoder=tiny_encoder,
                progress=False)
    kinds = sorted(store_path(shard.path(out)).name for shard in Manifest.load(out).shards)
    assert kinds == [FEATURES_FILE, LEGACY_FEATURES_FILE]
    with IndexReader(out) as index:
        everything = sorted(index.ids())
        assert len(everything) == 9 and set(ids) < set(everything)
        assert index.delete([ids[0], next(i for i in everything if i not in ids)]) == 2
        assert index.find(ids[0]) is None and index.find(ids[1]) is not None
    exported = CliRunner().invoke(app, ["export", str(out), "--out", str(tmp_path / "all.parquet")])
    assert exported.exit_code == 0, exported.output
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.num_rows == 7 and ids[0] not in table.column("id").to_pylist()
