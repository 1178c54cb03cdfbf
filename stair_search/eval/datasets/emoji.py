"""The emoji retrieval data set: records with splits, training captions, queries and TREC qrels.

Built from :func:`stair_search.data.emoji_packages.load_emoji` (Google and Twitter 64 px PNGs joined with the CLDR
labels and tags of emojibase). Choices, and why:

* **Concept** = the emoji's code (``hexcode``, e.g. ``1F600``): the same emoji drawn in two styles is one concept.
* **Skin-tone variants are left out.** They are near-identical drawings of the base emoji with the same tags, so
  a label query would have six look-alike answers and a tag query up to six times as many; the loader's
  default already skips them.
* **Splits** come from a hash of ``(seed, concept)`` against the fractions (default 70 / 10 / 20): a concept's
  split depends on nothing else (not on which styles or other emoji are present), every style of a concept
  is in the same split, and so a test concept is never seen in training.
* **Images** are re-written as 64x64 RGB PNGs (transparency composited on white, as the indexer does), so every
  consumer sees the same pixels.
* **Caption** (training text) = ``label`` then the tags that differ from it, joined by ", ":
  ``"grinning face, face, grin, grinning"``.
* **Label queries** (known item): one per label in the split; relevant = that concept's image in the style
  (one per style; in ``all`` one per style). A query whose concept has no image in a style is left out of that
  style's qrels.
* **Tag queries**: one per tag carried by 3 to 50 concepts of the split; relevant = every image of those
  concepts in the style. A tag whose text equals a label query of the same split (e.g. tag ``cat`` and the
  label ``cat``) is dropped: the same text would be judged twice with contradictory answers (one item vs. all
  cats), which rewards neither behaviour. Drops are counted in ``summary.json``.

Files under ``out_dir``: ``records.parquet``, ``images/<style>/<code>.png``, ``queries/{split}.{kind}.tsv``,
``qrels/{split}.{kind}.{style|all}.txt`` and ``summary.json`` (counts, seed, fractions, package versions).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stair_search.data.emoji_packages import PACKAGES, STYLES, EmojiRecord, load_emoji
from stair_search.data.folders import building as building_folder
from stair_search.data.folders import check_replaceable
from stair_search.data.splits import DEFAULT_FRACTIONS, SPLITS, caption_for, normalise_text, split_of
from stair_search.eval.metrics import load_qrels, load_queries, write_qrels, write_queries

QUERY_KINDS = ("label", "tag")
QRELS_STYLES = (*STYLES, "all")
TAG_MIN_CONCEPTS, TAG_MAX_CONCEPTS = 3, 50
IMAGE_SIZE = 64
COLUMNS = ("id", "style", "hexcode", "concept", "split", "image_path", "label", "tags", "group", "caption")
_SUMMARY = "summary.json"


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS) or any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, "
                         f"got {fractions}")
    return values  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------------
# Queries and qrels (pure functions over record dicts, so they can be checked on hand-made records)


@dataclass
class QuerySet:
    """Queries of one kind in one split, with qrels per style (and ``all``)."""

    queries: dict[str, str] = field(default_factory=dict)  # qid -> text
    qrels: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)  # style -> qid -> {doc: 1}
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> how many candidate queries


def _qrels_by_style(relevant_docs: Mapping[str, list[Mapping[str, Any]]], styles: Sequence[str]
                    ) -> dict[str, dict[str, dict[str, int]]]:
    """qid -> records  =>  style -> qid -> {doc id: 1}; a style with no relevant image omits the query."""
    qrels: dict[str, dict[str, dict[str, int]]] = {style: {} for style in (*styles, "all")}
    for qid, docs in relevant_docs.items():
        for style in (*styles, "all"):
            judged = {d["id"]: 1 for d in docs if style in ("all", d["style"])}
            if judged:
                qrels[style][qid] = judged
    return qrels


def label_queries(records: Sequence[Mapping[str, Any]], split: str, styles: Sequence[str]) -> QuerySet:
    """One known-item query per distinct label of the split (concepts that share a label share the query)."""
    by_label: dict[str, list[Mapping[str, Any]]] = {}
    texts: dict[str, str] = {}
    for record in sorted(records, key=lambda r: (r["concept"], r["style"])):
        key = normalise_text(record["label"])
        texts.setdefault(key, record["label"])
        by_label.setdefault(key, []).append(record)
    qids = {key: f"{split}-label-{i:05d}" for i, key in enumerate(by_label)}
    return QuerySet(queries={qids[key]: texts[key] for key in by_label},
                    qrels=_qrels_by_style({qids[key]: docs for key, docs in by_label.items()}, styles))


def tag_queries(records: Sequence[Mapping[str, Any]], split: str, styles: Sequence[str],
                label_texts: set[str]) -> QuerySet:
    """One query per tag carried by 3-50 concepts of the split, unless its text is one of ``label_texts``."""
    concepts_by_tag: dict[str, set[str]] = {}
    for record in records:
        for tag in record["tags"]:
            if normalise_text(tag):
                concepts_by_tag.setdefault(normalise_text(tag), set()).add(record["concept"])
    dropped = {"fewer than 3 concepts": 0, "more than 50 concepts": 0, "same text as a label query": 0}
    kept: dict[str, list[Mapping[str, Any]]] = {}
    for tag in sorted(concepts_by_tag):
        count = len(concepts_by_tag[tag])
        if count < TAG_MIN_CONCEPTS:
            dropped["fewer than 3 concepts"] += 1
        elif count > TAG_MAX_CONCEPTS:
            dropped["more than 50 concepts"] += 1
        elif tag in label_texts:
            dropped["same text as a label query"] += 1
        else:
            concepts = concepts_by_tag[tag]
            kept[tag] = sorted((r for r in records if r["concept"] in concepts), key=lambda r: r["id"])
    qids = {tag: f"{split}-tag-{i:05d}" for i, tag in enumerate(kept)}
    return QuerySet(queries={qids[tag]: tag for tag in kept},
                    qrels=_qrels_by_style({qids[tag]: docs for tag, docs in kept.items()}, styles), dropped=dropped)


def split_queries(records: Sequence[Mapping[str, Any]], split: str, styles: Sequence[str]) -> dict[str, QuerySet]:
    """Label and tag queries of ``split`` (records of other splits are ignored)."""
    in_split = [r for r in records if r["split"] == split]
    labels = label_queries(in_split, split, styles)
    tags = tag_queries(in_split, split, styles, {normalise_text(text) for text in labels.queries.values()})
    return {"label": labels, "tag": tags}


# ------------------------------------------------------------------------------------------------------------
# Building


def _record_row(record: EmojiRecord, split: str, image_path: Path) -> dict[str, Any]:
    return {"id": record.id, "style": record.style, "hexcode": record.hexcode, "concept": record.hexcode,
            "split": split, "image_path": str(image_path), "label": record.label, "tags": list(record.tags),
            "group": record.group, "caption": caption_for(record.label, record.tags)}


def _write_rgb_png(source: Path, dest: Path) -> None:
    """Copy one emoji as a 64x64 RGB PNG (transparency on white, like the indexer sees it)."""
    from PIL import Image

    from stair_search.images import to_rgb

    with Image.open(source) as image:
        rgb = to_rgb(image)
        if rgb.size != (IMAGE_SIZE, IMAGE_SIZE):
            rgb = rgb.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
        dest.parent.mkdir(parents=True, exist_ok=True)
        rgb.save(dest, format="PNG")


def _write_records(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, pa.list_(pa.string()) if name == "tags" else pa.string()) for name in COLUMNS])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _write_queries(root: Path, rows: list[dict[str, Any]], styles: Sequence[str]) -> dict[str, Any]:
    """Write every split's queries and qrels; return their counts for the summary."""
    (root / "queries").mkdir()
    (root / "qrels").mkdir()
    counts: dict[str, Any] = {}
    for split in SPLITS:
        for kind, query_set in split_queries(rows, split, styles).items():
            write_queries(root / "queries" / f"{split}.{kind}.tsv", query_set.queries)
            for style, qrels in query_set.qrels.items():
                write_qrels(root / "qrels" / f"{split}.{kind}.{style}.txt", qrels)
            counts[f"{split}.{kind}"] = {
                "queries": len(query_set.queries),
                "judged": {style: len(qrels) for style, qrels in query_set.qrels.items()},
                "relevant": {style: sum(map(len, qrels.values())) for style, qrels in query_set.qrels.items()},
                **({"dropped": query_set.dropped} if query_set.dropped else {}),
            }
    return counts


