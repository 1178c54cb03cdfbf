"""Per-shard feature store: each document's stored fields and its small fp16 "local features".

Why this module exists: search results must show a document's source, size and caption, and the training-free
rerankers need a few projected image-patch vectors per document. Both are read from here, so neither a search
nor a rerank ever reopens an image file.

Format 2 (written since issue 18; why: every read is a memory-mapped gather, not a decode). Files, named after
the store's main file ``<stem>.arrow`` (``features.arrow`` in a shard, layout.FEATURES_FILE)::

    <stem>.arrow                  uncompressed Arrow IPC file: id, source, width, height, caption, metadata
                                  (JSON text), has_local, has_local_positions; record batches of ``batch_size``
    <stem>.local.npy              (N, m, D) float16 local features, zeros where a row has none
    <stem>.local_positions.npy    (N, m, 2) float16 patch centres (x, y) in [0, 1], zeros where a row has none

Opening memory-maps all three (``pa.memory_map`` + ``ipc.open_file().read_all()`` is zero-copy, the arrays are
``np.load(mmap_mode="r")``), so opening costs the id -> row map and nothing of the file sizes; ``local_features``
for the reranker's top 100 is one fancy-indexing gather (~0.1 ms instead of ~11 ms of parquet decoding) and the
stored fields of 10 hits are a few zero-copy slices. The operating system's page cache holds what is hot.

Format 1 (one ``features.parquet`` per shard, layout.LEGACY_FEATURES_FILE: the fields plus ``local`` and
``local_positions`` fixed-size-list columns) is still read, by :class:`_ParquetStore` behind the same
:meth:`FeatureStore.open`, so an index built before format 2 keeps working (appends to it write format 2 shards
beside its format 1 ones); nothing writes format 1 any more.

Invariants (both formats):
- Row ``i`` is row ``i`` of the shard's dense FAISS index: the ``i``-th record written.
- ``m`` and ``D`` live in the schema metadata under ``b"stair_search"`` (with the format version), so readers
  reshape without guessing; a row stored without local features reads back as zeros from ``local_features``
  (which add nothing to a max-similarity score) and as None from ``rows``.
- Writing is atomic (stair_search.atomic) per file; the arrays are published before the Arrow file, and a
  reader refuses arrays whose shape does not match the Arrow file (a crash between two renames of an in-place
  rewrite; shards themselves are always built in a fresh folder and published whole).

Thread safety: format 2 reads only immutable memory-mapped data (Arrow tables and read-only numpy maps), so
they take no lock; ``close`` drops the store's references (reads already under way keep the maps alive until
they finish; later reads raise ValueError). Format 1 keeps one ``pyarrow.parquet.ParquetFile`` open (re-parsing
the footer on every call would cost more than the reads) and serialises reads through a lock, because the parquet
reader is not documented as safe for concurrent use. Independent stores on the same files share no state.
"""

from __future__ import annotations

import contextlib
import errno
import json
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stair_search.atomic import atomic_path
from stair_search.index.files import DamagedIndexError
from stair_search.index.layout import FEATURES_FILE, LEGACY_FEATURES_FILE

FORMAT_VERSION = 2
LEGACY_FORMAT_VERSION = 1  # features.parquet: read, never written
SCHEMA_KEY = b"stair_search"
FIELD_COLUMNS = ("id", "source", "width", "height", "caption", "metadata")
LOCAL_COLUMNS = ("local", "local_positions")
COLUMNS = (*FIELD_COLUMNS, *LOCAL_COLUMNS)
PRESENT_COLUMNS = {"local": "has_local", "local_positions": "has_local_positions"}  # format 2: is the row's set
ARRAY_SUFFIXES = {"local": ".local.npy", "local_positions": ".local_positions.npy"}
ARROW_MAGIC, PARQUET_MAGIC = b"ARROW1", b"PAR1"
# Up to this many rows, stored fields are gathered as one-row zero-copy slices of their record batches (~10 us a
# row); beyond it one Arrow ``take`` over the whole table, whose fixed cost (~0.4 ms on 20,000 rows) then wins.
SLICE_ROWS = 32


