"""Bring your own embeddings: index CLIP embeddings that were computed elsewhere, without decoding an image.

Why: clip-retrieval (``clip-retrieval inference``) and LAION publish image embeddings beside row-aligned metadata,
and many teams keep a parquet of ids and vectors. Decoding and encoding those images again costs far more than
the index itself. The dense side of a document *is* its embedding, and the training-free sparse side
(models/concepts.py) is read off the dense one, so an index can be built from embeddings alone.

This module is only a source role of the ordinary job (indexer/job.py): it yields items whose encoding is already
done, and :func:`embedding_chunks` turns them into the same :class:`~indexer.journal.Chunk` s the image pipeline
spools, so the one writer, resuming after ``kill -9``, ``--append``, the mutation lock and the skipped report are
the job's, unchanged. Three layouts are read:

- a clip-retrieval / LAION folder: ``img_emb/img_emb_N.npy`` + ``metadata/metadata_N.parquet`` (row-aligned;
  ``image_path`` or ``url``, ``caption`` and other columns become the documents' source, caption and metadata);
- a parquet file or folder with an id column and a ``list<float>`` vector column;
- ``vectors.npy`` with its ids in ``vectors.txt`` (one a line) or row-aligned metadata in ``vectors.parquet``.

What ``stair-search export`` writes is the second layout with a ``sparse`` map column: its sparse vectors are
taken as they are (whatever model made them), so indexing an export gives the same index back.

The sparse vectors are concept vectors calibrated on an evenly spaced sample of the collection's own embeddings
(:func:`collection_bank`): the text tower embeds the concept words, the image tower never runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.journal import Chunk
from indexer.pipeline import ChunkBuilder
from indexer.sources import Item, SourceOptions, plain_metadata
from stair_search.images import file_source
from stair_search.models.concepts import (
    ConceptBank,
    calibrated,
    embed_concepts,
    load_concept_texts,
    save_concept_texts,
    texts_cache_name,
)
from stair_search.vectors import EncodedBatch

CALIBRATION_SAMPLE = 10_000  # embeddings of the collection that calibrate its concept vectors (evenly spaced)
NOT_FINITE = "embedding has NaN or infinite values"
ZERO = "embedding is all zeros"
PATH_COLUMNS = ("image_path", "url", "path", "source")  # clip-retrieval's folder inference, LAION, a plain table
ID_COLUMNS = ("id", "key")
CAPTION_COLUMNS = ("caption", "text")
VECTOR_COLUMNS = ("embedding", "vector", "img_emb", "emb")
CALIBRATED_ON = "collection embeddings"
SPARSE_COLUMN = "sparse"  # an export's {word-piece: weight} map column
_PART = re.compile(r"_(\d+)\.(npy|parquet)$")

__all__ = ["CALIBRATED_ON", "EmbeddingError", "EmbeddingSource", "check_embeddings_model", "collection_bank",
           "embedding_chunks", "open_source"]


class EmbeddingError(ValueError):
    """An embeddings source that cannot be indexed as given (one line: the file, what is wrong, the fix)."""


@dataclass(frozen=True)
class Part:
    """One row-aligned piece of the source: vectors (an .npy file, or a parquet column) and their table."""

    vectors: Path
    table: Path | None  # metadata parquet (None: ids from ``ids`` or the parquet itself)
    ids: Path | None = None  # a .txt id list (one a line)
    column: str | None = None  # the vector column when ``vectors`` is a parquet


@dataclass(frozen=True)
class EmbeddingSource:
    """A checked embeddings source: its parts in order, their row counts and the vectors' width."""

    spec: str
    parts: tuple[Part, ...]
    rows: tuple[int, ...]
    width: int
    options: SourceOptions
    sparse: bool = False  # every part has a ``sparse`` map column (an export): taken as is, no concept vectors

    @property
    def count(self) -> int:
        return sum(self.rows)

    def vectors(self, part: Part) -> np.ndarray:
        """(rows, width) float32 vectors of ``part`` (an .npy part memory-mapped)."""
        if part.column is None:
            return np.load(part.vectors, mmap_mode="r")
        import pyarrow.parquet as pq

        column = pq.read_table(part.vectors, columns=[part.column]).column(part.column).combine_chunks()
        return np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32).reshape(len(column), -1)

    def items(self, start: int = 0) -> Iterator[tuple[Item, np.ndarray | None, dict[str, float] | None]]:
        """Every row from position ``start`` on as an item (a ``problem`` when its vector is unusable), its unit
        float32 vector (None when unusable) and its given sparse vector (None unless the source has them)."""
        offset = 0
        for part, rows in zip(self.parts, self.rows, strict=True):
            if offset + rows > start:
                yield from self._part_items(part, max(0, start - offset))
            offset += rows

    def _part_items(self, part: Part, first: int
                    ) -> Iterator[tuple[Item, np.ndarray | None, dict[str, float] | None]]:
        vectors = self.vectors(part)
        records = _records(part)
        step = 4096
        for begin in range(first, len(vectors), step):
            block = np.asarray(vectors[begin : begin + step], np.float32)
            norms = np.linalg.norm(block, axis=1)
            for offset, (vector, norm) in enumerate(zip(block, norms, strict=True)):
                row = begin + offset
                problem = NOT_FINITE if not np.isfinite(norm) else ZERO if norm == 0 else None
                record = records[row]
                given = dict(record.pop(SPARSE_COLUMN) or ()) if self.sparse else None
                yield _item(record, part, row, self.options, problem), None if problem else vector / norm, given

    def sample(self, size: int = CALIBRATION_SAMPLE) -> np.ndarray:
        """Up to ``size`` usable unit vectors, evenly spaced over the whole collection (the same on every run)."""
        wanted = np.unique(np.linspace(0, self.count - 1, min(size, self.count)).round().astype(np.int64))
        chosen, offset = [], 0
        for part, rows in zip(self.parts, self.rows, strict=True):
            inside = wanted[(wanted >= offset) & (wanted < offset + rows)] - offset
            if len(inside):
                block = np.asarray(self.vectors(part)[inside], np.float64)
                norms = np.linalg.norm(block, axis=1)
                good = np.isfinite(norms) & (norms > 0)
                chosen.append(block[good] / norms[good, None])
            offset += rows
        return np.concatenate(chosen) if chosen else np.zeros((0, self.width))


