"""Where images come from: a folder tree, parquet, webdataset tar shards, or a list of paths.

Every source yields :class:`Item` s in a fixed order with stable ids (from the path/URI, an id column, or
optionally a content hash), so that an interrupted job can skip exactly the items it already indexed.

A bad entry never stops a source: an entry the source itself can tell is unusable (a missing id, a bytes
cell holding text, a tar key without an image, the unreadable rest of a truncated tar) comes out as an item
with a ``problem``, which the job reports as skipped, and the source goes on. Only a source that cannot be
read at all (it does not exist, its path is longer than the system allows, or a column it was told to use is
not there) is an error, raised by :func:`check` before a job starts. Damage the format lets a reader step over
is an item with a problem too: an unreadable subfolder, a parquet row group that cannot be decoded, a CSV
record that cannot be parsed; the reader goes on after it. Relative paths are resolved against the working
directory the job runs in, and stored absolute (:func:`stair_search.images.file_source`: a file and a tar
member never read back as each other, and a name that is not UTF-8 reads back as the same bytes), so that the
service can show them from anywhere.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import decimal
import errno
import hashlib
import json
import math
import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from stair_search.images import (
    NotRead,
    file_source,
    member_source,
    one_line,
    open_regular,
    printable,
    read_file,
    too_large,
)

__all__ = ["DEFAULT_MAX_BYTES", "FILE_FIELDS", "IMAGE_SUFFIXES", "OTHER_IMAGE_SUFFIXES", "FolderEntry", "Item",
           "NotRead", "SourceOptions", "check", "describe", "expand_braces", "file_metadata",
           "folder_entries", "image_files", "iter_items", "looks_like_image", "plain_metadata", "printable",
           "read_file", "too_large"]

# HEIC/HEIF (what iPhones save) is read through pillow-heif, a dependency of the default install.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}
# Image formats a folder may hold that PIL may not decode here (no plugin installed): listed, so that each one
# is reported as skipped with the fix instead of being passed over in silence (HEIC too, where pillow-heif has
# no wheel).
OTHER_IMAGE_SUFFIXES = {".heic", ".heif", ".avif", ".jxl", ".svg", ".dng", ".cr2", ".cr3", ".nef", ".arw", ".orf",
                        ".rw2", ".raf"}
FILE_FIELDS = ("folder", "size", "modified")  # a folder source's metadata of each file (file_metadata)
MAX_CAPTION_BYTES = 64 * 1024  # a sidecar caption file longer than this is not a caption
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # one image file / tar member / bytes cell; read no further than this
# Magic numbers of the formats PIL decodes most often: files without an image suffix are sniffed.
_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"mif1", b"msf1")  # an ISO-BMFF 'ftyp' of HEIF
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")
# A CSV field may be this long (a long caption; Python's csv stops at 128 KiB); a longer one skips its record.
CSV_FIELD_LIMIT = 16 * 1024 * 1024
PATH_COLUMNS = ("path", "filepath", "file", "url", "uri", "image_path")
CAPTION_COLUMNS = ("caption", "text", "title", "alt")


@dataclass
class Item:
    id: str
    source: str  # where it is, as the index stores it (stair_search.images.file_source / member_source) or a URI
    path: str | None = None  # read from here ...
    data: bytes | None = None  # ... or these bytes (parquet bytes column, tar member)
    caption: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None  # why the source already knows this item cannot be indexed (reported as skipped)


@dataclass
class SourceOptions:
    id_column: str | None = None
    path_column: str | None = None
    bytes_column: str | None = None
    caption_column: str | None = None
    metadata_columns: Sequence[str] = ()
    hash_ids: bool = False  # id = sha1 of the image bytes (same image twice -> one document)
    checksum: bool = False  # metadata "sha1" = sha1 of the image bytes (what a --checksum sync compares)


def looks_like_image(path: Path) -> bool:
    """An image suffix, or (for regular files without one) an image's magic number in the first bytes."""
    if path.suffix.lower() in IMAGE_SUFFIXES | OTHER_IMAGE_SUFFIXES:
        return True
    try:
        with open_regular(path) as (f, _):  # a FIFO or device is refused from stat, never opened
            head = f.read(12)
    except OSError:
        return False
    return (head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
            or (head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS))


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
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except OSError as exc:  # a path longer than PATH_MAX, a loop of symlinks, an I/O error
        raise ValueError(_unusable_path(spec, exc)) from None
    if is_dir:
        return "parquet" if any(path.glob("*.parquet")) and not any(image_files(path, limit=1)) else "folder"
    if not exists:
        raise FileNotFoundError(f"Source '{spec}' does not exist.")
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix.lower() in (".txt", ".csv", ".tsv", ".lst"):
        return "list"
    raise ValueError(f"Source '{spec}': give a folder of images, a .parquet file or folder, webdataset .tar "
                     f"shards (name{{000..009}}.tar) or a .txt/.csv list of paths.")


