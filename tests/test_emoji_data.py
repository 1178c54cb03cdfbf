"""Emoji data loader on small local fixture tarballs: joining, caching and tarball safety (no npm, no network)."""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from stair_search.data.emoji_packages import (
    PACKAGES,
    EmojiRecord,
    data_dir,
    fetch_package,
    load_emoji,
)
from tests.emoji_fixture import make_fixture_tarballs

N = 5


@pytest.fixture
def tarballs(tmp_path) -> dict[str, Path]:
    return make_fixture_tarballs(tmp_path / "tarballs", n=N)


def _by_id(records: list[EmojiRecord]) -> dict[str, EmojiRecord]:
    return {r.id: r for r in records}


def _add_member(tarball: Path, name: str, data: bytes) -> Path:
    """Rewrite ``tarball`` (gzip) with one extra member named ``name``, which tarfile writes without checks."""
    with tarfile.open(tarball, "r:gz") as src:
        members = [(m, src.extractfile(m).read()) for m in src.getmembers()]
    with tarfile.open(tarball, "w:gz") as dst:
        for member, content in members:
            dst.addfile(member, io.BytesIO(content))
        info = tarfile.TarInfo(name)
        info.size = len(data)
        dst.addfile(info, io.BytesIO(data))
    return tarball


def test_load_joins_labels_and_tags(tmp_path, tarballs):
    records = load_emoji(cache=tmp_path / "cache", tarballs=tarballs)
    by_id = _by_id(records)

    # N plain faces + copyright + frowning face + waving hand + robot face; skin tone, ghost and alien dropped.
    assert len(records) == N + 4
    grinning = by_id["google/1f600"]
    assert (grinning.style, grinning.hexcode, grinning.name) == ("google", "1F600", "GRINNING FACE")
    assert grinning.label == "grinning face"
    assert grinning.tags == ["face", "grin", "grinning"]
    assert grinning.group == "Smileys & Emotion"
    assert grinning.path.name == "1f600.png"
    # CLDR label differs from the Unicode name: the emojibase one must be used.
    assert by_id["google/1f601"].label == "beaming face with smiling eyes"

    # emoji-datasource "00A9-FE0F" vs emojibase "00a9": matched across case and the FE0F selector.
    copyright_ = by_id["google/00a9-fe0f"]
    assert (copyright_.hexcode, copyright_.label, copyright_.tags) == ("00A9-FE0F", "copyright", ["c", "copyright"])
    # Exact "2639-FE0F" wins over "2639", which comes first in emojibase and is equal once FE0F is stripped.
    assert by_id["google/2639-fe0f"].label == "frowning face"
    assert by_id["google/2639-fe0f"].tags == ["face", "frown"]

    # Not in emojibase: the name lower-cased, no tags.
    robot = by_id["google/1f916"]
    assert (robot.label, robot.tags, robot.name) == ("robot face", [], "ROBOT FACE")

    assert "google/1f44b" in by_id and "google/1f44b-1f3fb" not in by_id  # skin tone skipped by default
    assert "google/1f47b" not in by_id  # has_img true but the PNG is missing
    assert "google/1f47d" not in by_id  # has_img_google false
    assert all(r.id == f"google/{r.hexcode.lower()}" for r in records)


def test_images_are_real_64px_pngs(tmp_path, tarballs):
    records = load_emoji(cache=tmp_path / "cache", tarballs=tarballs)
    for record in records:
        with Image.open(record.path) as image:
            assert image.format == "PNG"
            assert image.size == (64, 64)
            image.load()
    # Distinct emoji are distinct pictures.
    assert len({r.path.read_bytes() for r in records}) == len(records)


def test_order_is_sorted_and_deterministic(tmp_path, tarballs):
    first = load_emoji(cache=tmp_path / "a", tarballs=tarballs)
    again = load_emoji(cache=tmp_path / "a", tarballs=tarballs)  # from the cache
    rebuilt = make_fixture_tarballs(tmp_path / "other", n=N)
    fresh = load_emoji(cache=tmp_path / "b", tarballs=rebuilt)
    assert [r.id for r in first] == sorted(r.id for r in first)
    assert first == again
    assert [(r.id, r.label, r.tags) for r in first] == [(r.id, r.label, r.tags) for r in fresh]
    # The fixture itself is reproducible byte for byte.
    assert {k: p.read_bytes() for k, p in tarballs.items()} == {k: p.read_bytes() for k, p in rebuilt.items()}


def test_skin_tones_on_request(tmp_path, tarballs):
    records = load_emoji(cache=tmp_path / "cache", tarballs=tarballs, include_skin_tones=True)
    tone = _by_id(records)["google/1f44b-1f3fb"]
    assert tone.label == "waving hand: light skin tone"
    assert tone.tags == ["hand", "wave", "waving"]  # emojibase skin entries have no tags: the base emoji's
    assert tone.name == "WAVING HAND SIGN"
    assert len(records) == N + 5


def test_two_styles(tmp_path, tarballs):
    records = load_emoji(("google", "twitter"), cache=tmp_path / "cache", tarballs=tarballs)
    by_id = _by_id(records)
    assert {r.style for r in records} == {"google", "twitter"}
    assert "twitter/1f47d" in by_id and "google/1f47d" not in by_id  # alien: only twitter has the image
    assert by_id["twitter/1f47d"].label == "alien"
    assert by_id["twitter/1f600"].path.parent.parts[-2:] == ("twitter", "64")
    assert by_id["twitter/1f600"].path.read_bytes() != by_id["google/1f600"].path.read_bytes()
    with pytest.raises(ValueError, match="unknown emoji style"):
        load_emoji(("samsung",), cache=tmp_path / "cache", tarballs=tarballs)


