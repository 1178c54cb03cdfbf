"""``skipped.parquet``: the items an indexing job could not index (id, source, reason), kept in the index."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stair_search.atomic import atomic_path
from stair_search.index.layout import SKIPPED_REPORT

Skip = tuple[str, str, str]  # (id, source, reason)
SKIPPED_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("reason", pa.string())])


def write_skipped_report(folder: Path, skipped: Sequence[Skip], merge: bool = False) -> Path | None:
    """``folder/skipped.parquet``; ``merge`` keeps the rows of earlier jobs (appends). None when nothing to say."""
    path = Path(folder) / SKIPPED_REPORT
    rows = [tuple(s) for s in skipped]
    if merge and path.is_file():
        old = pq.read_table(path).to_pylist()
        rows = list(dict.fromkeys([(r["id"], r["source"], r["reason"]) for r in old] + rows))
    if not rows:
        return None
    table = pa.table({name: [r[i] for r in rows] for i, name in enumerate(SKIPPED_SCHEMA.names)}, schema=SKIPPED_SCHEMA)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def read_skipped_report(folder: Path, first: int) -> tuple[int, list[Skip]]:
    """How many items ``folder/skipped.parquet`` lists and its ``first`` of them (0 and none without a report),
    read without loading a long report whole."""
    path = Path(folder) / SKIPPED_REPORT
    if not path.is_file():
        return 0, []
    report = pq.ParquetFile(path)
    rows: list[Skip] = []
    for batch in report.iter_batches(batch_size=max(1, first), columns=SKIPPED_SCHEMA.names):
        rows = [(r["id"], r["source"], r["reason"]) for r in batch.to_pylist()[:first]]
        break
    return report.metadata.num_rows, rows
