"""The text route's imports (issue 40): an ``auto`` text search through the command line, in a fresh process,
runs BM25 and finds the caption's words through Anserini's Java classes without importing Pyserini's Python
packages (seconds of pandas and prebuilt-index tables) or torch (which ``pyserini.search`` imports)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stair_search.encode import Encoder
from stair_search.index import FeatureRecord, IndexWriter
from tests.conftest import draw_shape

ROOT = Path(__file__).resolve().parents[1]
MODEL = "stair-tiny"  # a shipped model: its queries run on ONNX Runtime (the bundle exported once per machine)
HEAVY = ("torch", "transformers", "pyserini.analysis", "pyserini.search", "pyserini.index", "pyserini.encode")
CAPTIONS = {"red-circle": "a red circle drawn on paper", "blue-square": "a blue square", "green-circle": ""}


@pytest.fixture(scope="module")
def captioned_index(tmp_path_factory) -> Path:
    """Three drawings, two with captions (so the index has a text route), encoded with the shipped model."""
    encoder = Encoder(MODEL, batch_size=4, queries="torch")
    images = [draw_shape(*name.split("-")) for name in CAPTIONS]
    records = [FeatureRecord(id=name, source=f"drawn://{name}", width=64, height=64, caption=caption)
               for name, caption in CAPTIONS.items()]
    folder = tmp_path_factory.mktemp("captioned") / "index"
    with IndexWriter(folder, encoder.record, shard_size=2) as writer:
        writer.add(records, encoder.encode_images(images))
        writer.commit()
    return folder


def test_an_auto_text_search_imports_neither_pyserini_nor_torch(captioned_index):
    code = ("import sys, json\nfrom stair_search.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit as stop:\n    assert not stop.code, stop.code\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code, "search", str(captioned_index), "red circle drawn", "--json",
                           "--explain", "-k", "3"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    *hits, imported = done.stdout.strip().splitlines()
    assert json.loads(imported) == [], done.stderr
    top = json.loads(hits[0])
    assert top["id"] == "red-circle"
    assert "text" in top["parts"], top  # auto added the text route: BM25 ran in that process
    assert top["text_matched"] == {"red": 1, "circl": 1, "drawn": 1}, top  # read from the caption's document vector
