"""The training corpus on small local tarballs (no network): rasterised icons, captions and the split rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stair_search.data.corpus import SOURCES, build_corpus, load_corpus_pairs, load_corpus_rows
from stair_search.data.emoji_packages import _parse_spec
from stair_search.eval.datasets.emoji import build_emoji_dataset, split_of
from tests.emoji_fixture import _write_tgz, make_fixture_tarballs

RED_LEFT_HALF = '<path fill="#ff0000" d="M0 0h8v16H0z"/>'
ICONIFY = {
    "prefix": "noto",
    "width": 16,
    "height": 16,
    "icons": {
        "grinning-face": {"body": RED_LEFT_HALF},  # matched by `chars`
        "waving-hand": {"body": '<circle cx="8" cy="8" r="6" fill="#00aa00"/>'},  # matched by name (a test emoji)
        "waving-hand-light": {"body": RED_LEFT_HALF},  # skin tone, by `chars`
        "mystery-thing": {"body": RED_LEFT_HALF},  # no emoji of that name
        "broken": {"body": '<path d="M0 0h8v16H0z"'},  # an emoji by `chars`, but its SVG is not XML
    },
    "aliases": {"hand-waving": {"parent": "waving-hand"}},
}
ICONIFY_CHARS = {"1f600": "grinning-face", "1f44b-1f3fb": "waving-hand-light", "1f601": "broken"}
ICONIFY_INFO = {"name": "Noto fixture", "license": {"title": "Apache 2.0", "spdx": "Apache-2.0", "url": "u"}}
MDI_META = [
    {"name": "arrow-left", "aliases": ["arrow-back"], "tags": ["Arrow"], "deprecated": False},
    {"name": "waving-hand", "aliases": [], "tags": [], "deprecated": False},  # test emoji "waving hand"
    {"name": "bot", "aliases": ["robot-face"], "tags": [], "deprecated": False},  # val emoji "ROBOT FACE"
    {"name": "old-thing", "aliases": [], "tags": [], "deprecated": True},
]
TOP_HALF = '<svg xmlns="http://www.w3.org/2000/svg" id="mdi-x" viewBox="0 0 24 24"><path d="M0 0H24V12H0Z" /></svg>'
STROKE_ROW = ('<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24" viewBox="0 0 24 24" fill="none" '
              'stroke="currentColor" stroke-width="4"><path d="M0 12h24" /></svg>')


def _package(dest: Path, source: str, files: dict[str, bytes], license_: str) -> Path:
    name, version = _parse_spec(SOURCES[source])
    meta = json.dumps({"name": name, "version": version, "license": license_}).encode()
    return _write_tgz(dest / f"{source}.tgz", {"package/package.json": meta, **files})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    root = tmp_path_factory.mktemp("corpus")
    emoji = make_fixture_tarballs(root / "tgz")
    tarballs = {"tags": emoji["tags"], "emoji-google": emoji["google"], "emoji-twitter": emoji["twitter"]}
    tarballs["noto"] = _package(root / "tgz", "noto", {
        "package/icons.json": json.dumps(ICONIFY).encode(),
        "package/chars.json": json.dumps(ICONIFY_CHARS).encode(),
        "package/info.json": json.dumps(ICONIFY_INFO).encode(),
        "package/README.md": b"not needed",
    }, "Apache-2.0")
    mdi_files = {f"package/svg/{e['name']}.svg": TOP_HALF.encode() for e in MDI_META}
    tarballs["mdi"] = _package(root / "tgz", "mdi", {"package/meta.json": json.dumps(MDI_META).encode(),
                                                     "package/font/skipped.woff": b"x", **mdi_files}, "Apache-2.0")
    tarballs["lucide"] = _package(root / "tgz", "lucide", {
        "package/tags.json": json.dumps({"minus": ["subtract", "line"]}).encode(),
        "package/icons/minus.svg": STROKE_ROW.encode(),
        "package/icons/ghost.svg": STROKE_ROW.encode(),  # "ghost" is a train emoji: kept
    }, "ISC")
    sources = ("emoji-google", "emoji-twitter", "noto", "mdi", "lucide")
    build_corpus(root / "out", cache=root / "cache", tarballs=tarballs, sources=sources)
    return root, tarballs


def _rows(root: Path) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["source"], Path(r["image_path"]).stem): r for r in load_corpus_rows(root / "out")}


def _pixels(row: dict[str, str]) -> np.ndarray:
    with Image.open(row["image_path"]) as image:
        assert image.mode == "RGB" and image.size == (64, 64)
        return np.asarray(image, dtype=np.int32)


def test_iconify_icons_are_rasterised_where_drawn(built):
    rows = _rows(built[0])
    grin = rows[("noto", "grinning-face")]
    assert (grin["concept"], grin["caption"]) == ("1F600", "grinning face, face, grin, grinning")
    pixels = _pixels(grin)
    assert (pixels[:, :28] == [255, 0, 0]).all(axis=-1).mean() > 0.95  # left half red
    assert (pixels[:, 36:] == 255).all()  # right half the white background


def test_iconify_mapping_and_skips(built):
    rows = _rows(built[0])
    wave = rows[("noto", "waving-hand")]
    assert wave["concept"] == "1F44B" and wave["split"] == split_of("1F44B") == "test"
    assert wave["caption"].startswith("waving hand")
    assert not {("noto", "waving-hand-light"), ("noto", "mystery-thing"), ("noto", "broken")} & rows.keys()
    summary = json.loads((built[0] / "out" / "sources.json").read_text())["sources"]["noto"]
    assert summary["skipped"] == {"skin-tone variant": 1, "no emoji matched by code or name": 1,
                                  "invalid SVG XML": 1}
    assert summary["license"]["icons"]["spdx"] == "Apache-2.0" and summary["items"] == 2


def test_icon_sets_captions_pixels_and_held_out_names(built):
    root, _ = built
    rows = _rows(root)
    arrow = rows[("mdi", "arrow-left")]
    assert (arrow["caption"], arrow["concept"]) == ("arrow left, arrow back, Arrow", "mdi:arrow-left")
    assert arrow["split"] == split_of("mdi:arrow-left")
    pixels = _pixels(arrow)
    assert (pixels[:30] == 0).all() and (pixels[34:] == 255).all()  # black top half on white
    assert not {("mdi", "waving-hand"), ("mdi", "bot"), ("mdi", "old-thing")} & rows.keys()
    skipped = json.loads((root / "out" / "sources.json").read_text())["sources"]["mdi"]["skipped"]
    assert skipped == {"name is the label of a val/test emoji": 2, "deprecated": 1}
    minus = _pixels(rows[("lucide", "minus")])  # currentColor stroke drawn black across the middle
    assert (minus[30:34] < 60).all() and (minus[:20] == 255).all()
    assert rows[("lucide", "minus")]["caption"] == "minus, subtract, line"
    assert ("lucide", "ghost") in rows
    unpacked = root / "cache" / "npm"  # only the members used: no fonts, no README
    assert (unpacked / "mdi__svg-7.4.47" / "package" / "svg" / "bot.svg").is_file()
    assert not (unpacked / "mdi__svg-7.4.47" / "package" / "font").exists()
    assert not (unpacked / "iconify-json__noto-1.2.9" / "package" / "README.md").exists()


def test_emoji_rows_follow_the_evaluation_split(built, tmp_path):
    root, tarballs = built
    dataset = build_emoji_dataset(tmp_path / "eval", cache=tmp_path / "cache", tarballs={
        "google": tarballs["emoji-google"], "twitter": tarballs["emoji-twitter"], "tags": tarballs["tags"]})
    rows = load_corpus_rows(root / "out")
    evaluation = {(r["style"], r["hexcode"]): r for r in dataset.records()}
    emoji_rows = [r for r in rows if r["source"].startswith("emoji-")]
    assert len(emoji_rows) == len(evaluation)
    for row in emoji_rows:
        match = evaluation[(row["source"].removeprefix("emoji-"), row["concept"])]
        assert (row["split"], row["caption"]) == (match["split"], match["caption"])
    held_out = {r["concept"] for r in dataset.records() if r["split"] != "train"}
    assert held_out and not held_out & {r["concept"] for r in rows if r["split"] == "train"}


def test_pairs_and_errors(built, tmp_path):
    root, _ = built
    pairs = load_corpus_pairs(root / "out")
    assert pairs and all(Path(path).is_file() for path, _ in pairs)
    assert all(r["split"] == "train" for r in load_corpus_rows(root / "out", "train"))
    with pytest.raises(ValueError, match="unknown split"):
        load_corpus_pairs(root / "out", "dev")
    with pytest.raises(FileNotFoundError, match="build the corpus first"):
        load_corpus_pairs(tmp_path)
    with pytest.raises(ValueError, match="unknown corpus source"):
        build_corpus(tmp_path / "x", sources=("flickr",))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a corpus"):
        build_corpus(tmp_path / "mine", tarballs={})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-built folder left behind