# ---------------------------------------------------------------------------------------------- layouts


def open_source(spec: str | Path, options: SourceOptions | None = None,
                vector_column: str | None = None) -> EmbeddingSource:
    """The embeddings source at ``spec``, checked: its parts exist and every part's vectors and rows align (an
    :class:`EmbeddingError` of one line otherwise). Nothing but headers and shapes is read."""
    path, options = Path(spec), options or SourceOptions()
    if not path.exists():
        raise EmbeddingError(f"{spec}: no such file or folder; give a clip-retrieval/LAION folder (img_emb/ + "
                             f"metadata/), a parquet of ids and vectors, or a .npy with its ids")
    parts = _parts(path, vector_column)
    rows, widths = [], set()
    for part in parts:
        count, width = _shape(part)
        table_rows = _table_rows(part)
        if table_rows is not None and table_rows != count:
            raise EmbeddingError(f"{part.vectors} has {count} rows but {part.table or part.ids} has {table_rows}: "
                                 f"vectors and metadata must be row-aligned (regenerate or remove that part)")
        rows.append(count)
        widths.add(width)
    if len(widths) > 1:
        raise EmbeddingError(f"{spec}: parts have different widths {sorted(widths)}; every vector must come from "
                             f"the same model")
    return EmbeddingSource(str(spec), tuple(parts), tuple(rows), widths.pop(), options,
                           all(_has_sparse(part) for part in parts))


def check_embeddings_model(source: EmbeddingSource, encoder: Any, model: str) -> None:
    """One line when ``encoder``'s model cannot index these vectors: another width, or sparse vectors that only
    its trained heads can write (they need the images)."""
    width = int(encoder.record.embed_dim)
    if source.width != width:
        raise EmbeddingError(f"{source.spec}: the embeddings are {source.width}-wide but model {model} embeds "
                             f"{width}; index them with the model (and --pretrained tag) that computed them")
    if not source.sparse and encoder.sparse_source not in ("concepts", "none"):
        raise EmbeddingError(f"model {model} writes sparse vectors with trained heads on the images "
                             f"({encoder.sparse_source}), which embeddings cannot give; index embeddings with the "
                             f"open_clip model that computed them (its sparse vectors are concept vectors)")


