"""Emoji images with human-written names and keywords, from pinned npm packages.

Why emoji: they are real, varied, small (64x64) images that come with text written by people (Unicode / CLDR
names and keyword lists), so retrieval quality can be measured with no manual labelling, and the whole set
installs from a package registry with no other network access.

Sources (all pinned, so a result can be reproduced):

* ``emoji-datasource-google`` / ``emoji-datasource-twitter``: the PNGs (``package/img/<style>/64/<image>``)
  and ``package/emoji.json`` (Unicode name, category, which styles have an image, skin-tone variations);
* ``emojibase-data``: ``package/en/data.json`` with the CLDR label and keyword tags for each code;
* ``emoji-datasource-apple`` / ``emoji-datasource-facebook``: the same layout, loadable (:data:`ALL_STYLES`) for
  the training corpus (:mod:`stair_search.data.corpus`) but not in the evaluation default :data:`STYLES`: the
  evaluation set, and so its test split, stays the Google + Twitter one it always was.

Packages are fetched with ``npm pack`` (which only needs registry access) or taken from local ``.tgz`` files the
user gives; only the few members that are used are unpacked (the google tarball is 74 MB, mostly sprite sheets).
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stair_search.paths import data_dir

log = logging.getLogger(__name__)

STYLES = ("google", "twitter")  # the evaluation default
ALL_STYLES = ("google", "twitter", "apple", "facebook")  # every style load_emoji can read
PACKAGES = {
    "google": "emoji-datasource-google@16.0.0",
    "twitter": "emoji-datasource-twitter@16.0.0",
    "apple": "emoji-datasource-apple@16.0.0",
    "facebook": "emoji-datasource-facebook@16.0.0",
    "tags": "emojibase-data@17.0.0",
}

NPM_TIMEOUT_S = 600
_MARKER = ".unpacked"  # written last: its absence means the unpack never finished
_SPEC = re.compile(r"^(?P<name>(?:@[a-z0-9][\w.-]*/)?[a-z0-9][\w.-]*)@(?P<version>[0-9][\w.+-]*)$", re.IGNORECASE)


def _parse_spec(spec: str) -> tuple[str, str]:
    """Split ``name@version``; an exact version is required so the cache folder names what it holds."""
    match = _SPEC.match(spec.strip())
    if not match:
        raise ValueError(f"expected an npm spec 'name@exact-version', got {spec!r}")
    return match["name"], match["version"]


def _member_filter(name: str) -> Callable[[str], bool]:
    """Which tarball members a package needs, by member name.

    Unpacking only these turns the 74 MB google download into about 20 MB on disk: the sprite sheets go unread.
    Packages this module does not know are unpacked whole.
    """
    keep = {"package/package.json"}
    if name.startswith("emoji-datasource-"):
        style = name.removeprefix("emoji-datasource-")
        keep.add("package/emoji.json")
        prefix = f"package/img/{style}/64/"
        # A plain file right inside the 64 px folder, nothing deeper (and so no "..").
        return lambda m: m in keep or (m.startswith(prefix) and "/" not in m[len(prefix) :] and m != prefix)
    if name == "emojibase-data":
        keep.add("package/en/data.json")
        return lambda m: m in keep
    if name.startswith("@iconify-json/"):
        keep |= {"package/icons.json", "package/info.json", "package/chars.json", "package/LICENSE"}
        return lambda m: m in keep
    folders = _ICON_SET_MEMBERS.get(name)
    if folders is not None:
        files, svg_dir = folders
        keep |= {f"package/{f}" for f in files}
        return lambda m: m in keep or _is_flat_member(m, f"package/{svg_dir}/", ".svg")
    return lambda m: True


# Icon sets of the corpus: (metadata files, folder of the SVGs used); the other formats in them go unread.
_ICON_SET_MEMBERS: dict[str, tuple[tuple[str, ...], str]] = {
    "@mdi/svg": (("meta.json", "LICENSE"), "svg"),
    "@tabler/icons": (("icons.json", "LICENSE"), "icons/outline"),
    "lucide-static": (("tags.json", "LICENSE"), "icons"),
    "@phosphor-icons/core": (("dist/index.mjs", "LICENSE"), "assets/regular"),
}


def _is_flat_member(member: str, prefix: str, suffix: str) -> bool:
    """A ``suffix`` file right inside ``prefix``, nothing deeper (and so no "..")."""
    rest = member[len(prefix) :]
    return member.startswith(prefix) and "/" not in rest and rest.endswith(suffix) and rest != suffix


def _check_tarball_identity(package_dir: Path, name: str, version: str, source: Path) -> None:
    """Refuse a user-given tarball of some other package, which would otherwise be cached under this name."""
    meta_path = package_dir / "package.json"
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    found = (meta.get("name"), meta.get("version"))
    if found != (name, version):
        raise ValueError(f"{source} holds {found[0]}@{found[1]}, not {name}@{version}")


def _unpack(tarball: Path, dest: Path, wanted: Callable[[str], bool]) -> int:
    """Stream-unpack the wanted members of ``tarball`` into ``dest``; return how many were written.

    Streaming (``r|*``) reads the gzip once, where random access would decompress it twice. Every member goes
    through tarfile's ``data`` filter, which refuses absolute paths, ``..`` escapes, links out of ``dest`` and
    device files, so a hostile tarball cannot write outside the cache.
    """
    count = 0
    with tarfile.open(tarball, mode="r|*") as tar:
        for member in tar:
            if not (member.isfile() or member.isdir()) or not wanted(member.name):
                continue
            try:
                tar.extract(member, dest, filter="data")
            except tarfile.FilterError as exc:
                raise RuntimeError(f"refusing to unpack {tarball}: unsafe member {member.name!r} ({exc})") from exc
            count += member.isfile()
    return count


def _npm_pack(spec: str, name: str, version: str, workdir: Path) -> Path:
    """Download ``spec``'s tarball into ``workdir`` with ``npm pack`` (registry access only, no install)."""
    hint = (
        f"You can instead download the tarball yourself (`npm pack {spec}` on a machine with network, or "
        f"https://registry.npmjs.org/{name}/-/{name.rsplit('/', 1)[-1]}-{version}.tgz) and pass its path as "
        f"`tarball=` (fetch_package) or in `tarballs=` (load_emoji)."
    )
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"cannot fetch {spec}: the `npm` command was not found (install Node.js). {hint}")
    cmd = [npm, "pack", spec, "--ignore-scripts", "--loglevel=error"]
    try:
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=NPM_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"cannot fetch {spec}: `npm pack` took over {NPM_TIMEOUT_S} s. {hint}") from exc
    except OSError as exc:
        raise RuntimeError(f"cannot fetch {spec}: could not run npm ({exc}). {hint}") from exc
    found = sorted(workdir.glob("*.tgz"))
    if proc.returncode != 0 or len(found) != 1:
        detail = (proc.stderr or proc.stdout or "").strip()[-2000:]
        raise RuntimeError(f"cannot fetch {spec}: `npm pack` failed (exit {proc.returncode}): {detail}\n{hint}")
    return found[0]


