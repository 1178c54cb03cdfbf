"""An image-text training corpus from npm packages, split by concept so that evaluation concepts stay unseen.

Why: the emoji evaluation set (:mod:`stair_search.eval.datasets.emoji`, Google + Twitter) is too small to train a
vision-language model on, but npm holds many more drawings with human-written text: other emoji styles, emoji
icon sets, and UI icon sets whose names and tags were written by their designers. All of it installs from the
package registry, pinned, so a corpus can be rebuilt exactly.

Sources (see :data:`SOURCES` for the pinned versions):

* ``emoji-<style>``: the 64 px PNGs of emoji-datasource (google, twitter, apple, facebook) with emojibase labels
  and tags, exactly as the evaluation set reads them;
* ``noto``, ``fluent-emoji-flat``, ``emojione``, ``fxemoji``, ``streamline-emojis``: iconify JSON emoji sets,
  each icon mapped to an emoji code (through the set's ``chars`` table, else its name matched to an emojibase
  label or an emoji-datasource name), captioned from emojibase; skin tones and unmatched icons are skipped;
* ``mdi``, ``tabler``, ``lucide``, ``phosphor``: UI icon sets, captioned with the icon name as words then its
  aliases and tags, drawn black on white.

Splits, and why evaluation concepts stay unseen:

* an emoji's concept is its emoji-datasource code (``1F600``) whatever the style or set that drew it, and its split
  is :func:`~stair_search.data.splits.split_of` of that code: the rule of the evaluation set, so a test
  emoji is test in every style and icon set;
* a UI icon's concept is ``"<source>:<name>"``; an icon whose name or alias equals (ignoring case and
  punctuation) the label or name of a val / test emoji is dropped, since "cat" drawn by Lucide would teach the
  test concept "cat".

Every image is rewritten as a 64x64 RGB PNG (transparency on white, as the indexer sees it). Files under
``out_dir``: ``corpus.parquet`` (``image_path``, ``caption``, ``source``, ``concept``, ``split``),
``images/<source>/<name>.png`` and ``sources.json`` (spec, counts, skips and licence of each source).
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from stair_search.data.emoji_packages import ALL_STYLES, PACKAGES, Emojibase, fetch_package, load_emoji, strip_fe0f
from stair_search.data.folders import building as building_folder
from stair_search.data.folders import check_replaceable
from stair_search.data.splits import SPLITS, caption_for, split_of

log = logging.getLogger(__name__)

IMAGE_SIZE = 64
EMOJI_SOURCES = tuple(f"emoji-{style}" for style in ALL_STYLES)
ICONIFY_SOURCES = ("noto", "fluent-emoji-flat", "emojione", "fxemoji", "streamline-emojis")
ICON_SET_SOURCES = ("mdi", "tabler", "lucide", "phosphor")
SOURCES: dict[str, str] = {
    **{f"emoji-{style}": PACKAGES[style] for style in ALL_STYLES},
    "noto": "@iconify-json/noto@1.2.9",
    "fluent-emoji-flat": "@iconify-json/fluent-emoji-flat@1.2.6",
    "emojione": "@iconify-json/emojione@1.2.3",
    "fxemoji": "@iconify-json/fxemoji@1.2.2",
    "streamline-emojis": "@iconify-json/streamline-emojis@1.2.4",
    "mdi": "@mdi/svg@7.4.47",
    "tabler": "@tabler/icons@3.52.0",
    "lucide": "lucide-static@1.62.0",
    "phosphor": "@phosphor-icons/core@2.1.1",
}
# What the shipped model trains on: every source whose drawings may be used to train a model that is then
# redistributed. Apple's emoji are "not licensed for commercial usage" and Facebook's have "no clear licensing"
# (emoji-datasource's README), so they stay buildable but out of the default training set.
TRAINING_SOURCES = tuple(s for s in SOURCES if s not in ("emoji-apple", "emoji-facebook"))
COLUMNS = ("image_path", "caption", "source", "concept", "split")
_CORPUS, _SOURCES_JSON = "corpus.parquet", "sources.json"
_SKIN_TONES = {"1F3FB", "1F3FC", "1F3FD", "1F3FE", "1F3FF"}
_SKIN_NAME = re.compile(r"(-skin-tone|-(light|medium-light|medium|medium-dark|dark)|-tone[1-5])$")
# Spellings of emoji names in the icon sets: "flag-for-japan" (emojibase "flag: Japan"), "cactus-2" (a second
# drawing of "cactus").
_NAME_VARIANTS = ((re.compile(r"^flag-for-"), "flag-"), (re.compile(r"-[0-9]+$"), ""))
# What package/README.md of emoji-datasource 16.0.0 says of its images (the README itself is not unpacked):
# the package's own `license` (MIT) covers the data, not these drawings.
_IMAGE_LICENCES = {
    "google": "Android/Google/Noto images, are available under the Apache License 2.0.",
    "twitter": "Twitter images are available under the Creative Commons Attribution 4.0 license.",
    "apple": "Apple images, Copyright © Apple Inc., are not licensed for commercial usage.",
    "facebook": "Facebook images, © Facebook, Inc., have no clear licensing.",
}


@dataclass
class _Item:
    """One image to write: either an existing PNG or SVG text to rasterise."""

    source: str
    name: str  # file stem under images/<source>/
    concept: str
    caption: str
    png: Path | None = None
    svg: str | None = None


@dataclass
class _SourceResult:
    items: list[_Item] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)
    licence: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------------
# Text normalisation and the emoji index


def _key(text: str) -> str:
    """Lower-case letters and digits only (accents dropped): ``"Grinning-Face"`` and ``"grinningface"`` agree."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "", plain.lower())