def _parts(path: Path, vector_column: str | None) -> list[Part]:
    if path.is_dir() and (path / "img_emb").is_dir():
        return _clip_retrieval_parts(path)
    if path.suffix == ".npy":
        return [_npy_part(path)]
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".parquet" for f in files):
        raise EmbeddingError(f"{path}: not an embeddings source; give a folder with img_emb/ and metadata/ "
                             f"(clip-retrieval, LAION), a .parquet of ids and vectors, or a .npy with its ids")
    return [Part(f, None, column=_vector_column(f, vector_column)) for f in files]


def _has_sparse(part: Part) -> bool:
    if part.column is None:
        return False
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(part.vectors)
    return SPARSE_COLUMN in schema.names and pa.types.is_map(schema.field(SPARSE_COLUMN).type)


def _numbered(folder: Path, suffix: str) -> dict[int, Path]:
    return {int(m.group(1)): f for f in folder.glob(f"*{suffix}") if (m := _PART.search(f.name))}


def _clip_retrieval_parts(root: Path) -> list[Part]:
    vectors, tables = _numbered(root / "img_emb", ".npy"), _numbered(root / "metadata", ".parquet")
    if not vectors:
        raise EmbeddingError(f"{root / 'img_emb'} holds no img_emb_N.npy parts")
    missing = sorted(set(vectors) ^ set(tables))
    if missing:
        raise EmbeddingError(f"{root}: part {missing[0]} is in only one of img_emb/ and metadata/; each "
                             f"img_emb_N.npy needs its metadata_N.parquet (remove the unmatched part)")
    return [Part(vectors[n], tables[n]) for n in sorted(vectors)]


def _npy_part(path: Path) -> Part:
    for ids in (path.with_suffix(".txt"), path.with_suffix(".ids.txt")):
        if ids.is_file():
            return Part(path, None, ids=ids)
    if path.with_suffix(".parquet").is_file():
        return Part(path, path.with_suffix(".parquet"))
    raise EmbeddingError(f"{path}: no ids for these vectors; write them one a line to {path.with_suffix('.txt')} "
                         f"or as a row-aligned table to {path.with_suffix('.parquet')}")