def fetch_package(spec: str, cache: Path | None = None, tarball: Path | None = None) -> Path:
    """Return the folder where package ``spec`` is unpacked: ``<cache>/npm/<name>-<version>/package``.

    If ``tarball`` (a local ``.tgz``) is given it is unpacked instead of calling npm, for machines without
    Node.js or network. Otherwise ``npm pack <spec>`` downloads it into a temporary folder inside the cache
    (same disk, removed afterwards). A finished unpack is returned at once; the marker file is written last,
    so an interrupted unpack (no marker) is wiped and redone rather than trusted half-written.
    """
    name, version = _parse_spec(spec)
    cache = Path(cache) if cache is not None else data_dir()
    root = cache / "npm" / f"{name.lstrip('@').replace('/', '__')}-{version}"
    package_dir = root / "package"
    marker = root / _MARKER
    if marker.is_file():
        return package_dir
    if tarball is not None and not Path(tarball).is_file():
        raise FileNotFoundError(f"tarball for {spec} not found: {tarball}")

    if root.exists():
        log.info("removing incomplete unpack of %s at %s", spec, root)
        shutil.rmtree(root)
    root.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".pack-", dir=root.parent) as tmp:
            source = Path(tarball) if tarball is not None else _npm_pack(spec, name, version, Path(tmp))
            count = _unpack(source, root, _member_filter(name))
            if not package_dir.is_dir():
                raise RuntimeError(f"{source} has no 'package/' folder; is it an npm tarball of {spec}?")
            _check_tarball_identity(package_dir, name, version, source)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)  # nothing half-written is left to be mistaken for data
        raise
    tmp_marker = marker.with_suffix(".tmp")
    origin = str(tarball) if tarball is not None else "npm pack"
    tmp_marker.write_text(json.dumps({"spec": spec, "source": origin, "files": count}) + "\n")
    tmp_marker.replace(marker)
    log.info("unpacked %d files of %s into %s", count, spec, package_dir)
    return package_dir


@dataclass
class EmojiRecord:
    """One emoji image in one style, with the text people wrote about it."""

    id: str  # f"{style}/{hexcode lower}", e.g. "google/1f600"
    style: str
    hexcode: str  # upper-case code points joined by "-", as in emojibase ("1F600")
    path: Path  # the 64x64 PNG
    label: str  # CLDR label from emojibase if matched, else emoji-datasource `name` lower-cased
    name: str  # emoji-datasource `name`
    tags: list[str] = field(default_factory=list)  # emojibase tags (empty if unmatched)
    group: str = ""  # emoji-datasource `category`, e.g. "Smileys & Emotion"