@dataclass
class FeatureRecord:
    """One document as stored in a shard: what a search result shows plus the reranker's local features."""

    id: str
    source: str  # path or URI of the original image
    width: int
    height: int
    caption: str = ""
    metadata: dict = field(default_factory=dict)  # JSON-serialisable; stored as a JSON string column
    local: np.ndarray | None = None  # (m, D) float16 local features
    local_positions: np.ndarray | None = None  # (m, 2) float16 patch centres (x, y) in [0, 1]


def array_paths(path: str | Path) -> dict[str, Path]:
    """The .npy files of the format 2 store whose main file is ``path``: ``x.arrow`` -> ``x.local.npy``, ..."""
    path = Path(path)
    return {name: path.with_name(path.stem + suffix) for name, suffix in ARRAY_SUFFIXES.items()}


def store_path(folder: str | Path) -> Path:
    """A shard folder's store: ``features.arrow``, or ``features.parquet`` in a shard written before format 2
    (``features.arrow`` when the folder has neither, so that errors name the current file)."""
    folder = Path(folder)
    legacy = folder / LEGACY_FEATURES_FILE
    return legacy if legacy.exists() and not (folder / FEATURES_FILE).exists() else folder / FEATURES_FILE


def store_files(path: str | Path) -> list[Path]:
    """Every file the store at ``path`` consists of: a format 1 parquet alone, or format 2's three files."""
    path = Path(path)
    return [path] if _sniff(path) == "parquet" else [path, *array_paths(path).values()]


def _sniff(path: Path) -> str | None:
    """"arrow", "parquet" or None (missing, unreadable or neither), from the file's leading magic bytes."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(ARROW_MAGIC))
    except OSError:
        return None
    if head.startswith(ARROW_MAGIC):
        return "arrow"
    return "parquet" if head.startswith(PARQUET_MAGIC) else None


# --------------------------------------------------------------------------------------------------- writing


def write_features(path: str | Path, records: Sequence[FeatureRecord], batch_size: int = 1024) -> None:
    """Write ``records`` as a format 2 store whose main file is ``path`` (its arrays beside it), atomically.

    Ids and local-feature shapes are validated before anything touches the disk. Fields are encoded one record
    batch at a time and local features go straight into memory-mapped .npy files, so a large shard is never held
    twice in memory; if anything fails mid-way (e.g. metadata JSON cannot hold), every temporary file is removed
    and an existing store at ``path`` is left exactly as it was. Local arrays of another float dtype are cast to
    float16, the storage format.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    path = Path(path)
    _check_ids(records)
    num_local, dim = _local_shape(records)
    schema = _schema(num_local, dim)
    shapes = {"local": (num_local, dim), "local_positions": (num_local, 2)}
    with contextlib.ExitStack() as publish:
        main = publish.enter_context(atomic_path(path))  # entered first, so renamed last (after the arrays)
        tmps = {name: publish.enter_context(atomic_path(p)) for name, p in array_paths(path).items()}
        arrays = {name: np.lib.format.open_memmap(tmps[name], mode="w+", dtype=np.float16,
                                                  shape=(len(records), *shapes[name])) for name in LOCAL_COLUMNS}
        with pa.OSFile(str(main), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            for start in range(0, len(records), batch_size):
                writer.write_batch(_batch(records[start : start + batch_size], start, schema, arrays))
        for array in arrays.values():
            array.flush()
        del arrays  # unmapped before the files are synced and renamed


def _check_ids(records: Sequence[FeatureRecord]) -> None:
    """Ids must be non-empty strings and unique: the id -> row map of the read side depends on it."""
    seen: set[str] = set()
    for record in records:
        if not isinstance(record.id, str) or not record.id:
            raise ValueError(f"record ids must be non-empty strings, got {record.id!r} (source {record.source!r})")
        if record.id in seen:
            raise ValueError(f"duplicate record id {record.id!r}")
        seen.add(record.id)


def _local_shape(records: Sequence[FeatureRecord]) -> tuple[int, int]:
    """The (m, D) shared by every record's local features; (0, 0) when no record has any.

    One shape per store keeps the arrays rectangular, so a batch of rows is one (n, m, D) gather.
    """
    shape: tuple[int, int] | None = None
    for record in records:
        if record.local is None:
            if record.local_positions is not None:
                raise ValueError(f"record {record.id!r} has local_positions but no local features")
            continue
        local = np.asarray(record.local)
        if local.ndim != 2:
            raise ValueError(f"local features of {record.id!r} must be 2-d (m, D), got shape {local.shape}")
        if shape is None:
            shape = (int(local.shape[0]), int(local.shape[1]))
        elif local.shape != shape:
            raise ValueError(f"local features of {record.id!r} have shape {local.shape}, expected {shape}")
        _check_positions(record, shape[0])
    return shape or (0, 0)


def _check_positions(record: FeatureRecord, num_local: int) -> None:
    """Positions, when given, must describe exactly the record's m patches."""
    if record.local_positions is None:
        return
    positions = np.asarray(record.local_positions)
    if positions.shape != (num_local, 2):
        raise ValueError(f"local_positions of {record.id!r} have shape {positions.shape}, expected {(num_local, 2)}")


def _schema(num_local: int, dim: int) -> pa.Schema:
    """The Arrow file's schema; m and D go in the metadata so readers know the arrays' shapes."""
    meta = {"format": FORMAT_VERSION, "num_local": num_local, "dim": dim}
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("caption", pa.string()),
            pa.field("metadata", pa.string()),
            pa.field(PRESENT_COLUMNS["local"], pa.bool_(), nullable=False),
            pa.field(PRESENT_COLUMNS["local_positions"], pa.bool_(), nullable=False),
        ],
        metadata={SCHEMA_KEY: json.dumps(meta).encode()},
    )


