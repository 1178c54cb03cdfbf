"""``stair-search index FOLDER --out INDEX --sync`` (issue 37): the index made to match a folder in one locked,
published version. New files are indexed, documents whose files are gone deleted, files changed since they were
indexed (size and modification time, or with ``--checksum`` their SHA-1) indexed again under the same id; a sync
with nothing to do publishes nothing. After each sync the index holds exactly the documents (ids, stored fields,
vectors) of an index built from the folder at once. A ``kill -9`` at each step of a sync's publish leaves the old
index answering, and the same command finishes it (the kill mechanism of tests/test_publish_atomic.py)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stair_search.cli import app
from stair_search.index import IndexReader, Manifest
from stair_search.index.layout import MANIFEST
from stair_search.index.publish import INTENT_FILE
from tests.conftest import draw_shape
from tests.test_cli_errors import cli_error
from tests.test_publish_atomic import Commands, assert_clean, index_args, kill

START = {"red-circle.png": ("red", "circle"), "blue-square.png": ("blue", "square"),
         "Pets/green-circle.png": ("green", "circle"), "Pets/yellow-square.png": ("yellow", "square"),
         "Pets/Cats/blue-circle.png": ("blue", "circle")}
AN_HOUR_AGO = 3600


def draw(folder: Path, name: str, colour: str, shape: str, background: str = "white") -> None:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    draw_shape(colour, shape, background=background).save(folder / name)


def make_folder(root: Path) -> Path:
    folder = root / "photos"
    for name, (colour, shape) in START.items():
        draw(folder, name, colour, shape)
        past = (folder / name).stat().st_mtime - AN_HOUR_AGO
        os.utime(folder / name, (past, past))
    return folder


def index(folder: Path, out: Path, model: Path, *extra: str) -> str:
    result = CliRunner().invoke(app, ["index", str(folder), "--out", str(out), "--model", str(model),
                                      "--workers", "0", *extra])
    assert result.exit_code == 0, result.output
    return result.output


def contents(out: Path) -> dict[str, tuple]:
    """Every live document: its stored fields and dense vector, by id."""
    with IndexReader(out) as reader:
        rows = [row for batch in reader.live() for row in zip(reader.documents(batch), reader.vectors(batch),
                                                              strict=True)]
    return {doc["id"]: (doc["source"], doc["caption"], doc["metadata"], np.round(vector, 5).tolist())
            for doc, vector in rows}


def same_as_built_at_once(out: Path, folder: Path, model: Path, root: Path, *extra: str) -> None:
    fresh = root / f"fresh-{len(list(root.iterdir()))}"
    index(folder, fresh, model, *extra)
    assert contents(out) == contents(fresh)


def test_a_sync_indexes_new_files_deletes_gone_ones_and_reindexes_changed_ones(tmp_path, tiny_config_path):
    folder, out = make_folder(tmp_path), tmp_path / "index"
    index(folder, out, tiny_config_path)
    digest = (out / MANIFEST).read_bytes()
    quiet = index(folder, out, tiny_config_path, "--sync")
    assert "sync: 0 new, 0 changed, 0 gone, 5 unchanged" in quiet and "nothing published" in quiet
    assert (out / MANIFEST).read_bytes() == digest  # no new version

    (folder / "blue-square.png").unlink()
    draw(folder, "Pets/Cats/red-square.png", "red", "square")
    draw(folder, "Trips/green-square.png", "green", "square")
    draw(folder, "Pets/green-circle.png", "green", "circle", background="black")  # edited in place
    (folder / "Pets" / "green-circle.txt").write_text("a green ball on a dark floor")  # a caption beside it
    synced = index(folder, out, tiny_config_path, "--sync")
    assert "sync: 2 new, 1 changed, 1 gone, 3 unchanged" in synced, synced
    assert Manifest.load(out).count == 6
    same_as_built_at_once(out, folder, tiny_config_path, tmp_path)
    assert contents(out)["Pets/green-circle.png"][1] == "a green ball on a dark floor"

    again = index(folder, out, tiny_config_path, "--sync")
    assert "sync: 0 new, 0 changed, 0 gone, 6 unchanged" in again and "nothing published" in again
    assert_clean(out)


def test_checksum_sees_an_edit_that_kept_the_size_and_the_time(tmp_path, tiny_config_path):
    folder, out = make_folder(tmp_path), tmp_path / "index"
    index(folder, out, tiny_config_path, "--checksum")
    assert all(len(doc[2]["sha1"]) == 40 for doc in contents(out).values())
    target = folder / "red-circle.png"
    stat = target.stat()
    draw(folder, "red-circle.png", "red", "circle", background="black")
    os.truncate(target, stat.st_size) if target.stat().st_size > stat.st_size else None
    with open(target, "ab") as f:  # the same size as before (PNG readers ignore bytes after IEND)
        f.write(b"\0" * (stat.st_size - target.stat().st_size))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size
    blind = index(folder, out, tiny_config_path, "--sync")
    assert "0 changed" in blind  # size and time alone cannot see it
    seen = index(folder, out, tiny_config_path, "--sync", "--checksum")
    assert "sync: 0 new, 1 changed, 0 gone, 4 unchanged" in seen, seen
    same_as_built_at_once(out, folder, tiny_config_path, tmp_path, "--checksum")


def test_a_sync_refuses_to_empty_the_index_when_the_source_is_empty(tmp_path, tiny_config_path, capsys):
    folder, out = make_folder(tmp_path), tmp_path / "index"
    index(folder, out, tiny_config_path)
    before = contents(out)
    for path in sorted(folder.rglob("*.png")):
        path.unlink()
    emptied = cli_error(["index", str(folder), "--out", str(out), "--model", str(tiny_config_path), "--workers", "0",
                         "--sync"], capsys)
    assert "would delete all 5 documents" in emptied and "mounted" in emptied
    assert contents(out) == before
    assert_clean(out)
    both = cli_error(["index", str(folder), "--out", str(out), "--sync", "--overwrite"], capsys)
    assert "does not combine with overwrite" in both


SYNC_KILLS = [
    kill("stair_search.index.writer:write_shard", "after"),  # the new shard built, nothing published
    kill("os:replace", "after", INTENT_FILE),  # the intent written, nothing moved
    kill("stair_search.index.publish:move_in", "after"),  # the new shard moved in, no manifest names it
    kill("os:replace", "before", MANIFEST),  # the new manifest written and synced, not renamed
]


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    zygote = Commands(tmp_path_factory.mktemp("disk"))
    yield zygote
    zygote.close()


def test_kill_9_at_every_step_of_a_sync_leaves_the_old_index_and_the_rerun_finishes(tmp_path, tiny_config_path,
                                                                                  commands):
    folder, out = make_folder(tmp_path), tmp_path / "index"
    index(folder, out, tiny_config_path, "--batch-size", "4", "--shard-size", "4")
    for step, hook in enumerate(SYNC_KILLS):
        before = contents(out)
        gone = sorted(before)[0]
        (folder / gone).unlink()
        draw(folder, f"new-{step}.png", "red", "triangle")
        killed = commands.run(index_args(folder, out, tiny_config_path, "--sync"), [hook], tmp_path / f"k{step}.log")
        assert killed.returncode == -signal.SIGKILL, killed.output
        assert contents(out) == before, hook  # the old version, whole
        rerun = commands.run(index_args(folder, out, tiny_config_path, "--sync"), [], tmp_path / f"r{step}.log")
        assert rerun.returncode == 0, rerun.output
        assert ("1 new" in rerun.output and "1 gone" in rerun.output) or "finished now" in rerun.output, rerun.output
        assert gone not in contents(out) and f"new-{step}.png" in contents(out)
        assert_clean(out)
    same_as_built_at_once(out, folder, tiny_config_path, tmp_path)


def write_parquet(path: Path, rows: dict[str, tuple[str, str, str]]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    def png(colour: str, shape: str, background: str) -> bytes:
        buffer = io.BytesIO()
        draw_shape(colour, shape, background=background).save(buffer, format="PNG")
        return buffer.getvalue()

    pq.write_table(pa.table({"key": list(rows), "image": [png(*spec) for spec in rows.values()],
                             "caption": [" ".join(spec) for spec in rows.values()]}), path)


def test_a_parquet_source_syncs_by_id_and_sees_changed_bytes_with_checksum(tmp_path, tiny_config_path):
    source, out = tmp_path / "items.parquet", tmp_path / "index"
    rows = {"a": ("red", "circle", "white"), "b": ("blue", "square", "white"), "c": ("green", "circle", "white")}
    columns = ["--id-column", "key", "--bytes-column", "image", "--caption-column", "caption"]
    write_parquet(source, rows)
    index(source, out, tiny_config_path, *columns, "--checksum")
    del rows["b"]
    rows["d"] = ("yellow", "square", "white")
    rows["c"] = ("green", "circle", "black")  # the same id, another image
    write_parquet(source, rows)
    by_id = index(source, out, tiny_config_path, *columns, "--sync")
    assert "sync: 1 new, 0 changed, 1 gone, 2 unchanged" in by_id, by_id  # ids alone: c's new bytes unseen
    with_bytes = index(source, out, tiny_config_path, *columns, "--sync", "--checksum")
    # c by its bytes; d because the sync that indexed it recorded no checksum (indexed again once, documented)
    assert "sync: 0 new, 2 changed, 0 gone, 1 unchanged" in with_bytes, with_bytes
    again = index(source, out, tiny_config_path, *columns, "--sync", "--checksum")
    assert "sync: 0 new, 0 changed, 0 gone, 3 unchanged" in again, again
    same_as_built_at_once(out, source, tiny_config_path, tmp_path, *columns, "--checksum")