def _words(name: str) -> str:
    """An icon name as words: ``"arrow-left"`` -> ``"arrow left"``."""
    return " ".join(re.split(r"[-_\s]+", name.strip()))


def _is_skin_tone(code: str) -> bool:
    return any(part in _SKIN_TONES for part in code.upper().split("-"))


class _EmojiIndex:
    """Emoji codes, labels and splits: what maps an emoji icon to its concept and keeps eval concepts out."""

    def __init__(self, emojibase: list[dict[str, Any]], datasource: list[dict[str, Any]], seed: int) -> None:
        self.base = Emojibase(emojibase)
        self.seed = seed
        # The evaluation set names a concept by emoji-datasource's `unified` code: use it wherever it exists.
        self.unified = {strip_fe0f(str(e["unified"])): str(e["unified"]).upper() for e in datasource}
        labels: dict[str, set[str]] = {}
        names: dict[str, set[str]] = {}
        for entry in emojibase:
            if entry.get("label") and entry.get("hexcode"):
                labels.setdefault(_key(str(entry["label"])), set()).add(self.concept(str(entry["hexcode"])))
        for entry in datasource:
            concept = self.concept(str(entry["unified"]))
            for text in [entry.get("name") or "", *(entry.get("short_names") or [])]:
                if text:
                    names.setdefault(_key(str(text)), set()).add(concept)
        self._tiers = [labels, names]  # an emojibase label wins over an emoji-datasource name
        self.held_out = {key for tier in self._tiers for key, concepts in tier.items()
                         if any(self.split(c) != "train" for c in concepts)}

    def concept(self, code: str) -> str:
        stripped = strip_fe0f(code)
        if stripped in self.unified:
            return self.unified[stripped]
        match = self.base.find(code)
        return str(match["hexcode"]).upper() if match else code.upper()

    def split(self, concept: str) -> str:
        return split_of(concept, self.seed)

    def by_name(self, *names: str) -> str | None:
        """The one concept whose label or name matches one of ``names``; ``None`` if none or ambiguous."""
        for tier in self._tiers:
            for name in names:
                found = tier.get(_key(name), set())
                if len(found) == 1:
                    return next(iter(found))
        return None

    def caption(self, concept: str) -> str | None:
        match = self.base.find(concept)
        if not match or not match.get("label"):
            return None
        return caption_for(str(match["label"]), self.base.tags(match))