def _unusable_path(spec: str, exc: OSError) -> str:
    shown = spec if len(spec) <= 160 else f"{spec[:70]}...{spec[-70:]}"
    if exc.errno == errno.ENAMETOOLONG:
        return (f"Source '{shown}' ({len(os.fsencode(spec))} bytes): the path is longer than this system allows "
                f"(PATH_MAX {os.pathconf('/', 'PC_PATH_MAX')} bytes, {os.pathconf('/', 'PC_NAME_MAX')} per name): "
                f"move the folder higher up, or run the job from inside it and give a relative path.")
    return f"Source '{shown}' cannot be read: {exc.strerror or exc}."


def check(spec: str, options: SourceOptions | None = None) -> str:
    """Raise the error a source would stop with (it does not exist; a column it needs is not there; a folder
    that cannot be listed), before a job creates anything; returns the source's kind. Reads headers only."""
    options = options or SourceOptions()
    kind = describe(spec)
    if kind == "parquet":
        files = _parquet_files(Path(spec))
        readable = [file for file in files if _parquet_names(file) is not None]
        # one unreadable file among readable ones is reported as skipped (by _parquet); alone, it is the error
        for file in readable if readable and len(files) > 1 else files:
            _parquet_columns(file, options)
    elif kind == "webdataset":
        _shards(spec)
    elif kind == "folder":
        try:
            with os.scandir(spec):
                pass
        except OSError as exc:
            raise PermissionError(f"Source folder '{spec}' cannot be listed ({exc.strerror}): make it readable "
                                  f"by this user.") from None
    elif kind == "list" and Path(spec).suffix.lower() in (".csv", ".tsv") and Path(spec).is_file():
        # a regular file only: a list may come through a pipe (a FIFO, <(find ...)), which can be read once
        with _open_text(Path(spec)) as f, _csv_field_limit():
            _csv_columns(Path(spec), _csv_header(Path(spec), csv.DictReader(f, delimiter=_delimiter(Path(spec)))),
                         options)
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
    return _hashed(items, max_bytes, options) if options.hash_ids or options.checksum else items


def _hashed(items: Iterator[Item], max_bytes: int, options: SourceOptions) -> Iterator[Item]:
    """The SHA-1 of each item's image bytes as its id (``hash_ids``) and/or its ``sha1`` metadata field
    (``checksum``: what ``--sync --checksum`` compares)."""
    for item in items:
        data = item.data
        if item.problem is None and data is None and item.path:
            try:
                data = read_file(item.path, max_bytes)
            except OSError:
                yield item  # the decoder reports why it cannot be read
                continue
        if data is not None:
            digest = hashlib.sha1(data).hexdigest()
            if options.hash_ids:
                item.id = digest
            if options.checksum:
                item.metadata = {**item.metadata, "sha1": digest}
        yield item


@dataclass(frozen=True)
class FolderEntry:
    """An image file under a folder source, or a subfolder that cannot be listed (``problem`` says why)."""

    path: Path
    problem: str | None = None


def folder_entries(root: Path) -> Iterator[FolderEntry]:
    """Image files under ``root`` (hidden folders and files skipped) in the fixed order a job numbers (sorted
    by path), and each subfolder that cannot be listed, in its place, with the reason.

    Every entry that is not a folder and has an image suffix is an image file here, a FIFO, socket or device
    too, so that the decoder reports each (without opening it); files without an image suffix are sniffed only
    when they are regular files. Symlinks to folders are not followed (as ``Path.rglob``).
    """
    yield from _walk(root, root)