def test_only_needed_members_are_unpacked(tmp_path, tarballs):
    _add_member(tarballs["google"], "package/img/google/sheets/64.png", b"sprite sheet")
    _add_member(tarballs["google"], "package/README.md", b"readme")
    package = fetch_package(PACKAGES["google"], cache=tmp_path, tarball=tarballs["google"])
    assert package == tmp_path / "npm" / "emoji-datasource-google-16.0.0" / "package"
    assert (package / "emoji.json").is_file()
    assert not (package / "README.md").exists()
    assert not (package / "img" / "google" / "sheets").exists()
    assert {p.parent.relative_to(package).as_posix() for p in package.rglob("*.png")} == {"img/google/64"}


def test_fetch_is_idempotent(tmp_path, tarballs):
    spec = PACKAGES["tags"]
    package = fetch_package(spec, cache=tmp_path, tarball=tarballs["tags"])
    marker = package.parent / ".unpacked"
    assert marker.is_file()
    before = marker.stat().st_mtime_ns
    sentinel = package / "sentinel.txt"  # a re-extract would wipe the folder and lose this
    sentinel.write_text("still here")

    assert fetch_package(spec, cache=tmp_path, tarball=tarballs["tags"]) == package
    assert fetch_package(spec, cache=tmp_path) == package  # cached: needs neither the tarball nor npm
    assert marker.stat().st_mtime_ns == before
    assert sentinel.read_text() == "still here"


def test_interrupted_unpack_is_redone(tmp_path, tarballs):
    spec = PACKAGES["google"]
    package = fetch_package(spec, cache=tmp_path, tarball=tarballs["google"])
    marker = package.parent / ".unpacked"
    # Simulate a crash mid-unpack: marker never written, a file truncated, a stray half-written file.
    marker.unlink()
    (package / "emoji.json").write_text("[")
    (package / "img" / "google" / "64" / "partial.png").write_bytes(b"\x89PN")

    assert fetch_package(spec, cache=tmp_path, tarball=tarballs["google"]) == package
    assert marker.is_file()
    assert not (package / "img" / "google" / "64" / "partial.png").exists()
    assert len(json.loads((package / "emoji.json").read_text())) == N + 6
    assert len(load_emoji(cache=tmp_path, tarballs=tarballs)) == N + 4


def test_unsafe_member_is_refused(tmp_path):
    cache = tmp_path / "deep" / "cache"
    outside = cache / "npm" / "evil.txt"  # where <cache>/npm/evil-1.0.0/ + "package/../../evil.txt" would land
    tarball = tmp_path / "evil-1.0.0.tgz"
    with tarfile.open(tarball, "w:gz") as tar:
        for name, data in [("package/package.json", b"{}"), ("package/../../evil.txt", b"pwned")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

    # An unknown package is unpacked whole, so the member is attempted and must be refused by the data filter.
    with pytest.raises(RuntimeError, match="unsafe member"):
        fetch_package("evil@1.0.0", cache=cache, tarball=tarball)
    assert not list(tmp_path.rglob("evil.txt"))
    assert not outside.exists()
    assert not (cache / "npm" / "evil-1.0.0").exists()  # nothing half-unpacked left behind


def test_unsafe_member_in_emoji_tarball_never_lands(tmp_path, tarballs):
    cache = tmp_path / "cache"
    _add_member(tarballs["google"], "package/../../evil.txt", b"pwned")
    _add_member(tarballs["google"], "package/img/google/64/../../../../evil.txt", b"pwned")
    _add_member(tarballs["google"], str(tmp_path / "evil-absolute.txt"), b"pwned")
    records = load_emoji(cache=cache, tarballs=tarballs)
    assert len(records) == N + 4
    assert not list(tmp_path.rglob("evil*.txt"))


def test_wrong_or_missing_tarball(tmp_path, tarballs):
    with pytest.raises(ValueError, match=re.escape("emojibase-data@17.0.0, not emoji-datasource-google@16.0.0")):
        fetch_package(PACKAGES["google"], cache=tmp_path, tarball=tarballs["tags"])
    assert not (tmp_path / "npm" / "emoji-datasource-google-16.0.0").exists()
    with pytest.raises(FileNotFoundError):
        fetch_package(PACKAGES["google"], cache=tmp_path, tarball=tmp_path / "nope.tgz")
    with pytest.raises(ValueError, match="exact-version"):
        fetch_package("emoji-datasource-google", cache=tmp_path)


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    monkeypatch.setenv("PATH", str(empty_bin))  # a real environment with no npm on it
    with pytest.raises(RuntimeError, match=r"emoji-datasource-google@16\.0\.0.*npm.*tarball") as info:
        fetch_package(PACKAGES["google"], cache=tmp_path / "cache")
    assert "tarball" in str(info.value)
    assert not (tmp_path / "cache" / "npm" / "emoji-datasource-google-16.0.0").exists()


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("STAIR_DATA", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("STAIR_DATA")
    assert data_dir() == Path.home() / ".cache" / "stair-search"