def _load_index(cache: Path | None, tarballs: Mapping[str, Path], seed: int) -> _EmojiIndex:
    tags_dir = fetch_package(PACKAGES["tags"], cache, tarballs.get("tags"))
    google_dir = fetch_package(PACKAGES["google"], cache, tarballs.get("emoji-google"))
    emojibase = json.loads((tags_dir / "en" / "data.json").read_text(encoding="utf-8"))
    datasource = json.loads((google_dir / "emoji.json").read_text(encoding="utf-8"))
    return _EmojiIndex(emojibase, datasource, seed)


def _package_licence(package_dir: Path) -> Any:
    meta = json.loads((package_dir / "package.json").read_text(encoding="utf-8"))
    return meta.get("license") or meta.get("licenses")


# --------------------------------------------------------------------------------------------------------------
# Sources


def _emoji_source(source: str, index: _EmojiIndex, cache: Path | None, tarballs: Mapping[str, Path]) -> _SourceResult:
    """One emoji-datasource style, read with :func:`load_emoji` like the evaluation set."""
    style = source.removeprefix("emoji-")
    keyed = {k: tarballs[s] for k, s in (("tags", "tags"), (style, source)) if s in tarballs}
    records = load_emoji((style,), cache=cache, tarballs=keyed)
    result = _SourceResult()
    for record in records:
        caption = caption_for(record.label, record.tags)
        result.items.append(_Item(source, record.hexcode.lower(), record.hexcode, caption, png=record.path))
    package_dir = fetch_package(SOURCES[source], cache, tarballs.get(source))
    result.licence = {"package": _package_licence(package_dir), "images": _IMAGE_LICENCES[style],
                      "note": "image licence as stated in the package README; the package licence covers the data"}
    return result


def _iconify_svg(icon: Mapping[str, Any], defaults: Mapping[str, Any]) -> str:
    left, top = icon.get("left", defaults.get("left", 0)), icon.get("top", defaults.get("top", 0))
    width, height = icon.get("width", defaults.get("width", 16)), icon.get("height", defaults.get("height", 16))
    body = str(icon["body"]).replace("currentColor", "#000000")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'width="{IMAGE_SIZE}" height="{IMAGE_SIZE}" viewBox="{left} {top} {width} {height}">{body}</svg>')


def _iconify_concept(name: str, codes: list[str], aliases: list[str], index: _EmojiIndex) -> tuple[str | None, str]:
    """(concept, why not) of one iconify emoji icon."""
    plain = [c for c in sorted(codes) if not _is_skin_tone(c)]
    if codes and not plain:
        return None, "skin-tone variant"
    if plain:
        return index.concept(plain[0]), ""
    if _SKIN_NAME.search(name):
        return None, "skin-tone variant"
    names = [name, *aliases]
    variants = [pattern.sub(repl, n) for n in names for pattern, repl in _NAME_VARIANTS if pattern.search(n)]
    concept = index.by_name(*names, *[v for v in variants if v])
    if concept is None:
        return None, "no emoji matched by code or name"
    return (None, "skin-tone variant") if _is_skin_tone(concept) else (concept, "")


def _iconify_source(source: str, index: _EmojiIndex, cache: Path | None,
                    tarballs: Mapping[str, Path]) -> _SourceResult:
    package_dir = fetch_package(SOURCES[source], cache, tarballs.get(source))
    data = json.loads((package_dir / "icons.json").read_text(encoding="utf-8"))
    chars_path = package_dir / "chars.json"
    chars = json.loads(chars_path.read_text(encoding="utf-8")) if chars_path.is_file() else {}
    chars = {**chars, **data.get("chars", {})}
    codes: dict[str, list[str]] = {}
    for code, name in chars.items():
        codes.setdefault(str(name), []).append(str(code))
    aliases: dict[str, list[str]] = {}
    result = _SourceResult()
    for alias, target in (data.get("aliases") or {}).items():
        if set(target) == {"parent"}:
            aliases.setdefault(str(target["parent"]), []).append(str(alias))
        else:
            result.skipped["alias with a transform (flip / rotate)"] += 1
    for name, icon in sorted(data.get("icons", {}).items()):
        concept, why = _iconify_concept(name, codes.get(name, []), aliases.get(name, []), index)
        caption = index.caption(concept) if concept else None
        if concept is None or caption is None:
            result.skipped[why or "emoji has no emojibase label"] += 1
            continue
        result.items.append(_Item(source, name, concept, caption, svg=_iconify_svg(icon, data)))
    info_path = package_dir / "info.json"
    info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else data.get("info", {})
    result.licence = {"package": _package_licence(package_dir), "icons": info.get("license"),
                      "author": info.get("author")}
    return result


