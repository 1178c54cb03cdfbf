"""Where images come from: a folder tree, parquet, webdataset tar shards, or a list of paths.

Every source yields :class:`Item` s in a fixed order with stable ids (from the path/URI, an id column, or
optionally a content hash), so that an interrupted job can skip exactly the items it already indexed.

A bad entry never stops a source: an entry the source itself can tell is unusable (a missing id, a bytes
cell holding text, a tar key without an image, the unreadable rest of a truncated tar) comes out as an item
with a ``problem``, which the job reports as skipped, and the source goes on. Only a source that cannot be
read at all (it does not exist, or a column it was told to use is not there) is an error, raised by
:func:`check` before a job starts. Relative paths are resolved against the working directory the job runs
in, and stored absolute, so that the service can show them from anywhere.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import hashlib
import json
import math
import os
import re
import stat
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TextIO

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
# Image formats a folder may hold that PIL may not decode here (no plugin installed): listed, so that each one
# is reported as skipped with the fix instead of being passed over in silence.
OTHER_IMAGE_SUFFIXES = {".heic", ".heif", ".avif", ".jxl", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                        ".rw2", ".raf"}
MAX_CAPTION_BYTES = 64 * 1024  # a sidecar caption file longer than this is not a caption
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # one image file / tar member / bytes cell; read no further than this
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
    problem: str | None = None  # why the source already knows this item cannot be indexed (reported as skipped)


class NotRead(OSError):
    """Not read: a FIFO, device, socket or folder where an image file was expected (it could block or never
    end), or more bytes than the cap. The message is the skip reason."""


@contextlib.contextmanager
def _open_regular(path: str | Path) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """``path`` opened non-blocking (a FIFO cannot hang the reader) with the ``fstat`` of that descriptor, so
    what a caller checks is what it reads."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(descriptor, "rb") as f:
        yield f, os.fstat(descriptor)


def too_large(size: int | None, max_bytes: int) -> NotRead:
    """The skip reason for more bytes than the cap (``size`` None: the read stopped at the cap)."""
    if size is None:
        return NotRead(f"too large: over {max_bytes} bytes (raise --max-bytes)")
    return NotRead(f"too large: {size} bytes > {max_bytes} (raise --max-bytes)")


