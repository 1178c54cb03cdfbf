"""Small local emoji tarballs laid out like the real npm packages: the emoji loader's tests run on real PNG files
without npm or network."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path
from typing import Any

from stair_search.data.emoji_packages import PACKAGES, STYLES, _parse_spec

IMAGE_SIZE = 64
FIXTURE_MTIME = 499162500  # npm's own fixed tarball mtime: the fixtures are byte-for-byte reproducible


# (unified code in emoji-datasource, Unicode name, emojibase label, emojibase tags)
_FIXTURE_FACES = [
    ("1F600", "GRINNING FACE", "grinning face", ["face", "grin", "grinning"]),
    ("1F601", "GRINNING FACE WITH SMILING EYES", "beaming face with smiling eyes", ["eye", "face", "grin", "smile"]),
    ("1F602", "FACE WITH TEARS OF JOY", "face with tears of joy", ["face", "joy", "laugh", "tear"]),
    ("1F603", "SMILING FACE WITH OPEN MOUTH", "grinning face with big eyes", ["face", "mouth", "open", "smile"]),
    ("1F604", "SMILING FACE WITH OPEN MOUTH AND SMILING EYES", "grinning face with smiling eyes", ["eye", "smile"]),
]
_PALETTE = [(230, 60, 50), (40, 160, 70), (40, 90, 220), (245, 200, 30), (150, 60, 190), (20, 170, 180)]


def _fixture_png(seed: int) -> bytes:
    """A real 64x64 RGBA PNG on a transparent background, like the real emoji; varies with ``seed``."""
    from PIL import Image, ImageDraw

    image = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    colour = (*_PALETTE[seed % len(_PALETTE)], 255)
    box = (8 + seed % 5, 8, 56 - seed % 7, 56)
    [draw.ellipse, draw.rectangle, draw.rounded_rectangle][seed % 3](box, fill=colour)
    draw.line((16, 40 - seed % 9, 48, 40 - seed % 9), fill=(0, 0, 0, 255), width=2)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_tgz(path: Path, files: dict[str, bytes]) -> Path:
    """Write an npm-like tarball reproducibly (fixed mtimes, sorted members, no gzip timestamp)."""
    with (
        path.open("wb") as raw,
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for member_name in sorted(files):
            info = tarfile.TarInfo(member_name)
            info.size, info.mtime, info.mode = len(files[member_name]), FIXTURE_MTIME, 0o644
            tar.addfile(info, io.BytesIO(files[member_name]))
    return path


def _datasource_entry(code: str, name: str, category: str, **extra: Any) -> dict[str, Any]:
    entry = {
        "name": name,
        "unified": code,
        "image": f"{code.lower()}.png",
        "short_names": [name.lower().replace(" ", "_")],
        "category": category,
        "subcategory": "fixture",
        "has_img_google": True,
        "has_img_twitter": True,
    }
    entry.update(extra)
    return entry


def make_fixture_tarballs(dest: Path, n: int = 5) -> dict[str, Path]:
    """Write small local tarballs laid out like the real packages; return them keyed like :data:`PACKAGES`.

    Lets tests, and users without npm or network, run :func:`load_emoji` (``tarballs=`` the result) on real
    PNG files. Besides ``n`` plain emoji matched exactly in emojibase, the fixture holds one of each case the
    loader must handle:

    * ``00A9-FE0F`` (copyright) whose emojibase code is ``00a9``: matched only by ignoring case and FE0F;
    * ``2639-FE0F`` (frowning face) listed in emojibase both as ``2639`` (first) and ``2639-FE0F``: the exact
      code must win;
    * ``1F44B`` (waving hand) with a ``1F44B-1F3FB`` skin-tone variation (PNG present, skipped by default);
    * ``1F47B`` (ghost): ``has_img`` true but the PNG is absent -> skipped;
    * ``1F47D`` (alien): ``has_img_google`` false, PNG only in the twitter package -> twitter only;
    * ``1F916`` (robot face): not in emojibase -> label from the name, no tags.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    # Beyond the real faces, private-use codes: they cannot collide with the special cases below.
    extra = [
        (f"{0xE000 + i:X}", f"FIXTURE EMOJI {i}", f"emoji {i}", ["fixture"]) for i in range(len(_FIXTURE_FACES), n)
    ]
    faces = _FIXTURE_FACES[:n] + extra
    smileys = "Smileys & Emotion"
    datasource = [_datasource_entry(code, name, smileys) for code, name, _, _ in faces]
    datasource += [
        _datasource_entry("00A9-FE0F", "COPYRIGHT SIGN", "Symbols"),
        _datasource_entry("2639-FE0F", "WHITE FROWNING FACE", smileys),
        _datasource_entry(
            "1F44B",
            "WAVING HAND SIGN",
            "People & Body",
            skin_variations={
                "1F3FB": {
                    "unified": "1F44B-1F3FB",
                    "image": "1f44b-1f3fb.png",
                    "has_img_google": True,
                    "has_img_twitter": True,
                }
            },
        ),
        _datasource_entry("1F47B", "GHOST", smileys),
        _datasource_entry("1F47D", "EXTRATERRESTRIAL ALIEN", smileys, has_img_google=False),
        _datasource_entry("1F916", "ROBOT FACE", smileys),
    ]
    emojibase = [
        {"label": label, "hexcode": code, "tags": tags, "group": 0, "order": i + 1}
        for i, (code, _, label, tags) in enumerate(faces)
    ]
    emojibase += [
        {"label": "copyright", "hexcode": "00a9", "tags": ["c", "copyright"], "group": 8},
        {"label": "frowning face (text style)", "hexcode": "2639", "tags": ["text"], "group": 0},
        {"label": "frowning face", "hexcode": "2639-FE0F", "tags": ["face", "frown"], "group": 0},
        {
            "label": "waving hand",
            "hexcode": "1F44B",
            "tags": ["hand", "wave", "waving"],
            "group": 1,
            "skins": [{"label": "waving hand: light skin tone", "hexcode": "1F44B-1F3FB", "tone": 1}],
        },
        {"label": "ghost", "hexcode": "1F47B", "tags": ["creature", "face", "ghost"], "group": 0},
        {"label": "alien", "hexcode": "1F47D", "tags": ["creature", "extraterrestrial", "ufo"], "group": 0},
        {"label": "regional indicator A", "hexcode": "1F1E6"},  # in emojibase only, as in the real data
    ]

    out: dict[str, Path] = {}
    for style in STYLES:
        name, version = _parse_spec(PACKAGES[style])
        files = {
            "package/package.json": json.dumps({"name": name, "version": version}).encode(),
            "package/emoji.json": json.dumps(datasource, indent=1).encode(),
        }
        for seed, entry in enumerate(datasource):
            for item in [entry, *entry.get("skin_variations", {}).values()]:
                if item["unified"] == "1F47B" or not item[f"has_img_{style}"]:
                    continue  # the ghost's PNG is missing everywhere; the alien's where has_img is false
                files[f"package/img/{style}/64/{item['image']}"] = _fixture_png(seed + 7 * STYLES.index(style))
        out[style] = _write_tgz(dest / f"{name}-{version}.tgz", files)
    name, version = _parse_spec(PACKAGES["tags"])
    files = {
        "package/package.json": json.dumps({"name": name, "version": version}).encode(),
        "package/en/data.json": json.dumps(emojibase, indent=1).encode(),
    }
    out["tags"] = _write_tgz(dest / f"{name}-{version}.tgz", files)
    return out