def _vector_column(file: Path, wanted: str | None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(file)
    lists = [f.name for f in schema if pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
             or pa.types.is_large_list(f.type)]
    if wanted is not None:
        if wanted not in lists:
            raise EmbeddingError(f"{file}: no list<float> column {wanted!r} (list columns: {lists or 'none'})")
        return wanted
    named = [c for c in VECTOR_COLUMNS if c in lists]
    if named or len(lists) == 1:
        return (named or lists)[0]
    raise EmbeddingError(f"{file}: cannot tell the vector column among {lists or 'no list columns'}; name it with "
                         f"--vector-column")


def _shape(part: Part) -> tuple[int, int]:
    if part.column is None:
        try:
            array = np.load(part.vectors, mmap_mode="r")
        except (ValueError, OSError) as exc:
            raise EmbeddingError(f"{part.vectors}: not a readable .npy file ({exc}); regenerate it") from exc
        if array.ndim != 2:
            raise EmbeddingError(f"{part.vectors}: vectors must be a 2-d (rows, width) array, got shape "
                                 f"{array.shape}")
        return int(array.shape[0]), int(array.shape[1])
    import pyarrow.parquet as pq

    rows = pq.ParquetFile(part.vectors).metadata.num_rows
    first = pq.ParquetFile(part.vectors).read_row_group(0, columns=[part.column]).column(0) if rows else None
    width = len(first[0].as_py()) if first is not None and len(first) else 0
    return rows, width


def _table_rows(part: Part) -> int | None:
    if part.table is not None:
        import pyarrow.parquet as pq

        return pq.ParquetFile(part.table).metadata.num_rows
    if part.ids is not None:
        return len(part.ids.read_text(encoding="utf-8").splitlines())
    return None


# ---------------------------------------------------------------------------------------------- rows -> items


def _records(part: Part) -> list[dict[str, Any]]:
    """The part's table rows as dicts (vector column left out)."""
    if part.ids is not None:
        return [{"id": line} for line in part.ids.read_text(encoding="utf-8").splitlines()]
    import pyarrow.parquet as pq

    file = part.table or part.vectors
    names = [n for n in pq.read_schema(file).names if n != part.column]
    return pq.read_table(file, columns=names).to_pylist()


def _first(record: dict[str, Any], given: str | None, names: Sequence[str]) -> Any:
    if given is not None:
        return record.get(given)
    return next((record[n] for n in names if record.get(n) not in (None, "")), None)


def _item(record: dict[str, Any], part: Part, row: int, options: SourceOptions, problem: str | None) -> Item:
    location = _first(record, options.path_column, PATH_COLUMNS)
    location = str(location) if location not in (None, "") else None
    given_id = _first(record, options.id_column, ID_COLUMNS)
    doc_id = str(given_id) if given_id not in (None, "") else location or f"{part.vectors.stem}:{row}"
    source = (location if "://" in location else file_source(location)) if location else ""
    caption = _first(record, options.caption_column, CAPTION_COLUMNS)
    used = {options.id_column, options.path_column, options.caption_column, *PATH_COLUMNS, *ID_COLUMNS,
            *CAPTION_COLUMNS}
    keep = options.metadata_columns or [k for k in record if k not in used]
    metadata = {k: plain_metadata(record.get(k)) for k in keep if record.get(k) is not None}
    metadata.update(_exported_metadata(metadata.pop("metadata", None)))
    return Item(id=doc_id, source=source, caption=str(caption or ""), metadata=metadata, problem=problem)


def _exported_metadata(value: Any) -> dict[str, Any]:
    """An export's ``metadata`` column (JSON text of an object) as fields; anything else as the field it is."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return parsed
    return {"metadata": value}


# ---------------------------------------------------------------------------------------------- calibration


def concept_texts(encoder: Any) -> tuple[np.ndarray, np.ndarray]:
    """The concept words' ids and embeddings through ``encoder``'s text tower, from the shared cache (keyed by the
    text tower's weights) or embedded once and cached: the image tower is never run."""
    from stair_search.models.checkpoint import text_fingerprint
    from stair_search.paths import concepts_dir

    path = concepts_dir() / texts_cache_name(text_fingerprint(encoder.model))
    cached = load_concept_texts(path)
    if cached is not None:
        return cached
    ids, concepts = embed_concepts(encoder.model.vocabulary, lambda texts: encoder.embed_texts(texts, 256))
    save_concept_texts(path, ids, concepts)
    return ids, concepts


def collection_bank(encoder: Any, source: EmbeddingSource,
                    size: int = CALIBRATION_SAMPLE) -> tuple[ConceptBank | None, dict[str, Any]]:
    """The concept bank calibrated on a sample of the collection's own embeddings, and what the manifest records
    of it (how many, and a digest of the sample); no bank for a source that gives its sparse vectors."""
    if source.sparse:
        return None, {"calibrated_on": "the source's own sparse vectors", "local_features": False}
    sample = source.sample(size)
    if not len(sample):
        raise EmbeddingError(f"{source.spec}: no usable embedding (every sampled row is NaN or zero)")
    bank = calibrated(*concept_texts(encoder), encoder.model.vocabulary, sample, encoder.concept_alignment())
    digest = hashlib.sha256(np.ascontiguousarray(sample).tobytes()).hexdigest()[:16]
    return bank, {"calibrated_on": CALIBRATED_ON, "sample": len(sample), "sample_sha256": digest,
                  "local_features": False}


# ---------------------------------------------------------------------------------------------- chunks


def embedding_chunks(source: EmbeddingSource, start: int, existing: set[str], bank: ConceptBank | None, top_k: int,
                     builder_args: dict[str, Any], skip_reason: Callable[[Item, set[str]], str | None]
                     ) -> Iterator[Chunk]:
    """The source's items from position ``start`` on, batched into chunks as the image pipeline's: dense = the
    unit embedding, sparse = its concept vector (or the source's own); no decode, no model."""

    def encode(payloads: list[tuple[np.ndarray, dict[str, float] | None]]) -> EncodedBatch:
        dense = np.stack([vector for vector, _ in payloads]).astype(np.float32)
        given = [sparse or {} for _, sparse in payloads]
        return EncodedBatch(dense=dense, sparse=given if bank is None else bank.image_vectors(dense, top_k))

    builder = ChunkBuilder(encode=encode, **builder_args)
    position = start - 1
    for position, (item, vector, given) in enumerate(source.items(start), start):
        width, height = _size(item.metadata)
        chunk = builder.add(position, item, skip_reason(item, existing), width, height, (vector, given))
        if chunk is not None:
            yield chunk
    if (chunk := builder.flush(position + 1)) is not None:
        yield chunk


def _size(metadata: dict[str, Any]) -> tuple[int, int]:
    width, height = metadata.get("width"), metadata.get("height")
    if isinstance(width, int) and isinstance(height, int) and not isinstance(width, bool):
        return width, height
    return 0, 0