def read_file(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of a regular file (symlinks followed), refusing special files and files over ``max_bytes``."""
    with _open_regular(path) as (f, info):
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
            raise NotRead(f"not a regular file ({kind})")
        if info.st_size > max_bytes:
            raise too_large(info.st_size, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # it grew while being read
        raise too_large(None, max_bytes)
    return data


@dataclass
class SourceOptions:
    id_column: str | None = None
    path_column: str | None = None
    bytes_column: str | None = None
    caption_column: str | None = None
    metadata_columns: Sequence[str] = ()
    hash_ids: bool = False  # id = sha1 of the image bytes (same image twice -> one document)


def looks_like_image(path: Path) -> bool:
    """An image suffix, or (for files without one) an image's magic number in the first bytes."""
    if path.suffix.lower() in IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES:
        return True
    try:
        with _open_regular(path) as (f, info):
            head = f.read(12) if stat.S_ISREG(info.st_mode) else b""
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
    if not path.exists():
        raise FileNotFoundError(f"Source '{spec}' does not exist.")
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix.lower() in (".txt", ".csv", ".tsv", ".lst"):
        return "list"
    raise ValueError(f"Source '{spec}': give a folder of images, a .parquet file or folder, webdataset .tar "
                     f"shards (name{{000..009}}.tar) or a .txt/.csv list of paths.")


def check(spec: str, options: SourceOptions | None = None) -> str:
    """Raise the error a source would stop with (it does not exist; a column it needs is not there), before a
    job creates anything; returns the source's kind. Reads headers only."""
    options = options or SourceOptions()
    kind = describe(spec)
    if kind == "parquet":
        for file in _parquet_files(Path(spec)):
            _parquet_columns(file, options)
    elif kind == "webdataset":
        _shards(spec)
    elif kind == "list" and Path(spec).suffix.lower() in (".csv", ".tsv") and Path(spec).is_file():
        # a regular file only: a list may come through a pipe (a FIFO, <(find ...)), which can be read once
        with _open_text(Path(spec)) as f:
            _csv_columns(Path(spec), csv.DictReader(f, delimiter=_delimiter(Path(spec))).fieldnames or [], options)
    return kind


@contextlib.contextmanager
def _open_text(path: Path) -> Iterator[TextIO]:
    """A list or CSV file as UTF-8 text (a byte-order mark, as spreadsheet programs write, is dropped); a file
    in another encoding is an error naming it and the fix."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            yield f
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as "
                             f"UTF-8.") from None


def iter_items(spec: str, options: SourceOptions | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> Iterator[Item]:
    """Every item of the source in its fixed order; ``max_bytes`` caps what one item may read."""
    options = options or SourceOptions()
    kind = describe(spec)
    readers = {"folder": _folder, "parquet": _parquet, "webdataset": _webdataset, "list": _list}
    items = readers[kind](spec, options, max_bytes)
    return _hashed(items, max_bytes) if options.hash_ids else items


def _hashed(items: Iterator[Item], max_bytes: int) -> Iterator[Item]:
    for item in items:
        data = item.data
        if item.problem is None and data is None and item.path:
            try:
                data = read_file(item.path, max_bytes)
            except OSError:
                yield item  # the decoder reports why it cannot be read
                continue
        if data is not None:
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


def _folder(spec: str, options: SourceOptions, max_bytes: int) -> Iterator[Item]:
    """Every image under the folder; a caption file beside an image (``photo.jpg`` + ``photo.txt``, the usual
    sidecar) is its caption."""
    root = Path(spec)
    for path in image_files(root):
        yield Item(id=printable(path.relative_to(root).as_posix()), source=printable(str(path.absolute())),
                   path=str(path), caption=_sidecar_caption(path))


def _sidecar_caption(image: Path) -> str:
    sidecar = image.with_suffix(".txt")
    try:
        return printable(read_file(sidecar, MAX_CAPTION_BYTES).decode("utf-8", "replace").strip())
    except OSError:  # none, unreadable, a FIFO, too long: no caption
        return ""


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a file name's bytes that are not UTF-8 (Python holds them as surrogates, which
    no parquet or JSON writer takes) become ``\\xff`` escapes; every other name is returned unchanged."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def plain_metadata(value: Any) -> Any:
    """A metadata value as strict JSON can hold it: dates and times as ISO text, decimals and numpy scalars as
    numbers, NaN and infinities as null, bytes as their length, text made valid UTF-8."""
    if isinstance(value, dict):
        return {printable(str(k)): plain_metadata(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain_metadata(v) for v in value]
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return plain_metadata(float(value))
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": len(value)}
    if hasattr(value, "item"):  # numpy scalars
        return plain_metadata(value.item())
    return printable(str(value))


def _absolute(location: str) -> str:
    """A local path as an absolute one (what the service resolves); URLs and absolute paths unchanged."""
    if "://" in location or os.path.isabs(location):
        return location
    return os.path.abspath(location)


# ---------------------------------------------------------------------------------------------- parquet


def _parquet_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


@dataclass
class _Columns:
    path: str | None
    data: str | None
    caption: str | None
    wanted: list[str]


def _parquet_columns(file: Path, options: SourceOptions) -> _Columns:
    import pyarrow.parquet as pq

    try:
        names = pq.ParquetFile(file).schema_arrow.names
    except Exception as exc:  # pyarrow's ArrowInvalid / OSError for a file that is not parquet
        raise ValueError(f"{file} is not a readable parquet file ({exc}).") from exc
    path_col = options.path_column or next((c for c in PATH_COLUMNS if c in names), None)
    bytes_col = options.bytes_column or ("image" if "image" in names and path_col is None else None)
    if path_col is None and bytes_col is None:
        raise ValueError(f"{file}: no image column. Name it with --path-column (one of {list(PATH_COLUMNS)} is "
                         f"found automatically) or --bytes-column. Columns: {names}")
    caption_col = options.caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
    wanted = [c for c in dict.fromkeys([options.id_column, path_col, bytes_col, caption_col,
                                        *options.metadata_columns]) if c]
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(f"{file}: columns {missing} not found; it has {names}")
    return _Columns(path_col, bytes_col, caption_col, wanted)


def _parquet(spec: str, options: SourceOptions, max_bytes: int) -> Iterator[Item]:
    import pyarrow.parquet as pq

    for file in _parquet_files(Path(spec)):
        columns = _parquet_columns(file, options)
        row = 0
        for batch in pq.ParquetFile(file).iter_batches(columns=columns.wanted, batch_size=1024):
            for record in batch.to_pylist():
                yield _parquet_item(record, file, row, columns, options)
                row += 1


def _parquet_item(record: dict, file: Path, row: int, columns: _Columns, options: SourceOptions) -> Item:
    location = record.get(columns.path) if columns.path else None
    where = f"{file}#row={row}"
    source = _absolute(str(location)) if location else where
    data, problem = _cell_bytes(record.get(columns.data), columns.data) if columns.data else (None, None)
    if columns.data and data is None and problem is None and not location:
        problem = f"no image: the '{columns.data}' cell is empty"
    doc_id = record.get(options.id_column) if options.id_column else location or f"{file.name}:{row}"
    if doc_id is None or str(doc_id).strip() == "":
        doc_id, problem = where, f"missing id: the '{options.id_column}' cell is empty"
    return Item(id=str(doc_id), source=source, path=source if location else None, data=data,
                caption=printable(str(record.get(columns.caption) or "")) if columns.caption else "",
                metadata={c: plain_metadata(record.get(c)) for c in options.metadata_columns}, problem=problem)


def _cell_bytes(cell: Any, column: str) -> tuple[bytes | None, str | None]:
    """A bytes column's cell -> (image bytes, None) or (None, why not). Hugging Face's image struct
    ``{"bytes": ..., "path": ...}`` is read too."""
    if isinstance(cell, dict):
        cell = cell.get("bytes")
    if cell is None or isinstance(cell, bytes | bytearray | memoryview):
        return (bytes(cell) if cell is not None else None), None
    kind = "text" if isinstance(cell, str) else f"a {type(cell).__name__}"
    return None, (f"not image bytes: the '{column}' cell holds {kind} (a column of paths is named with "
                  f"--path-column)")


# ---------------------------------------------------------------------------------------------- webdataset


def _webdataset(spec: str, options: SourceOptions, max_bytes: int) -> Iterator[Item]:
    """webdataset layout: members grouped by key (name up to the first dot after the last '/'), one image
    member plus optional .txt (caption) and .json (metadata) per key. A shard that is not a tar, or whose
    end is truncated or corrupt, gives what it holds up to the damage and one skipped item for the rest."""
    for shard in _shards(spec):
        yield from _shard_items(os.path.abspath(shard), max_bytes)


def _shards(spec: str) -> list[str]:
    """The shard files ``spec`` names, or a FileNotFoundError naming those that are not there."""
    shards = expand_braces(spec)
    missing = [s for s in shards if not Path(s).is_file()]
    if missing:
        raise FileNotFoundError(f"webdataset shards not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return shards


def _shard_items(shard: str, max_bytes: int) -> Iterator[Item]:
    group: dict[str, bytes | int] = {}  # extension -> bytes (or the size of a member too large to read)
    key, members, damage = None, 0, None
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    member_key, _, ext = _split_key(member.name)
                    if key is not None and member_key != key:
                        yield _wds_item(shard, key, group, max_bytes)
                        group = {}
                    key = member_key
                    group[ext.lower()] = member.size if member.size > max_bytes else tar.extractfile(member).read()
                members += 1
            damage = _end_of_archive_missing(shard, tar.offset)
    except (tarfile.TarError, OSError, EOFError) as exc:
        damage = str(exc)
    if key is not None and (damage is None or any(f".{e}" in IMAGE_SUFFIXES and isinstance(v, bytes)
                                                  for e, v in group.items())):
        yield _wds_item(shard, key, group, max_bytes)
    if damage is not None:
        yield Item(id=printable(f"{Path(shard).name}#{members}"), source=printable(shard), problem=(
            f"corrupt or truncated tar: unreadable after {members} member(s) ({damage}); the rest of this shard "
            f"is skipped"))


def _end_of_archive_missing(shard: str, offset: int) -> str | None:
    """Python's tarfile ends its iteration in silence at a cut or damaged header past the first one; a whole
    archive has a zero block (its end marker) there."""
    with open(shard, "rb") as f:
        f.seek(offset)
        block = f.read(tarfile.BLOCKSIZE)
    if len(block) < tarfile.BLOCKSIZE:
        return "the archive ends inside a header, without its end-of-archive marker"
    if block.count(0) != tarfile.BLOCKSIZE:
        return f"a damaged member header at byte {offset}"
    return None


def _split_key(name: str) -> tuple[str, str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, ext


def _wds_item(shard: str, key: str, group: dict[str, bytes | int], max_bytes: int) -> Item:
    item = Item(id=printable(f"{Path(shard).name}/{key}"), source=printable(f"{shard}#{key}"))
    image_ext = next((e for e in group if f".{e}" in IMAGE_SUFFIXES), None)
    if image_ext is None:
        found = ", ".join(f".{e}" for e in group) or "none"
        item.problem = f"no image member for this key (members: {found})"
        return item
    item.source += f".{image_ext}"
    image = group[image_ext]
    if isinstance(image, int):
        item.problem = str(too_large(image, max_bytes))
        return item
    item.data = image
    item.caption = printable(_text(group.get("txt")).strip())
    item.metadata = _json_metadata(group.get("json"))
    return item


def _text(value: bytes | int | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def _json_metadata(value: bytes | int | None) -> dict[str, Any]:
    try:
        metadata = json.loads(value) if isinstance(value, bytes) else {}
    except ValueError:
        return {}
    return plain_metadata(metadata if isinstance(metadata, dict) else {"json": metadata})


# ---------------------------------------------------------------------------------------------- lists


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() == ".tsv" else ","


def _csv_columns(path: Path, names: Sequence[str], options: SourceOptions) -> tuple[str, str | None]:
    path_col = options.path_column or next((c for c in PATH_COLUMNS if c in names), None)
    if path_col is None:
        raise ValueError(f"{path}: no path column; name it with --path-column. Columns: {list(names)}")
    missing = [c for c in (path_col, options.id_column, options.caption_column, *options.metadata_columns)
               if c and c not in names]
    if missing:
        raise ValueError(f"{path}: columns {missing} not found; it has {list(names)}")
    caption_col = options.caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
    return path_col, caption_col


def _list(spec: str, options: SourceOptions, max_bytes: int) -> Iterator[Item]:
    path = Path(spec)
    if path.suffix.lower() in (".csv", ".tsv"):
        yield from _csv(path, options)
        return
    with _open_text(path) as f:
        for line in f:
            location = line.strip()
            if location and not location.startswith("#"):
                yield Item(id=location, source=_absolute(location), path=_absolute(location))


def _csv(path: Path, options: SourceOptions) -> Iterator[Item]:
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter=_delimiter(path))
        path_col, caption_col = _csv_columns(path, reader.fieldnames or [], options)
        for line, row in enumerate(reader, start=2):
            location = (row.get(path_col) or "").strip()
            doc_id = row.get(options.id_column) if options.id_column else location
            item = Item(id=doc_id or f"{path.name}:{line}", source=_absolute(location) if location else
                        f"{path}#line={line}", path=_absolute(location) if location else None,
                        caption=(row.get(caption_col) or "") if caption_col else "",
                        metadata={c: row.get(c) for c in options.metadata_columns})
            if not location:
                item.problem = f"no image: the '{path_col}' cell is empty"
            elif not doc_id:
                item.problem = f"missing id: the '{options.id_column}' cell is empty"
            yield item