@dataclass
class _Icon:
    """One UI icon as its set describes it."""

    name: str
    svg_path: Path
    aliases: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)


def _mdi_icons(package_dir: Path, skipped: Counter[str]) -> Iterator[_Icon]:
    for entry in json.loads((package_dir / "meta.json").read_text(encoding="utf-8")):
        if entry.get("deprecated"):
            skipped["deprecated"] += 1
            continue
        name = str(entry["name"])
        yield _Icon(name, package_dir / "svg" / f"{name}.svg", list(entry.get("aliases") or []),
                    list(entry.get("tags") or []))


def _tabler_icons(package_dir: Path, skipped: Counter[str]) -> Iterator[_Icon]:
    for name, entry in json.loads((package_dir / "icons.json").read_text(encoding="utf-8")).items():
        if "outline" not in (entry.get("styles") or {"outline": None}):
            skipped["no outline style"] += 1
            continue
        tags = [str(tag) for tag in entry.get("tags") or []] + ([str(entry["category"])] if entry.get("category")
                                                                 else [])
        yield _Icon(str(name), package_dir / "icons" / "outline" / f"{name}.svg", tags=tags)


def _lucide_icons(package_dir: Path, skipped: Counter[str]) -> Iterator[_Icon]:
    tags = json.loads((package_dir / "tags.json").read_text(encoding="utf-8"))
    for path in sorted((package_dir / "icons").glob("*.svg")):
        yield _Icon(path.stem, path, tags=[str(tag) for tag in tags.get(path.stem, [])])


_PHOSPHOR_ENTRY = re.compile(r'\n\s*\{\s*name:\s*"(?P<name>[^"]+)"(?P<rest>.*?)\n\s*\}', re.DOTALL)
_PHOSPHOR_TAGS = re.compile(r"tags:\s*\[(?P<tags>[^\]]*)\]")
_PHOSPHOR_ALIAS = re.compile(r'alias:\s*\{\s*name:\s*"(?P<alias>[^"]+)"')


def _phosphor_icons(package_dir: Path, skipped: Counter[str]) -> Iterator[_Icon]:
    """Phosphor's catalogue is only shipped as JavaScript (``dist/index.mjs``): read its plain literal entries."""
    source = (package_dir / "dist" / "index.mjs").read_text(encoding="utf-8")
    for match in _PHOSPHOR_ENTRY.finditer(source):
        rest = match["rest"]
        tags_match = _PHOSPHOR_TAGS.search(rest)
        tags = re.findall(r'"([^"]*)"', tags_match["tags"]) if tags_match else []
        aliases = [m["alias"] for m in _PHOSPHOR_ALIAS.finditer(rest)]
        name = match["name"]
        # "*new*" / "*updated*" are release notes, not descriptions.
        yield _Icon(name, package_dir / "assets" / "regular" / f"{name}.svg", aliases,
                    [t for t in tags if t and not t.startswith("*")])


_ICON_READERS: dict[str, Callable[[Path, Counter[str]], Iterator[_Icon]]] = {
    "mdi": _mdi_icons, "tabler": _tabler_icons, "lucide": _lucide_icons, "phosphor": _phosphor_icons,
}
_SVG_ROOT = re.compile(r"<svg\b[^>]*>", re.DOTALL)
_SIZE_ATTR = re.compile(r'\s(?:width|height)\s*=\s*("[^"]*"|\'[^\']*\')')


def _sized_svg(text: str) -> str | None:
    """The SVG drawn black (``currentColor``) at 64x64: the root's width / height replaced, viewBox kept."""
    root = _SVG_ROOT.search(text)
    if root is None or "viewBox" not in root.group(0):
        return None
    tag = _SIZE_ATTR.sub("", root.group(0))
    tag = f'{tag[:-1].rstrip("/").rstrip()} width="{IMAGE_SIZE}" height="{IMAGE_SIZE}">'
    return (text[: root.start()] + tag + text[root.end() :]).replace("currentColor", "#000000")


