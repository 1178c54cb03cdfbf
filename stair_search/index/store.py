"""Per-shard feature store: one parquet file of document metadata and small fp16 "local features".

Why this module exists: search results must show a document's source, size and caption, and the training-free
rerankers need a few projected image-patch vectors per document. Both are read from here, so neither a search
nor a rerank ever reopens an image file.

Layout and invariants:
- Row ``i`` of the parquet file is row ``i`` of the shard's dense FAISS index: the ``i``-th record written.
- ``local`` holds ``m * D`` float16 values per row as a ``fixed_size_list`` (null for a document without local
  features); ``local_positions`` holds ``m * 2`` float16 patch centres ``(x, y)`` in ``[0, 1]``. ``m`` and ``D``
  live in the schema metadata under ``b"stair_search"``, so readers reshape without guessing.
- Files are written in row groups of a fixed size. Readers map a row to its row group from the footer and
  decode only the row groups (and columns) that hold the requested rows; nothing big is cached.

Thread safety: a :class:`FeatureStore` keeps one ``pyarrow.parquet.ParquetFile`` open (re-parsing the footer on
every call would cost more than the reads themselves) and serialises reads through a lock, because the parquet
reader is not documented as safe for concurrent use. Independent stores on the same file do not share state.
"""

from __future__ import annotations

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

FORMAT_VERSION = 1
SCHEMA_KEY = b"stair_search"
COLUMNS = ("id", "source", "width", "height", "caption", "metadata", "local", "local_positions")
LOCAL_COLUMNS = ("local", "local_positions")


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


# --------------------------------------------------------------------------------------------------- writing


def write_features(path: str | Path, records: Sequence[FeatureRecord], row_group_size: int = 1024) -> None:
    """Write ``records`` to ``path`` atomically (stair_search.atomic).

    Ids and local-feature shapes are validated before anything touches the disk. Metadata is JSON-encoded
    one row group at a time (so a large shard is never held twice in memory); if that or anything else fails
    mid-way, the temporary file is removed and an existing file at ``path`` is left exactly as it was.
    Local arrays of another float dtype are cast to float16, the storage format.
    """
    if row_group_size < 1:
        raise ValueError(f"row_group_size must be >= 1, got {row_group_size}")
    path = Path(path)
    _check_ids(records)
    num_local, dim = _local_shape(records)
    schema = _schema(num_local, dim)
    with atomic_path(path) as tmp, pq.ParquetWriter(str(tmp), schema, **_writer_options()) as writer:
        for start in range(0, len(records), row_group_size):
            chunk = records[start : start + row_group_size]
            writer.write_table(_chunk_table(chunk, schema, num_local, dim), row_group_size=row_group_size)


def _writer_options() -> dict[str, Any]:
    """Plain, uncompressed encoding for the fp16 columns, which are what rerankers read on the hot path.

    Measured on random fp16 features (m=8, D=256, 1,024-row groups): dictionary encoding saves ~5% of the
    bytes but makes decoding a row group ~5x slower, and snappy saves nothing on plain fp16 while costing ~15%
    of the decode time. The small string columns keep the defaults (dictionary + snappy).
    """
    other = [name for name in COLUMNS if name not in LOCAL_COLUMNS]
    compression = {name: "snappy" for name in other} | {name: "none" for name in LOCAL_COLUMNS}
    return {"use_dictionary": other, "compression": compression}


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

    One shape per file keeps the column a fixed-size list, so a batch of rows reshapes to (n, m, D) for free.
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
    """The file schema; m and D go in the metadata so readers can reshape the flat lists."""
    meta = {"format": FORMAT_VERSION, "num_local": num_local, "dim": dim}
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("source", pa.string()),
            pa.field("width", pa.int32()),
            pa.field("height", pa.int32()),
            pa.field("caption", pa.string()),
            pa.field("metadata", pa.string()),
            pa.field("local", pa.list_(pa.float16(), num_local * dim)),
            pa.field("local_positions", pa.list_(pa.float16(), num_local * 2)),
        ],
        metadata={SCHEMA_KEY: json.dumps(meta).encode()},
    )


def _chunk_table(chunk: Sequence[FeatureRecord], schema: pa.Schema, num_local: int, dim: int) -> pa.Table:
    """One row group's worth of records as an Arrow table."""
    columns = {
        "id": pa.array([r.id for r in chunk], pa.string()),
        "source": pa.array([r.source for r in chunk], pa.string()),
        "width": pa.array([r.width for r in chunk], pa.int32()),
        "height": pa.array([r.height for r in chunk], pa.int32()),
        "caption": pa.array([r.caption for r in chunk], pa.string()),
        "metadata": pa.array([_metadata_json(r) for r in chunk], pa.string()),
        "local": _fixed_lists([r.local for r in chunk], num_local * dim),
        "local_positions": _fixed_lists([r.local_positions for r in chunk], num_local * 2),
    }
    return pa.table(columns, schema=schema)


def _metadata_json(record: FeatureRecord) -> str:
    """Strict JSON (no NaN) so any reader, not only Python's, can parse it; the error names the record."""
    try:
        return json.dumps(record.metadata, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"metadata of record {record.id!r} is not JSON-serialisable: {exc}") from exc


def _fixed_lists(arrays: list[np.ndarray | None], size: int) -> pa.FixedSizeListArray:
    """Flatten per-record arrays into a fixed-size-list column; None becomes a null row."""
    list_type = pa.list_(pa.float16(), size)
    if size == 0 or all(a is None for a in arrays):
        return pa.nulls(len(arrays), list_type)
    flat = np.zeros((len(arrays), size), dtype=np.float16)
    mask = np.zeros(len(arrays), dtype=bool)
    for i, array in enumerate(arrays):
        if array is None:
            mask[i] = True
        else:
            flat[i] = np.asarray(array, dtype=np.float16).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), type=list_type, mask=pa.array(mask))


