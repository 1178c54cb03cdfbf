"""``stair-search export``: an index's documents and vectors as one parquet file (or the dense matrix as .npy).

What clip-retrieval users get from ``inference``: ids, sources, captions, metadata, image sizes, the dense embedding
and the sparse ``{word-piece: weight}`` vector of every live document, read back from the index rather than computed
again. The index is walked ``batch_size`` documents at a time (:meth:`IndexReader.live`) and each batch is written
before the next is read, so memory stays bounded however large the index is; the output appears under its
name only when complete (``atomic_path``). Dense vectors of an IVF-PQ index are its PQ approximation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stair_search.atomic import atomic_path
from stair_search.index.reader import IndexReader

FORMATS = ("parquet", "npy")
TEXT_FIELDS = ("id", "source", "caption")


def schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("source", pa.string()), ("caption", pa.string()),
                      ("metadata", pa.string()),  # JSON text, as stored
                      ("width", pa.int32()), ("height", pa.int32()),  # the image's size (0: unknown)
                      ("dense", pa.list_(pa.float32(), dim)),
                      ("sparse", pa.map_(pa.string(), pa.float32()))])


def export(index_dir: str | Path, out: str | Path, fmt: str = "parquet", batch_size: int = 4096) -> int:
    """Write every live document of the index to ``out``; returns how many were written."""
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {FORMATS}, got {fmt!r}")
    out = Path(out)
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a folder: give the file to write, e.g. {out / ('index.' + fmt)}")
    with IndexReader(index_dir) as index:
        return _npy(index, out, batch_size) if fmt == "npy" else _parquet(index, out, batch_size)


def _parquet(index: IndexReader, out: Path, batch_size: int) -> int:
    written = 0
    table_schema = schema(index.manifest.embed_dim)
    with atomic_path(out) as tmp, pq.ParquetWriter(tmp, table_schema) as writer:
        for batch in index.live(batch_size):
            rows = index.documents(batch, [*TEXT_FIELDS, "metadata", "width", "height"])
            columns = {name: [row[name] for row in rows] for name in (*TEXT_FIELDS, "width", "height")}
            columns["metadata"] = [json.dumps(row["metadata"] or {}, ensure_ascii=False) for row in rows]
            columns["dense"] = list(index.vectors(batch))
            columns["sparse"] = [list(vector.items()) for vector in index.sparse_vectors(batch)]
            writer.write_table(pa.table(columns, schema=table_schema))
            written += len(batch)
        if not written:  # an empty index still gives a readable file with the schema
            writer.write_table(table_schema.empty_table())
    return written


def _npy(index: IndexReader, out: Path, batch_size: int) -> int:
    """The (N, D) float32 dense matrix in ``IndexReader.ids()`` order, written into a memory-mapped .npy."""
    count, written = len(index), 0
    with atomic_path(out) as tmp:
        matrix = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(count, index.manifest.embed_dim))
        for batch in index.live(batch_size):
            matrix[written : written + len(batch)] = index.vectors(batch)
            written += len(batch)
        matrix.flush()
        del matrix
    return written