def _icon_set_source(source: str, index: _EmojiIndex, cache: Path | None,
                     tarballs: Mapping[str, Path]) -> _SourceResult:
    package_dir = fetch_package(SOURCES[source], cache, tarballs.get(source))
    result = _SourceResult(licence={"package": _package_licence(package_dir)})
    for icon in _ICON_READERS[source](package_dir, result.skipped):
        if any(_key(text) in index.held_out for text in (icon.name, *icon.aliases)):
            result.skipped["name is the label of a val/test emoji"] += 1
            continue
        if not icon.svg_path.is_file():
            result.skipped["SVG file missing"] += 1
            continue
        svg = _sized_svg(icon.svg_path.read_text(encoding="utf-8"))
        if svg is None:
            result.skipped["SVG without a viewBox"] += 1
            continue
        caption = caption_for(_words(icon.name), [*map(_words, icon.aliases), *icon.tags])
        result.items.append(_Item(source, icon.name, f"{source}:{icon.name}", caption, svg=svg))
    return result


# --------------------------------------------------------------------------------------------------------------
# Rasterising and writing


def _render_svg(svg: str) -> tuple[Image.Image | None, str]:
    """(64x64 RGB image on white, "") or (None, why): resvg's failures are caught, not fatal."""
    import resvg

    from stair_search.images import to_rgb

    try:
        ET.fromstring(svg)  # malformed XML would make resvg panic
    except ET.ParseError:
        return None, "invalid SVG XML"
    try:
        tree = resvg.usvg.Tree.from_str(svg, _resvg_options())
        png = resvg.render(tree, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # resvg reports errors as Rust panics, which derive from BaseException
        log.debug("resvg could not render an SVG: %s", exc)
        return None, "resvg could not render it"
    with Image.open(io.BytesIO(png)) as image:
        rgb = to_rgb(image)
    if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
        rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    if all(low == 255 for low, _ in rgb.getextrema()):
        return None, "rendered blank"
    return rgb, ""


_OPTIONS: list[Any] = []


def _resvg_options() -> Any:
    if not _OPTIONS:
        import resvg

        _OPTIONS.append(resvg.usvg.Options.default())
    return _OPTIONS[0]


def _load_png(path: Path) -> Image.Image:
    from stair_search.images import to_rgb

    with Image.open(path) as image:
        rgb = to_rgb(image)
    return rgb if rgb.size == (IMAGE_SIZE, IMAGE_SIZE) else rgb.resize((IMAGE_SIZE, IMAGE_SIZE),
                                                                      Image.Resampling.LANCZOS)


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).lstrip(".") or "_"


def _write_items(result: _SourceResult, building: Path, out_dir: Path, seed: int) -> list[dict[str, str]]:
    """Write one source's images; return its rows (image paths already pointing into ``out_dir``)."""
    rows = []
    seen: set[str] = set()
    for item in result.items:
        stem = _safe_stem(item.name)
        if stem in seen:
            result.skipped["duplicate file name"] += 1
            continue
        if item.png is not None:
            image, why = _load_png(item.png), ""
        else:
            image, why = _render_svg(item.svg or "")
        if image is None:
            result.skipped[why] += 1
            continue
        seen.add(stem)
        relative = Path("images") / item.source / f"{stem}.png"
        (building / relative).parent.mkdir(parents=True, exist_ok=True)
        image.save(building / relative, format="PNG")
        rows.append({"image_path": str(out_dir / relative), "caption": item.caption, "source": item.source,
                     "concept": item.concept, "split": split_of(item.concept, seed)})
    return rows


