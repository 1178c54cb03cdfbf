"""A new user's first hour with the command line (issue 40's smaller items): help that wraps instead of cutting
option names, what indexing skipped shown by ``info``, and ``serve`` on a busy port stopping before it loads
anything. (The one line a first run prints while it builds the concept bank is checked where a bank is built anyway:
tests/test_concepts.py.)"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

import indexer
from indexer import IndexJob
from stair_search.cli import main
from stair_search.cli.commands import app
from tests.conftest import draw_shape

COMMANDS = [command.name or command.callback.__name__ for command in app.registered_commands]


def run(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(args)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def documents(manifest: str) -> int:
    return sum(shard["count"] for shard in json.loads(manifest)["shards"])


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_wraps_at_80_columns_and_cuts_nothing(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run([command, "--help"] if command else ["--help"], capsys)
    assert code == 0
    assert [line for line in out.splitlines() if len(line) > 80] == []
    assert "…" not in out
    assert [line for line in out.splitlines()[1:] if line.rstrip().endswith("...")] == []  # click's cut help
    if command == "index":
        assert "--caption-column <str>" in out and "--metadata-column <list[str]>" in out


def test_the_command_alone_lists_the_commands(capsys):
    code, out, err = run([], capsys)
    assert code == 2 and err == ""
    assert out.startswith("Usage: stair-search") and all(f"  {command} " in out for command in COMMANDS)


@pytest.fixture(scope="module")
def index_with_skips(tmp_path_factory, tiny_encoder) -> Path:
    """Two drawings and three files indexing cannot read: an empty one, a text file named .png, a cut PNG."""
    folder = tmp_path_factory.mktemp("photos")
    for colour in ("red", "blue"):
        draw_shape(colour, "circle").save(folder / f"{colour}.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "cut.png").write_bytes((folder / "red.png").read_bytes()[:60])
    out = tmp_path_factory.mktemp("index-with-skips") / "index"
    indexer.run(IndexJob(folder, out, workers=0), encoder=tiny_encoder, progress=False)
    return out


def test_info_shows_how_many_items_were_skipped_and_why(index_with_skips, capsys):
    code, out, err = run(["info", str(index_with_skips)], capsys)
    assert code == 0
    assert documents(out) == 2  # stdout stays the manifest's JSON
    lines = err.splitlines()
    assert lines[0] == f"skipped 3 items ({index_with_skips / 'skipped.parquet'}):"
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == ["cut.png", "empty.png", "notes.png"]
    assert all(line.startswith("  ") and len(line.split(": ", 1)[1]) > 5 for line in lines[1:])  # each a reason
    code, _, err = run(["info", str(index_with_skips), "--skipped", "1"], capsys)
    assert code == 0 and err.splitlines()[0].endswith("; the first 1:") and len(err.splitlines()) == 2
    code, _, err = run(["info", str(index_with_skips), "--skipped", "0"], capsys)
    assert code == 0 and err.splitlines() == [f"skipped 3 items ({index_with_skips / 'skipped.parquet'})"]


def test_info_of_an_index_that_skipped_nothing_says_nothing_more(tmp_path, tiny_encoder, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    draw_shape("red", "circle").save(folder / "red.png")
    indexer.run(IndexJob(folder, tmp_path / "index", workers=0), encoder=tiny_encoder, progress=False)
    code, out, err = run(["info", str(tmp_path / "index")], capsys)
    assert code == 0 and documents(out) == 1 and err == ""


@pytest.mark.parametrize("reuse", [False, True])
def test_serve_on_a_busy_port_stops_at_once_naming_the_port_and_the_fix(reuse, tmp_path, capsys):
    """The port is checked before the index is opened: the index named here does not even exist."""
    with socket.socket() as taken:
        if reuse:  # what uvicorn sets on its own socket
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = run(["serve", str(tmp_path / "no-index-here"), "--port", str(port)], capsys)
    assert code == 1
    assert err.startswith(f"stair-search: error: cannot listen on 127.0.0.1:{port} (Address already in use)")
    assert "--port N" in err and len(err.splitlines()) == 1
