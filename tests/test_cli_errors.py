"""Every plain user error of the CLI is one line on stderr and exit status 1, never a traceback (real files,
the real entry point); ``--debug`` shows the traceback instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexer import IndexJob
from stair_search.cli import main
from tests.conftest import draw_shape

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_config_path) -> Path:
    """A folder of two images, an index built from it, and a parquet file without a caption column."""
    import indexer

    root = tmp_path_factory.mktemp("cli")
    (root / "images").mkdir()
    for colour in ("red", "blue"):
        draw_shape(colour, "circle").save(root / "images" / f"{colour}.png")
    indexer.run(IndexJob(root / "images", root / "index", model=str(tiny_config_path), workers=0), progress=False)
    pq.write_table(pa.table({"path": [str(root / "images" / "red.png")]}), root / "data.parquet")
    (root / "broken").mkdir()
    (root / "broken" / "manifest.json").write_text('{"model": ')
    return root


def cli_error(args: list[str], capsys) -> str:
    """Run the entry point; the one line it printed (asserting a failing exit status, 1 for errors and 2 for
    usage errors as click has it, and nothing else printed)."""
    with pytest.raises(SystemExit) as stopped:
        main(args)
    err = capsys.readouterr().err
    assert stopped.value.code in (1, 2), err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stair-search: error: ") and "Traceback" not in err, err
    return lines[0]


def test_each_user_error_is_one_line(workspace, tiny_config_path, capsys, monkeypatch):
    model = ["--model", str(tiny_config_path)]
    cases = [
        (["search", str(workspace / "no-index"), "red", *model], "is not a stair-search index"),
        (["search", str(workspace / "broken"), "red", *model], "manifest.json is damaged"),
        (["search", str(workspace / "index"), "--image", str(workspace / "nope.png"), *model], "nope.png"),
        (["info", str(workspace / "images")], "is not a stair-search index"),
        (["delete", str(workspace / "no-index"), "red.png"], "is not a stair-search index"),
        (["index", str(workspace / "missing"), "--out", str(workspace / "new"), *model], "does not exist"),
        (["index", str(workspace / "data.parquet"), "--out", str(workspace / "new"), "--caption-column", "alt",
          *model], "columns ['alt'] not found"),
        (["index", str(workspace / "images"), "--out", str(workspace / "index"), "--shard-size", "7", *model],
         "already holds an index: pass append=True (--append)"),  # another job than the one that built it
        (["index", str(workspace / "images"), "--out", str(workspace / "new"), "--dense", "banana", *model],
         "banana"),
        (["search", str(workspace / "index"), "red", "-k", "0", *model], "(see: stair-search search --help)"),
        (["align", str(workspace / "data.parquet"), "--out", str(workspace / "a.npy"), *model],
         "training pairs need an 'image_path' (or 'path') and a 'caption' column"),
        (["align", str(workspace / "data.parquet"), "--out", str(workspace / "a.npy"), "--target", "words", *model],
         "Unknown alignment target 'words'; use --target concepts or dense"),
        (["search"], "Missing argument 'INDEX'"),
        (["serch", "x"], "No such command 'serch'"),
    ]
    for args, needle in cases:
        assert needle in cli_error(args, capsys), args
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: import ray raises ImportError
    line = cli_error(["index", str(workspace / "images"), "--out", str(workspace / "new"), "--runner", "ray",
                      *model], capsys)
    assert "--runner ray needs Ray: pip install 'ray>=2.9'" in line
    leftovers = sorted(p.name for p in workspace.iterdir())
    assert leftovers == ["broken", "data.parquet", "images", "index"]  # no new index, job folder or lock


def test_the_installed_entry_point_prints_one_line_and_debug_shows_the_traceback(workspace):
    command = [sys.executable, "-m", "stair_search.cli", "search", str(workspace / "no-index"), "red"]
    plain = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 1 and plain.stderr.count("\n") == 1, plain.stderr
    debug = subprocess.run([*command[:3], "--debug", *command[3:]], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    assert "is not a stair-search index" in " ".join(debug.stderr.split())