def _walk(folder: Path, root: Path) -> Iterator[FolderEntry]:
    try:
        with os.scandir(folder) as listing:
            entries = sorted((e for e in listing if not e.name.startswith(".")), key=lambda e: e.name)
    except OSError as exc:
        if folder == root:
            raise
        yield FolderEntry(folder, f"unreadable folder: {exc.strerror or one_line(exc)}; the images in it are not "
                                  f"indexed (make it readable, then add them with --append)")
        return
    for entry in entries:
        path = folder / entry.name
        try:
            is_folder = entry.is_dir(follow_symlinks=False)
        except OSError:
            is_folder = False
        if is_folder:
            yield from _walk(path, root)
        elif looks_like_image(path):
            yield FolderEntry(path)


def image_files(root: Path, limit: int | None = None) -> Iterator[Path]:
    """The image files of :func:`folder_entries` (subfolders that cannot be listed left out)."""
    count = 0
    for entry in folder_entries(root):
        if entry.problem is None:
            yield entry.path
            count += 1
            if limit and count >= limit:
                return


def _folder(spec: str, options: SourceOptions, max_bytes: int) -> Iterator[Item]:
    """Every image under the folder; a caption file beside an image (``photo.jpg`` + ``photo.txt``, the usual
    sidecar) is its caption."""
    root = Path(spec)
    for entry in folder_entries(root):
        path = entry.path
        item = Item(id=printable(path.relative_to(root).as_posix()), source=file_source(str(path.absolute())),
                    path=str(path))
        if entry.problem:
            item.path, item.problem = None, entry.problem
        else:
            item.caption = _sidecar_caption(path)
            item.metadata = file_metadata(path, root)
        yield item