# --------------------------------------------------------------------------------------------------- reading


class FeatureStore:
    """Read side of one shard's feature file.

    Opening reads only the ``id`` column to build the id -> row map. Row lookups decode only the row groups
    (and columns) that hold the requested rows, never the whole table, and keep nothing once they return.
    Reads are serialised by a per-store lock around the single open ``ParquetFile``.
    """

    def __init__(self, path: Path, parquet_file: pq.ParquetFile, num_local: int, dim: int) -> None:
        """Use :meth:`open`; this constructor trusts that the file was already validated."""
        self._path = path
        self._file = parquet_file
        self._lock = threading.Lock()
        self._num_local = num_local
        self._dim = dim
        sizes = [parquet_file.metadata.row_group(i).num_rows for i in range(parquet_file.num_row_groups)]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._ids: list[str] = parquet_file.read(columns=["id"], use_threads=False).column("id").to_pylist()
        self._row_of = {doc_id: row for row, doc_id in enumerate(self._ids)}

    @classmethod
    def open(cls, path: str | Path) -> FeatureStore:
        """Open a file written by :func:`write_features`; anything else is refused with ValueError."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(errno.ENOENT, f"feature store not found: {path}", str(path))
        try:
            parquet_file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as exc:
            raise ValueError(f"{path} is not a parquet file: {exc}") from exc
        try:
            num_local, dim = _read_schema_meta(path, parquet_file.schema_arrow)
            return cls(path, parquet_file, num_local, dim)
        except BaseException:
            parquet_file.close()
            raise

    # -------------------------------------------------------------------------------------- small accessors

    def __len__(self) -> int:
        return len(self._ids)

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the file handle; the store cannot read afterwards."""
        with self._lock:
            self._file.close()

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

        ``columns`` limits both what is decoded and the keys returned (default: all). ``metadata`` comes back
        parsed; ``local`` as float16 ``(m, D)`` and ``local_positions`` as float16 ``(m, 2)``, or None.
        Negative rows are out of range (no Python-style wrap-around): a FAISS -1 must not become the last row.
        """
        wanted = self._check_columns(columns)
        table = self._take(self._check_rows(rows), wanted)
        decoded = {name: _decode_column(name, table.column(name), self._num_local, self._dim) for name in wanted}
        return [{name: decoded[name][i] for name in wanted} for i in range(table.num_rows)]

    def get(self, doc_ids: Sequence[str], columns: Sequence[str] | None = None) -> list[dict | None]:
        """Like :meth:`rows` but by id; None in place of an id this shard does not hold."""
        found = [self._row_of.get(doc_id) for doc_id in doc_ids]
        records = iter(self.rows([row for row in found if row is not None], columns))
        return [None if row is None else next(records) for row in found]

    def local_features(self, rows: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Local features ``(n, m, D)`` and patch centres ``(n, m, 2)``, float16, for ``rows`` in order.

        Only the two local columns of the needed row groups are decoded. A row stored without local features
        (or without positions) comes back as zeros, which add nothing to a max-similarity rerank score.
        """
        table = self._take(self._check_rows(rows), list(LOCAL_COLUMNS))
        local, _ = _fixed_list_numpy(table.column("local"), (self._num_local, self._dim))
        positions, _ = _fixed_list_numpy(table.column("local_positions"), (self._num_local, 2))
        return local, positions

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


def _read_schema_meta(path: Path, schema: pa.Schema) -> tuple[int, int]:
    """(m, D) from our schema metadata; ValueError for a parquet file that is not a feature store."""
    raw = (schema.metadata or {}).get(SCHEMA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a stair_search feature store (no {SCHEMA_KEY.decode()!r} schema metadata)")
    try:
        meta = json.loads(raw)
        version, num_local, dim = meta["format"], int(meta["num_local"]), int(meta["dim"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path} has unreadable {SCHEMA_KEY.decode()!r} schema metadata: {raw!r}") from exc
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has feature store format {version!r}; this version reads {FORMAT_VERSION}")
    missing = [name for name in COLUMNS if name not in schema.names]
    if missing:
        raise ValueError(f"{path} lacks the feature store columns {missing}")
    return num_local, dim


def _decode_column(name: str, column: pa.ChunkedArray, num_local: int, dim: int) -> list[Any]:
    """Python values of one column: JSON parsed, local features as float16 arrays (None for null rows)."""
    if name in LOCAL_COLUMNS:
        shape = (num_local, dim) if name == "local" else (num_local, 2)
        values, null = _fixed_list_numpy(column, shape)
        return [None if null[i] else values[i].copy() for i in range(len(values))]
    values = column.to_pylist()
    if name == "metadata":
        return [None if text is None else json.loads(text) for text in values]
    return values


def _fixed_list_numpy(column: pa.ChunkedArray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A fixed-size-list float16 column as ``(n, *shape)`` float16 (nulls zeroed) plus its null mask."""
    array = column.combine_chunks()
    count, size = len(array), shape[0] * shape[1]
    null = array.is_null().to_numpy(zero_copy_only=False) if count else np.zeros(0, dtype=bool)
    if size == 0 or count == 0 or bool(null.all()):
        return np.zeros((count, *shape), dtype=np.float16), null
    flat = array.values.slice(array.offset * size, count * size).to_numpy(zero_copy_only=False)
    values = np.array(flat, dtype=np.float16).reshape(count, *shape)
    values[null] = 0
    return values, null