def _summary(rows: list[dict[str, Any]], styles: Sequence[str], seed: int, fractions: Sequence[float],
             query_counts: dict[str, Any]) -> dict[str, Any]:
    per_split = {
        split: {"concepts": len({r["concept"] for r in rows if r["split"] == split}),
                "images": {style: sum(r["split"] == split and r["style"] == style for r in rows) for style in styles}}
        for split in SPLITS
    }
    return {"seed": seed, "fractions": dict(zip(SPLITS, fractions, strict=True)), "styles": list(styles),
            "packages": {key: PACKAGES[key] for key in (*styles, "tags")}, "images": len(rows),
            "concepts": len({r["concept"] for r in rows}), "splits": per_split, "queries": query_counts}


def build_emoji_dataset(out_dir: str | Path, styles: Sequence[str] = STYLES, seed: int = 0,
                        cache: str | Path | None = None, tarballs: Mapping[str, str | Path] | None = None,
                        fractions: Sequence[float] = DEFAULT_FRACTIONS) -> EmojiDataset:
    """Build (or rebuild) the data set in ``out_dir`` and return it.

    ``cache`` and ``tarballs`` are passed to :func:`load_emoji` (npm cache folder; local ``.tgz`` files keyed
    ``google`` / ``twitter`` / ``tags``). Everything is written to a hidden sibling folder first and renamed into
    place, so an interrupted build never leaves a half data set where a finished one is expected.
    """
    styles = tuple(dict.fromkeys(styles))
    fractions = _check_fractions(fractions)
    out_dir = Path(out_dir).resolve()
    check_replaceable(out_dir, _SUMMARY, "an emoji data set", "an empty or new --out folder")
    records = load_emoji(styles, cache=Path(cache) if cache else None,
                         tarballs={k: Path(v) for k, v in (tarballs or {}).items()})
    if not records:
        raise ValueError(f"no emoji image found for styles {list(styles)}; check the packages or tarballs")
    with building_folder(out_dir) as building:
        rows = []
        for record in records:
            relative = Path("images") / record.style / f"{record.hexcode.lower()}.png"
            _write_rgb_png(record.path, building / relative)
            rows.append(_record_row(record, split_of(record.hexcode, seed, fractions), out_dir / relative))
        _write_records(building / "records.parquet", rows)
        query_counts = _write_queries(building, rows, styles)
        summary = _summary(rows, styles, seed, fractions, query_counts)
        (building / _SUMMARY).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    dataset = EmojiDataset(out_dir)
    for split in SPLITS:  # per-split files: what `stair-search train` and `stair-search index` take
        dataset.write_split(split)
    return dataset