def file_metadata(path: Path, root: Path) -> dict[str, Any]:
    """A folder source's metadata of one file: ``folder`` (its folder relative to the source and every folder
    above it, so that ``folder=Pets`` keeps ``Pets/cat.jpg`` and ``Pets/Cats/tom.jpg``; ``.`` for the source's
    own files), ``size`` in bytes and ``modified`` (UTC, ISO 8601 to the second, so date filters and
    :mod:`indexer.sync`'s change check both read it). A file that cannot be stat'ed gets ``folder`` only: the
    decoder reports it."""
    parts = path.relative_to(root).parts[:-1]
    metadata: dict[str, Any] = {"folder": ["/".join(printable(p) for p in parts[: i + 1])
                                           for i in range(len(parts))] or ["."]}
    try:
        stat = path.stat()
    except OSError:
        return metadata
    modified = datetime.datetime.fromtimestamp(int(stat.st_mtime), datetime.UTC)
    return {**metadata, "size": int(stat.st_size), "modified": modified.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _sidecar_caption(image: Path) -> str:
    sidecar = image.with_suffix(".txt")
    try:
        return printable(read_file(sidecar, MAX_CAPTION_BYTES).decode("utf-8", "replace").strip())
    except OSError:  # none, unreadable, a FIFO, too long: no caption
        return ""


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


def _stored(location: str) -> str:
    """The stored source of a list's or a table's entry: a local path as :func:`file_source` stores it, a URL as
    it is."""
    return location if "://" in location else file_source(location)


# ---------------------------------------------------------------------------------------------- parquet


def _parquet_files(path: Path) -> list[Path]:
    return sorted(path.glob("*.parquet")) if path.is_dir() else [path]


@dataclass
class _Columns:
    path: str | None
    data: str | None
    caption: str | None
    wanted: list[str]


@contextlib.contextmanager
def _open_parquet(file: Path) -> Iterator[Any]:
    """A ``pyarrow.parquet.ParquetFile`` of ``file``, closed after. A name that is not UTF-8 (pyarrow's own
    file system takes UTF-8 paths only) is opened by Python and handed over as a file object."""
    import pyarrow.parquet as pq

    if printable(str(file)) == str(file):
        parquet = pq.ParquetFile(file)
        try:
            yield parquet
        finally:
            parquet.close()
        return
    with open(file, "rb") as f:
        yield pq.ParquetFile(f)


def _parquet_schema_names(file: Path) -> list[str]:
    """The column names of a parquet file, or a ValueError naming it when its footer cannot be read."""
    try:
        with _open_parquet(file) as parquet:
            return parquet.schema_arrow.names
    except Exception as exc:  # pyarrow's ArrowInvalid / OSError for a file that is not parquet
        raise ValueError(f"{printable(str(file))} is not a readable parquet file ({one_line(exc)}).") from None


def _parquet_names(file: Path) -> list[str] | None:
    try:
        return _parquet_schema_names(file)
    except ValueError:
        return None


def _parquet_columns(file: Path, options: SourceOptions) -> _Columns:
    names = _parquet_schema_names(file)
    file = Path(printable(str(file)))  # as it is named in the errors below
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
    """Rows in file order, row group by row group: a row group that cannot be decoded (a corrupt page, a
    damaged column chunk) is one skipped item naming the file, the group and its rows, and the next group is
    read; a file whose footer cannot be read (in a folder of parquet files) is one skipped item."""
    for file in _parquet_files(Path(spec)):
        shown = printable(str(file))
        try:
            _parquet_schema_names(file)
        except ValueError as exc:  # check() let it through: one of several files (or unreadable since)
            yield Item(id=printable(f"{file.name}#file"), source=shown, problem=f"{exc} Its rows are skipped.")
            continue
        columns = _parquet_columns(file, options)  # a column it was told to use and is not there: an error
        with _open_parquet(file) as parquet:
            groups = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
            row = 0
            for group, rows in enumerate(groups):
                batches = parquet.iter_batches(batch_size=1024, row_groups=[group], columns=columns.wanted)
                end = row + rows
                while True:
                    try:
                        records = next(batches).to_pylist()
                    except StopIteration:
                        break
                    except Exception as exc:  # pyarrow: "Couldn't deserialize thrift", a bad page or checksum
                        yield Item(id=printable(f"{file.name}#row-group={group}"),
                                   source=f"{shown}#row-group={group}", problem=(
                                       f"corrupt parquet row group {group} of {shown} (rows {row} to {end - 1}): "
                                       f"{one_line(exc)}; the file's other row groups are read"))
                        break
                    for record in records:
                        yield _parquet_item(record, file, row, columns, options)
                        row += 1
                row = end


def _parquet_item(record: dict, file: Path, row: int, columns: _Columns, options: SourceOptions) -> Item:
    location = record.get(columns.path) if columns.path else None
    where = printable(f"{file}#row={row}")
    path = _absolute(str(location)) if location else None
    source = _stored(path) if path else where
    data, problem = _cell_bytes(record.get(columns.data), columns.data) if columns.data else (None, None)
    if columns.data and data is None and problem is None and not location:
        problem = f"no image: the '{columns.data}' cell is empty"
    doc_id = record.get(options.id_column) if options.id_column else location or printable(f"{file.name}:{row}")
    if doc_id is None or str(doc_id).strip() == "":
        doc_id, problem = where, f"missing id: the '{options.id_column}' cell is empty"
    return Item(id=str(doc_id), source=source, path=path, data=data,
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
    # extension -> (member name, its bytes, the size of one too large, or why it is not read)
    group: dict[str, tuple[str, bytes | int | str]] = {}
    key, members, damage = None, 0, None
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                kind = _special_member(member)
                if member.isfile() or kind:
                    member_key, _, ext = _split_key(member.name)
                    if key is not None and member_key != key:
                        yield _wds_item(shard, key, group, max_bytes)
                        group = {}
                    key = member_key
                    group[ext.lower()] = (member.name, kind or (member.size if member.size > max_bytes
                                                                else tar.extractfile(member).read()))  # type: ignore[union-attr]
                members += 1
            damage = _end_of_archive_missing(tar)
    except MemoryError:
        raise
    except Exception as exc:  # tarfile.ReadError, EOFError, OSError, a compression library's error
        damage = one_line(exc)
    if key is not None and (damage is None or any(f".{e}" in IMAGE_SUFFIXES and isinstance(v, bytes)
                                                  for e, (_, v) in group.items())):
        yield _wds_item(shard, key, group, max_bytes)
    if damage is not None:
        yield Item(id=printable(f"{Path(shard).name}#{members}"), source=file_source(shard), problem=(
            f"corrupt or truncated tar: unreadable after {members} member(s) ({damage}); the rest of this shard "
            f"is skipped"))


def _special_member(member: tarfile.TarInfo) -> str | None:
    """Why a member named like an image is not read (a link, a device, a FIFO: never followed), or None."""
    if member.isfile() or member.isdir() or Path(member.name).suffix.lower() not in IMAGE_SUFFIXES:
        return None
    kind = "a symlink" if member.issym() else "a hard link" if member.islnk() else "a device or FIFO"
    return f"not a regular file ({kind} in the tar; links are not followed)"


def _end_of_archive_missing(tar: tarfile.TarFile) -> str | None:
    """Python's tarfile ends its iteration in silence at a cut or damaged header past the first one; a whole
    archive has a zero block (its end marker) there. Read through the archive's own file object, so that a
    compressed archive is checked at its uncompressed offset."""
    offset = tar.offset
    tar.fileobj.seek(offset)  # type: ignore[union-attr]
    block = tar.fileobj.read(tarfile.BLOCKSIZE)  # type: ignore[union-attr]
    if len(block) < tarfile.BLOCKSIZE:
        return "the archive ends inside a header, without its end-of-archive marker"
    if block.count(0) != tarfile.BLOCKSIZE:
        return f"a damaged member header at byte {offset}"
    return None


def _split_key(name: str) -> tuple[str, str, str]:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), dot, ext


def _wds_item(shard: str, key: str, group: dict[str, tuple[str, bytes | int | str]], max_bytes: int) -> Item:
    item = Item(id=printable(f"{Path(shard).name}/{key}"), source=member_source(shard, key))
    image_ext = next((e for e in group if f".{e}" in IMAGE_SUFFIXES), None)
    if image_ext is None:
        found = ", ".join(f".{e}" for e in group) or "none"
        item.problem = f"no image member for this key (members: {found})"
        return item
    name, image = group[image_ext]
    item.source = member_source(shard, name)  # the member's own name: what the service looks up again
    if isinstance(image, str | int):
        item.problem = image if isinstance(image, str) else str(too_large(image, max_bytes))
        return item
    item.data = image
    item.caption = printable(_text(group.get("txt", ("", None))[1]).strip())
    item.metadata = _json_metadata(group.get("json", ("", None))[1])
    return item


def _text(value: bytes | int | str | None) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else ""


def _json_metadata(value: bytes | int | str | None) -> dict[str, Any]:
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
                yield Item(id=location, source=_stored(_absolute(location)), path=_absolute(location))


@contextlib.contextmanager
def _csv_field_limit() -> Iterator[None]:
    """Python's csv module refuses a field over 128 KiB (a long caption is longer); ``CSV_FIELD_LIMIT`` while
    a CSV source is read (the limit is process-wide: it is put back after)."""
    before = csv.field_size_limit(CSV_FIELD_LIMIT)
    try:
        yield
    finally:
        csv.field_size_limit(before)


def _csv_header(path: Path, reader: csv.DictReader) -> list[str]:
    try:
        return list(reader.fieldnames or [])
    except csv.Error as exc:
        raise ValueError(f"{path}: its header line cannot be read ({exc}); fix the first line of the file.") from None


def _csv(path: Path, options: SourceOptions) -> Iterator[Item]:
    """Rows of a CSV/TSV list; a record the csv module cannot parse (a field over ``CSV_FIELD_LIMIT``, a quote
    where none may be) is one skipped item naming the file and the record, and the next line is read."""
    with _open_text(path) as f, _csv_field_limit():
        reader = csv.DictReader(f, delimiter=_delimiter(path))
        path_col, caption_col = _csv_columns(path, _csv_header(path, reader), options)
        line = 1  # records numbered from the header's 1 (a record's line when none spans lines), as ids have been
        while True:
            line += 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield Item(id=printable(f"{path.name}:{line}"), source=printable(f"{path}#line={line}"), problem=(
                    f"unreadable CSV line {line} of {printable(str(path))}: {exc}; the next line is read"))
                continue
            location = (row.get(path_col) or "").strip()
            doc_id = row.get(options.id_column) if options.id_column else location
            item = Item(id=doc_id or f"{path.name}:{line}", source=_stored(_absolute(location)) if location else
                        f"{path}#line={line}", path=_absolute(location) if location else None,
                        caption=(row.get(caption_col) or "") if caption_col else "",
                        metadata={c: row.get(c) for c in options.metadata_columns})
            if not location:
                item.problem = f"no image: the '{path_col}' cell is empty"
            elif not doc_id:
                item.problem = f"missing id: the '{options.id_column}' cell is empty"
            yield item