def _write_parquet(path: Path, rows: list[dict[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.string()) for name in COLUMNS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _read_source(source: str, index: _EmojiIndex, cache: Path | None, tarballs: Mapping[str, Path]) -> _SourceResult:
    if source in EMOJI_SOURCES:
        return _emoji_source(source, index, cache, tarballs)
    if source in ICONIFY_SOURCES:
        return _iconify_source(source, index, cache, tarballs)
    return _icon_set_source(source, index, cache, tarballs)


def _source_summary(source: str, result: _SourceResult, rows: list[dict[str, str]]) -> dict[str, Any]:
    return {"spec": SOURCES[source], "items": len(rows),
            "splits": {split: sum(r["split"] == split for r in rows) for split in SPLITS},
            "skipped": dict(sorted(result.skipped.items())), "license": result.licence}


def build_corpus(out_dir: str | Path, seed: int = 0, cache: str | Path | None = None,
                 tarballs: Mapping[str, str | Path] | None = None, sources: Sequence[str] | None = None) -> Path:
    """Build (or rebuild) the corpus in ``out_dir``; return the path of ``corpus.parquet``.

    ``sources`` are keys of :data:`SOURCES` (default: all). ``tarballs`` maps source keys, and ``"tags"`` for
    emojibase-data, to local ``.tgz`` files used instead of npm; ``"emoji-google"`` (its ``emoji.json`` names the
    concepts) and ``"tags"`` are always read. ``seed`` must be the evaluation set's seed for its val / test
    concepts to stay out of training. Everything is written to a hidden sibling folder and renamed into place.
    """
    started = time.monotonic()
    sources = tuple(dict.fromkeys(sources or SOURCES))
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise ValueError(f"unknown corpus source(s) {unknown}; expected some of {list(SOURCES)}")
    cache_dir = Path(cache) if cache else None
    local = {key: Path(path) for key, path in (tarballs or {}).items()}
    out_dir = Path(out_dir).resolve()
    check_replaceable(out_dir, _SOURCES_JSON, "a corpus", "an empty or new out_dir")
    index = _load_index(cache_dir, local, seed)
    with building_folder(out_dir) as building:
        rows: list[dict[str, str]] = []
        summary: dict[str, Any] = {}
        for source in sources:
            result = _read_source(source, index, cache_dir, local)
            source_rows = _write_items(result, building, out_dir, seed)
            summary[source] = _source_summary(source, result, source_rows)
            log.info("corpus %s: %d images, skipped %s", source, len(source_rows), dict(result.skipped))
            rows += source_rows
        _write_parquet(building / _CORPUS, rows)
        meta = {"seed": seed, "images": len(rows), "emojibase": PACKAGES["tags"], "sources": summary,
                "build_seconds": round(time.monotonic() - started, 1)}
        (building / _SOURCES_JSON).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return out_dir / _CORPUS


def load_corpus_rows(out_dir: str | Path, split: str | None = None) -> list[dict[str, str]]:
    """Rows of ``corpus.parquet`` (all, or one split's)."""
    import pyarrow.parquet as pq

    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(out_dir) / _CORPUS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; build the corpus first with "
                                f"stair_search.data.corpus.build_corpus({str(out_dir)!r})")
    rows = pq.read_table(path).to_pylist()
    return [r for r in rows if split is None or r["split"] == split]


def load_corpus_pairs(out_dir: str | Path, split: str = "train") -> list[tuple[str, str]]:
    """``(image path, caption)`` training pairs of one split."""
    return [(r["image_path"], r["caption"]) for r in load_corpus_rows(out_dir, split)]


def write_splits(out_dir: str | Path, sources: Sequence[str] | None = None) -> dict[str, Path]:
    """``out_dir/splits/{split}.parquet`` for each split, holding the rows of ``sources`` (default: all built
    ones) in corpus order: the files ``stair-search train`` takes."""
    rows = load_corpus_rows(out_dir)
    built = list(dict.fromkeys(r["source"] for r in rows))
    wanted = list(sources) if sources is not None else built
    missing = [s for s in wanted if s not in built]
    if missing:
        raise ValueError(f"source(s) {missing} are not in the corpus at {out_dir} (it holds {built}): rebuild it "
                         f"with them")
    folder = Path(out_dir) / "splits"
    folder.mkdir(exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = folder / f"{split}.parquet"
        _write_parquet(paths[split], [r for r in rows if r["split"] == split and r["source"] in wanted])
    return paths