def _batch(chunk: Sequence[FeatureRecord], start: int, schema: pa.Schema,
           arrays: dict[str, np.ndarray]) -> pa.RecordBatch:
    """One record batch of fields; the chunk's local features are written into ``arrays`` (rows left zero)."""
    present = {}
    for name in LOCAL_COLUMNS:
        values = [getattr(r, name) for r in chunk]
        present[name] = [v is not None for v in values]
        for i, value in enumerate(values):
            if value is not None:
                arrays[name][start + i] = np.asarray(value, dtype=np.float16)
    columns = {
        "id": pa.array([r.id for r in chunk], pa.string()),
        "source": pa.array([r.source for r in chunk], pa.string()),
        "width": pa.array([r.width for r in chunk], pa.int32()),
        "height": pa.array([r.height for r in chunk], pa.int32()),
        "caption": pa.array([r.caption for r in chunk], pa.string()),
        "metadata": pa.array([_metadata_json(r) for r in chunk], pa.string()),
        **{PRESENT_COLUMNS[name]: pa.array(present[name], pa.bool_()) for name in LOCAL_COLUMNS},
    }
    return pa.record_batch(columns, schema=schema)


def _metadata_json(record: FeatureRecord) -> str:
    """Strict JSON (no NaN) so any reader, not only Python's, can parse it; the error names the record."""
    try:
        return json.dumps(record.metadata, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata of record {record.id!r} is not JSON-serialisable: {exc}") from exc


# --------------------------------------------------------------------------------------------------- reading

Locals = dict[str, tuple[np.ndarray, np.ndarray]]  # local column -> (values (n, m, D|2) float16, present (n,))


class FeatureStore:
    """Read side of one shard's feature store (either format; :meth:`open` picks the class).

    Opening reads only the ids, to build the id -> row map. Lookups touch only the requested rows (format 2) or
    the row groups that hold them (format 1) and keep nothing once they return.
    """

    def __init__(self, path: Path, ids: list[str], num_local: int, dim: int) -> None:
        """Use :meth:`open`; subclasses pass what they validated."""
        self._path = path
        self._num_local = num_local
        self._dim = dim
        self._ids = ids
        self._row_of = {doc_id: row for row, doc_id in enumerate(ids)}

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a store written by :func:`write_features` (or a format 1 parquet); anything else: ValueError."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, f"feature store not found: {path}", str(path))
        kind = _sniff(path)
        if kind == "arrow":
            return _MappedStore.load(path)
        if kind == "parquet":
            return _ParquetStore.load(path)
        raise DamagedIndexError(f"{path} is not a feature store: neither an Arrow IPC file (format 2) nor parquet "
                                f"(format 1)")

    # -------------------------------------------------------------------------------------- small accessors

    def __len__(self) -> int:
        return len(self._ids)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the files; the store cannot read afterwards."""

    @property
    def path(self) -> Path:
        return self._path

    @property
    def ids(self) -> list[str]:
        """All ids in row order (a copy, so callers cannot corrupt the id -> row map)."""
        return list(self._ids)

    @property
    def num_local(self) -> int:
        """m, the number of local feature vectors per document (0 if the shard has none)."""
        return self._num_local

    @property
    def dim(self) -> int:
        """D, the dimension of each local feature vector (0 if the shard has none)."""
        return self._dim

    def row_of(self, doc_id: str) -> int | None:
        """Row of ``doc_id`` in this shard (= its FAISS row), or None if the shard does not hold it."""
        return self._row_of.get(doc_id)

    # ---------------------------------------------------------------------------------------------- lookups

    def rows(self, rows: Sequence[int], columns: Sequence[str] | None = None) -> list[dict]:
        """Records of ``rows`` as dicts, in the requested order (repeats allowed).

        ``columns`` limits both what is read and the keys returned (default: all). ``metadata`` comes back
        parsed; ``local`` as float16 ``(m, D)`` and ``local_positions`` as float16 ``(m, 2)``, or None.
        Negative rows are out of range (no Python-style wrap-around): a FAISS -1 must not become the last row.
        """
        wanted = self._check_columns(columns)
        indices = self._check_rows(rows)
        fields = [name for name in wanted if name in FIELD_COLUMNS]
        local_names = [name for name in wanted if name in LOCAL_COLUMNS]
        decoded: dict[str, list[Any]] = {}
        if fields:
            table = self._fields(indices, fields)
            decoded.update((name, _decode_field(name, table.column(name))) for name in fields)
        for name, (values, present) in (self._locals(indices, local_names) if local_names else {}).items():
            decoded[name] = [values[i].copy() if present[i] else None for i in range(len(values))]
        return [{name: decoded[name][i] for name in wanted} for i in range(len(indices))]

    def get(self, doc_ids: Sequence[str], columns: Sequence[str] | None = None) -> list[dict | None]:
        """Like :meth:`rows` but by id; None in place of an id this shard does not hold."""
        found = [self._row_of.get(doc_id) for doc_id in doc_ids]
        records = iter(self.rows([row for row in found if row is not None], columns))
        return [None if row is None else next(records) for row in found]

    def local_features(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Local features ``(n, m, D)`` and patch centres ``(n, m, 2)``, float16, for ``rows`` in order.

        A row stored without local features (or without positions) comes back as zeros, which add nothing to a
        max-similarity rerank score.
        """
        local = self._locals(self._check_rows(rows), list(LOCAL_COLUMNS))
        return local["local"][0], local["local_positions"][0]

    # --------------------------------------------------------------------------------- what a format reads

    def _fields(self, rows: np.ndarray, names: list[str]) -> pa.Table:
        """The stored-field columns ``names`` of ``rows``, in request order."""
        raise NotImplementedError

    def _locals(self, rows: np.ndarray, names: list[str]) -> Locals:
        """The local columns ``names`` of ``rows``, in request order, zeros where a row has none."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------- internals

    def _check_columns(self, columns: Sequence[str] | None) -> list[str]:
        if columns is None:
            return list(COLUMNS)
        wanted = list(dict.fromkeys(columns))
        unknown = [name for name in wanted if name not in COLUMNS]
        if unknown:
            raise ValueError(f"unknown columns {unknown}; the store has {list(COLUMNS)}")
        return wanted

    def _check_rows(self, rows: Sequence[int]) -> np.ndarray:
        """Rows as int64, rejecting non-integers and anything outside ``[0, len)``."""
        indices = np.fromiter((operator.index(row) for row in rows), dtype=np.int64)
        bad = indices[(indices < 0) | (indices >= len(self))]
        if bad.size:
            raise IndexError(f"row {int(bad[0])} out of range for a store of {len(self)} rows ({self._path})")
        return indices


@dataclass(frozen=True)
class _Mapped:
    """What a format 2 store reads from, all memory-mapped and immutable (swapped out whole by ``close``)."""

    table: pa.Table
    batches: list[pa.RecordBatch]
    starts: np.ndarray  # first row of each batch, plus the row count
    arrays: dict[str, np.ndarray]  # local column -> read-only (N, m, D|2) float16 map
    present: dict[str, np.ndarray]  # local column -> (N,) bool


class _MappedStore(FeatureStore):
    """Format 2: an Arrow IPC file and two .npy arrays, all memory-mapped; reads take no lock."""

    def __init__(self, path: Path, source: pa.MemoryMappedFile, mapped: _Mapped, num_local: int, dim: int) -> None:
        super().__init__(path, mapped.table.column("id").to_pylist(), num_local, dim)
        self._source: pa.MemoryMappedFile | None = source
        self._mapped: _Mapped | None = mapped

    @classmethod
    def load(cls, path: Path) -> _MappedStore:
        try:
            source = pa.memory_map(str(path), "r")
        except (pa.ArrowException, OSError) as exc:
            raise DamagedIndexError(f"{path} is not a readable Arrow IPC file: {exc}") from exc
        try:
            try:
                table = pa.ipc.open_file(source).read_all()  # zero-copy: the columns point into the map
            except (pa.ArrowException, OSError) as exc:
                raise DamagedIndexError(f"{path} is not a readable Arrow IPC file: {exc}") from exc
            names = [*FIELD_COLUMNS, *PRESENT_COLUMNS.values()]
            num_local, dim = _read_schema_meta(path, table.schema, FORMAT_VERSION, names)
            shapes = {"local": (num_local, dim), "local_positions": (num_local, 2)}
            arrays = {name: _load_array(file, (table.num_rows, *shapes[name]), path)
                      for name, file in array_paths(path).items()}
            batches = table.to_batches()
            starts = np.cumsum([0, *(batch.num_rows for batch in batches)], dtype=np.int64)
            present = {name: table.column(PRESENT_COLUMNS[name]).to_numpy() if table.num_rows
                       else np.zeros(0, dtype=bool) for name in LOCAL_COLUMNS}
            return cls(path, source, _Mapped(table, batches, starts, arrays, present), num_local, dim)
        except BaseException:
            source.close()
            raise

    def close(self) -> None:
        """Drop the maps (reads under way keep them alive until they return) and close the file handle."""
        source, self._source, self._mapped = self._source, None, None
        if source is not None:
            source.close()

    def _data(self) -> _Mapped:
        mapped = self._mapped  # one read of the attribute: a concurrent close cannot pull it away mid-call
        if mapped is None:
            raise ValueError(f"feature store {self._path} is closed")
        return mapped

    def _fields(self, rows: np.ndarray, names: list[str]) -> pa.Table:
        mapped = self._data()
        if len(rows) > SLICE_ROWS:
            return mapped.table.select(names).take(pa.array(rows, pa.int64()))
        if not len(rows):
            return mapped.table.schema.empty_table().select(names)
        batch = np.searchsorted(mapped.starts, rows, side="right") - 1
        offsets = rows - mapped.starts[batch]
        parts = [mapped.batches[b].slice(o, 1) for b, o in zip(batch.tolist(), offsets.tolist(), strict=True)]
        return pa.Table.from_batches(parts, mapped.table.schema).select(names).combine_chunks()  # to_pylist: fast

    def _locals(self, rows: np.ndarray, names: list[str]) -> Locals:
        mapped = self._data()
        return {name: (np.asarray(mapped.arrays[name][rows]), mapped.present[name][rows]) for name in names}


def _load_array(file: Path, shape: tuple[int, ...], store: Path) -> np.ndarray:
    """One of a store's .npy arrays, memory-mapped read-only and checked against the Arrow file's shape."""
    if not file.is_file():
        raise FileNotFoundError(errno.ENOENT, f"feature store {store} is missing its array file {file}", str(file))
    try:
        array = np.load(file, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ValueError(f"{file} (part of feature store {store}) is not a readable .npy file: {exc}") from exc
    if array.dtype != np.float16 or array.shape != shape:
        raise ValueError(f"{file} holds {array.dtype} {array.shape}, but its feature store {store} needs float16 "
                         f"{shape}: the files come from different writes. Rebuild the shard.")
    return array


class _ParquetStore(FeatureStore):
    """Format 1 (an index built before format 2): one parquet file, read a row group at a time under a lock."""

    def __init__(self, path: Path, parquet_file: pq.ParquetFile, num_local: int, dim: int) -> None:
        self._file = parquet_file
        self._lock = threading.Lock()
        sizes = [parquet_file.metadata.row_group(i).num_rows for i in range(parquet_file.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        ids = parquet_file.read(columns=["id"], use_threads=False).column("id").to_pylist()
        super().__init__(path, ids, num_local, dim)

    @classmethod
    def load(cls, path: Path) -> _ParquetStore:
        try:
            parquet_file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise DamagedIndexError(f"{path} is not a parquet file: {exc}") from exc
        try:
            num_local, dim = _read_schema_meta(path, parquet_file.schema_arrow, LEGACY_FORMAT_VERSION, COLUMNS)
            return cls(path, parquet_file, num_local, dim)
        except BaseException:
            parquet_file.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _fields(self, rows: np.ndarray, names: list[str]) -> pa.Table:
        return self._take(rows, names)

    def _locals(self, rows: np.ndarray, names: list[str]) -> Locals:
        table = self._take(rows, names)
        shapes = {"local": (self._num_local, self._dim), "local_positions": (self._num_local, 2)}
        out = {}
        for name in names:
            values, null = _fixed_list_numpy(table.column(name), shapes[name])
            out[name] = (values, ~null)
        return out

    def _take(self, rows: np.ndarray, columns: list[str]) -> pa.Table:
        """Decode just the row groups holding ``rows`` and pick the rows, in request order, from them."""
        groups = np.searchsorted(self._starts, rows, side="right") - 1
        needed = np.unique(groups)
        if needed.size == 0:
            return self._file.schema_arrow.empty_table().select(columns)
        with self._lock:
            table = self._file.read_row_groups(needed.tolist(), columns=columns, use_threads=False)
        sizes = self._starts[needed + 1] - self._starts[needed]
        offset_in_table = dict(zip(needed.tolist(), np.cumsum(sizes) - sizes, strict=True))
        positions = rows - self._starts[groups] + np.array([offset_in_table[g] for g in groups.tolist()])
        return table.take(pa.array(positions, pa.int64()))


def _read_schema_meta(path: Path, schema: pa.Schema, version: int, columns: Sequence[str]) -> tuple[int, int]:
    """(m, D) from our schema metadata; ValueError for a file that is not a feature store of ``version``."""
    raw = (schema.metadata or {}).get(SCHEMA_KEY)
    if raw is None:
        raise DamagedIndexError(f"{path} is not a stair_search feature store (no {SCHEMA_KEY.decode()!r} schema "
                                f"metadata)")
    try:
        meta = json.loads(raw)
        found, num_local, dim = meta["format"], int(meta["num_local"]), int(meta["dim"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DamagedIndexError(f"{path} has unreadable {SCHEMA_KEY.decode()!r} schema metadata: {raw!r}") from exc
    if found != version:
        raise DamagedIndexError(f"{path} has feature store format {found!r}; a file of this kind must be format "
                                f"{version}")
    missing = [name for name in columns if name not in schema.names]
    if missing:
        raise DamagedIndexError(f"{path} lacks the feature store columns {missing}")
    return num_local, dim


def _decode_field(name: str, column: pa.ChunkedArray) -> list[Any]:
    """Python values of one stored-field column, metadata JSON parsed."""
    values = column.to_pylist()
    if name == "metadata":
        return [None if text is None else json.loads(text) for text in values]
    return values


def _fixed_list_numpy(column: pa.ChunkedArray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A format 1 fixed-size-list float16 column as ``(n, *shape)`` float16 (nulls zeroed) plus its null mask."""
    array = column.combine_chunks()
    count, size = len(array), shape[0] * shape[1]
    null = array.is_null().to_numpy(zero_copy_only=False) if count else np.zeros(0, dtype=bool)
    if size == 0 or count == 0 or bool(null.all()):
        return np.zeros((count, *shape), dtype=np.float16), null
    flat = array.values.slice(array.offset * size, count * size).to_numpy(zero_copy_only=False)
    values = np.array(flat, dtype=np.float16).reshape(count, *shape)
    values[null] = 0
    return values, null
