"""Where images come from: a folder tree, parquet, webdataset tar shards, or a list of paths.

Every source yields :class:`Item` s in a fixed order with stable ids (from the path/URI, an id column, or
optionally a content hash), so that an interrupted job can skip exactly the items it already indexed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
# Magic numbers of the formats PIL decodes most often: files without an image suffix are sniffed.
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
PATH_COLUMNS = ("path", "filepath", "file", "url", "uri", "image_path")
CAPTION_COLUMNS = ("caption", "text", "title", "alt")


@dataclass
class Item:
    id: str
    source: str  # path or URI as shown to users
    path: str | None = None  # read from here ...
    data: bytes | None = None  # ... or these bytes (parquet bytes column, tar member)
    caption: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceOptions:
    id_column: str | None = None
    path_column: str | None = None
    bytes_column: str | None = None
    caption_column: str | None = None
    metadata_columns: Sequence[str] = ()
    hash_ids: bool = False  # id = sha1 of the image bytes (same image twice -> one document)


def looks_like_image(path: Path) -> bool:
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def expand_braces(pattern: str) -> list[str]:
    """``shards/{000..002}.tar`` -> the three names (zero padding kept), like webdataset."""
    match = _BRACES.search(pattern)
    if not match:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    width = len(lo)
    head, tail = pattern[: match.start()], pattern[match.end() :]
    names = [head + str(i).zfill(width) + tail for i in range(int(lo), int(hi) + 1)]
    return [expanded for name in names for expanded in expand_braces(name)]


def describe(spec: str) -> str:
    """Which kind of source ``spec`` names (or a ValueError saying what is accepted)."""
    path = Path(spec)
    if _BRACES.search(spec) or spec.endswith(".tar"):
        return "webdataset"
    if path.is_dir():
        return "parquet" if any(path.glob("*.parquet")) and not any(image_files(path, limit=1)) else "folder"
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix.lower() in (".txt", ".csv", ".tsv", ".lst"):
        return "list"
    if not path.exists():
        raise FileNotFoundError(f"Source '{spec}' does not exist.")
    raise ValueError(f"Source '{spec}': give a folder of images, a .parquet file or folder, webdataset .tar "
                     f"shards (name{{000..009}}.tar) or a .txt/.csv list of paths.")


def iter_items(spec: str, options: SourceOptions | None = None) -> Iterator[Item]:
    options = options or SourceOptions()
    kind = describe(spec)
    items = {"folder": _folder, "parquet": _parquet, "webdataset": _webdataset, "list": _list}[kind](spec, options)
    return _hashed(items) if options.hash_ids else items


def _hashed(items: Iterator[Item]) -> Iterator[Item]:
    for item in items:
        data = item.data
        if data is None and item.path:
            try:
                data = Path(item.path).read_bytes()
            except OSError:
                yield item  # the decoder reports why it cannot be read
                continue
        item.id = hashlib.sha1(data).hexdigest()
        yield item


def image_files(root: Path, limit: int | None = None) -> Iterator[Path]:
    """Image files under ``root`` (hidden folders and files skipped), sorted: the fixed order a job numbers."""
    count = 0
    visible = (p for p in root.rglob("*") if not any(part.startswith(".") for part in p.relative_to(root).parts))
    for path in sorted(visible):
        if (path.is_file() or path.is_symlink()) and looks_like_image(path):
            yield path
            count += 1
            if limit and count >= limit:
                return


def _folder(spec: str, options: SourceOptions) -> Iterator[Item]:
    root = Path(spec)
    for path in image_files(root):
        yield Item(id=path.relative_to(root).as_posix(), source=str(path.absolute()), path=str(path))


def _parquet(spec: str, options: SourceOptions) -> Iterator[Item]:
    import pyarrow.parquet as pq

    path = Path(spec)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for file in files:
        parquet = pq.ParquetFile(file)
        names = parquet.schema_arrow.names
        path_col = options.path_column or next((c for c in PATH_COLUMNS if c in names), None)
        bytes_col = options.bytes_column or ("image" if "image" in names and path_col is None else None)
        if path_col is None and bytes_col is None:
            raise ValueError(f"{file}: no image column. Name it with --path-column (one of {list(PATH_COLUMNS)} is "
                             f"found automatically) or --bytes-column. Columns: {names}")
        caption_col = options.caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
        wanted = [c for c in {options.id_column, path_col, bytes_col, caption_col, *options.metadata_columns} if c]
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ValueError(f"{file}: columns {missing} not found; it has {names}")
        row = 0
        for batch in parquet.iter_batches(columns=wanted, batch_size=1024):
            for record in batch.to_pylist():
                yield _parquet_item(record, file, row, path_col, bytes_col, caption_col, options)
                row += 1


def _parquet_item(record: dict, file: Path, row: int, path_col: str | None, bytes_col: str | None,
                  caption_col: str | None, options: SourceOptions) -> Item:
    location = record.get(path_col) if path_col else None
    source = str(location) if location else f"{file}#row={row}"
    doc_id = record.get(options.id_column) if options.id_column else location or f"{file.name}:{row}"
    return Item(id=str(doc_id), source=source, path=str(location) if location else None,
                data=record.get(bytes_col) if bytes_col else None,
                caption=str(record.get(caption_col) or "") if caption_col else "",
                metadata={c: record.get(c) for c in options.metadata_columns})


def _webdataset(spec: str, options: SourceOptions) -> Iterator[Item]:
    """webdataset layout: members grouped by key (name up to the first dot after the last '/'), one image
    member plus optional .txt (caption) and .json (metadata) per key."""
    shards = expand_braces(spec)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset shards not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for shard in shards:
        with tarfile.open(shard) as tar:
            group: dict[str, bytes] = {}
            key = None
            for member in tar:
                if not member.isfile():
                    continue
                member_key, _, ext = _split_key(member.name)
                if key is not None and member_key != key:
                    yield from _wds_item(shard, key, group)
                    group = {}
                key = member_key
                group[ext.lower()] = tar.extractfile(member).read()
            if key is not None:
                yield from _wds_item(shard, key, group)


def _split_key(name: str) -> tuple[str, str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, ext


def _wds_item(shard: str, key: str, group: dict[str, bytes]) -> Iterator[Item]:
    image_ext = next((e for e in group if f".{e}" in IMAGE_SUFFIXES), None)
    shard_name = Path(shard).name
    if image_ext is None:
        # no image member: passed on with no data so that the decoder reports it as skipped
        yield Item(id=f"{shard_name}/{key}", source=f"{shard}#{key}", data=b"")
        return
    metadata = {}
    if "json" in group:
        try:
            metadata = json.loads(group["json"])
        except ValueError:
            metadata = {}
    caption = group.get("txt", b"").decode("utf-8", "replace").strip()
    yield Item(id=f"{shard_name}/{key}", source=f"{shard}#{key}.{image_ext}", data=group[image_ext],
               caption=caption, metadata=metadata if isinstance(metadata, dict) else {"json": metadata})


def _list(spec: str, options: SourceOptions) -> Iterator[Item]:
    path = Path(spec)
    if path.suffix.lower() in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            names = reader.fieldnames or []
            path_col = options.path_column or next((c for c in PATH_COLUMNS if c in names), None)
            if path_col is None:
                raise ValueError(f"{path}: no path column; name it with --path-column. Columns: {names}")
            caption_col = options.caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
            for row in reader:
                location = row[path_col]
                yield Item(id=row.get(options.id_column) if options.id_column else location, source=location,
                           path=location, caption=row.get(caption_col, "") if caption_col else "",
                           metadata={c: row.get(c) for c in options.metadata_columns})
        return
    with open(path, encoding="utf-8") as f:
        for line in f:
            location = line.strip()
            if location and not location.startswith("#"):
                yield Item(id=location, source=location, path=location)