def strip_fe0f(code: str) -> str:
    """Code without variation selector 16, which the two packages do not always spell the same way."""
    return "-".join(part for part in code.upper().split("-") if part != "FE0F")


class Emojibase:
    """Lookup of emojibase entries (skin-tone entries included) by hexcode.

    Exact matches are tried before FE0F-stripped ones so that, where emojibase lists both a text-style and an
    emoji-style code, the one spelled exactly as in emoji-datasource wins; within each table the first entry in
    file order wins, which keeps the result deterministic.
    """

    def __init__(self, entries: list[dict[str, Any]]) -> None:
        self.exact: dict[str, dict[str, Any]] = {}
        self.stripped: dict[str, dict[str, Any]] = {}
        self.parent_tags: dict[str, list[str]] = {}
        for entry in entries:
            for item in [entry, *entry.get("skins", [])]:
                code = str(item.get("hexcode", "")).upper()
                if not code:
                    continue
                self.exact.setdefault(code, item)
                self.stripped.setdefault(strip_fe0f(code), item)
                # Skin-tone entries carry no tags of their own; they share the base emoji's keywords.
                self.parent_tags.setdefault(code, list(entry.get("tags", [])))

    def find(self, code: str) -> dict[str, Any] | None:
        code = code.upper()
        return self.exact.get(code) or self.stripped.get(strip_fe0f(code))

    def tags(self, item: dict[str, Any]) -> list[str]:
        return list(item.get("tags") or self.parent_tags.get(str(item["hexcode"]).upper(), []))


def _record(
    style: str, img_dir: Path, item: dict[str, Any], base: dict[str, Any], index: Emojibase
) -> EmojiRecord | None:
    """Record for one emoji-datasource entry (``item``; a skin variation of ``base``, or ``base`` itself)."""
    image = item.get("image")
    # `image` comes from a tarball that may be user-given: accept a bare file name only.
    if not item.get(f"has_img_{style}") or not image or Path(image).name != image:
        return None
    path = img_dir / image
    if not path.is_file():
        return None
    code = str(item["unified"]).upper()
    name = str(base.get("name") or base.get("short_name") or code)
    match = index.find(code)
    return EmojiRecord(
        id=f"{style}/{code.lower()}",
        style=style,
        hexcode=code,
        path=path,
        label=str(match["label"]) if match and match.get("label") else name.lower(),
        name=name,
        tags=index.tags(match) if match else [],
        group=str(base.get("category") or ""),
    )


def load_emoji(
    styles: Sequence[str] = ("google",),
    cache: Path | None = None,
    tarballs: dict[str, Path] | None = None,
    include_skin_tones: bool = False,
) -> list[EmojiRecord]:
    """Emoji images of the given styles joined with their CLDR labels and keyword tags, sorted by id.

    ``styles`` are some of :data:`ALL_STYLES`. ``tarballs`` maps keys of :data:`PACKAGES` (a style or ``"tags"``)
    to local ``.tgz`` files to use instead of npm. Entries without a PNG for a style (``has_img_<style>`` false
    or the file absent) are skipped, as are skin-tone variations unless ``include_skin_tones``: they are
    near-duplicates of the base image with the same keywords, which would flood search results and evaluation
    with ties.

    ``hexcode`` and ``id`` use emoji-datasource's ``unified`` code (upper-cased), not the matched emojibase
    code: it is what names the image file, and it is unique per image even where two entries map to the same
    emojibase code once FE0F is ignored.
    """
    styles = list(dict.fromkeys(styles))
    unknown = [s for s in styles if s not in ALL_STYLES]
    if unknown:
        raise ValueError(f"unknown emoji style(s) {unknown}; expected some of {ALL_STYLES}")
    tarballs = tarballs or {}
    tags_dir = fetch_package(PACKAGES["tags"], cache, tarballs.get("tags"))
    index = Emojibase(json.loads((tags_dir / "en" / "data.json").read_text(encoding="utf-8")))

    records: dict[str, EmojiRecord] = {}
    for style in styles:
        package_dir = fetch_package(PACKAGES[style], cache, tarballs.get(style))
        img_dir = package_dir / "img" / style / "64"
        entries = json.loads((package_dir / "emoji.json").read_text(encoding="utf-8"))
        found = skipped = 0
        for base in entries:
            items = [base]
            if include_skin_tones:
                variations = base.get("skin_variations") or {}
                items += [variations[key] for key in sorted(variations)]
            for item in items:
                record = _record(style, img_dir, item, base, index)
                if record is None:
                    skipped += 1
                elif records.setdefault(record.id, record) is record:
                    found += 1
        log.info("emoji %s: %d images, %d entries without an image", style, found, skipped)
    return [records[key] for key in sorted(records)]