# ------------------------------------------------------------------------------------------------------------
# Reading


class EmojiDataset:
    """A built data set folder: records by split and style, training pairs, queries and qrels."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        summary = self.root / _SUMMARY
        if not summary.is_file():
            raise FileNotFoundError(f"{self.root} is not an emoji data set (no {_SUMMARY}); build it with "
                                    f"`stair-search dataset emoji --out {self.root}`")
        self.summary: dict[str, Any] = json.loads(summary.read_text(encoding="utf-8"))
        self.styles: tuple[str, ...] = tuple(self.summary["styles"])
        self._rows: list[dict[str, Any]] | None = None

    def _all_rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            import pyarrow.parquet as pq

            self._rows = pq.read_table(self.root / "records.parquet").to_pylist()
        return self._rows

    def records(self, split: str | None = None, styles: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Record dicts (columns of ``records.parquet``), sorted by id; ``None`` means every split / style."""
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        wanted = self._check_styles(styles)
        return [dict(r) for r in self._all_rows() if (split is None or r["split"] == split) and r["style"] in wanted]

    def pairs(self, split: str | None = None, styles: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """``(image path, caption)`` training pairs."""
        return [(r["image_path"], r["caption"]) for r in self.records(split, styles)]

    def write_split(self, split: str, styles: Sequence[str] | None = None, path: str | Path | None = None) -> Path:
        """Write one split's records as a parquet file the indexer reads (``splits/<split>.<styles>.parquet``).

        Index it with ``id_column="id"`` so that the document ids are the ones the qrels name.
        """
        styles_name = "-".join(sorted(self._check_styles(styles)))
        target = Path(path) if path else self.root / "splits" / f"{split}.{styles_name}.parquet"
        target.parent.mkdir(parents=True, exist_ok=True)
        _write_records(target, self.records(split, styles))
        return target

    def queries(self, split: str, kind: str) -> dict[str, str]:
        """qid -> query text."""
        return load_queries(self.queries_path(split, kind))

    def queries_path(self, split: str, kind: str) -> Path:
        self._check(split, kind)
        return self.root / "queries" / f"{split}.{kind}.tsv"

    def qrels(self, split: str, kind: str, style: str = "all") -> dict[str, dict[str, int]]:
        return load_qrels(self.qrels_path(split, kind, style))

    def qrels_path(self, split: str, kind: str, style: str = "all") -> Path:
        self._check(split, kind)
        if style != "all" and style not in self.styles:
            raise ValueError(f"this data set has styles {self.styles} (or 'all'), not {style!r}")
        return self.root / "qrels" / f"{split}.{kind}.{style}.txt"

    def _check(self, split: str, kind: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        if kind not in QUERY_KINDS:
            raise ValueError(f"unknown query kind {kind!r}; expected one of {QUERY_KINDS}")

    def _check_styles(self, styles: Sequence[str] | None) -> set[str]:
        if styles is None:
            return set(self.styles)
        if isinstance(styles, str):
            styles = [styles]
        unknown = [s for s in styles if s not in self.styles]
        if unknown:
            raise ValueError(f"this data set has styles {self.styles}, not {unknown}")
        return set(styles)

    def __repr__(self) -> str:
        return f"EmojiDataset({str(self.root)!r}, styles={self.styles}, images={self.summary['images']})"
