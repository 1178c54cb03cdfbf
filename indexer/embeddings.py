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
import logging
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
from stair_search.index.sparse import index_dtype, quantise
from stair_search.index.writer import IndexWriter
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
BLOCK_ROWS = 4096  # rows read at once (vectors and their metadata)
NOT_FINITE = "embedding has NaN or infinite values"
ZERO = "embedding is all zeros"
PATH_COLUMNS = ("image_path", "url", "path", "source")  # clip-retrieval's folder inference, LAION, a plain table
ID_COLUMNS = ("id", "key")
CAPTION_COLUMNS = ("caption", "text")
VECTOR_COLUMNS = ("embedding", "vector", "img_emb", "emb")
CALIBRATED_ON = "collection embeddings"
CALIBRATION_FILE = "calibration.npz"  # the index's calibration (ConceptBank.save_calibration), beside its manifest
SPARSE_COLUMN = "sparse"  # an export's {word-piece: weight} map column
_PART = re.compile(r"_(\d+)\.(npy|parquet)$")
log = logging.getLogger(__name__)

__all__ = ["CALIBRATED_ON", "CALIBRATION_FILE", "EmbeddingError", "EmbeddingSource", "check_embeddings_model",
           "collection_bank", "embedding_chunks", "image_tower_released", "index_bank", "open_source",
           "release_image_tower"]


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
        for begin, block, records in blocks(part, first):
            norms = np.linalg.norm(block, axis=1)
            units = block / np.where(norms > 0, norms, 1.0)[:, None]
            for offset, (record, norm) in enumerate(zip(records, norms.tolist(), strict=True)):
                problem = NOT_FINITE if not np.isfinite(norm) else ZERO if norm == 0 else None
                given = dict(record.pop(SPARSE_COLUMN) or ()) if self.sparse else None
                yield (_item(record, part, begin + offset, self.options, problem),
                       None if problem else units[offset], given)

    def sample(self, size: int = CALIBRATION_SAMPLE) -> np.ndarray:
        """Up to ``size`` usable unit vectors, evenly spaced over the whole collection (the same on every run),
        read a block at a time."""
        wanted = np.unique(np.linspace(0, self.count - 1, min(size, self.count)).round().astype(np.int64))
        chosen, offset = [], 0
        for part, rows in zip(self.parts, self.rows, strict=True):
            inside = wanted[(wanted >= offset) & (wanted < offset + rows)] - offset
            if len(inside):
                chosen.extend(_picked(part, inside))
            offset += rows
        if not chosen:
            return np.zeros((0, self.width))
        block = np.concatenate(chosen)
        norms = np.linalg.norm(block, axis=1)
        good = np.isfinite(norms) & (norms > 0)
        return block[good] / norms[good, None]


def blocks(part: Part, first: int = 0) -> Iterator[tuple[int, np.ndarray, list[dict[str, Any]]]]:
    """``part`` from row ``first`` on as (first row, float32 vectors, table rows) blocks of at most
    :data:`BLOCK_ROWS`: an .npy part memory-mapped, a parquet read batch by batch, so memory holds a block, never
    a part (a LAION part or a single parquet may be the whole collection)."""
    if part.column is None and part.table is None:  # ids in a text file
        ids = part.ids.read_text(encoding="utf-8").splitlines() if part.ids else []
        vectors = np.load(part.vectors, mmap_mode="r")
        for begin in range(first, len(vectors), BLOCK_ROWS):
            end = min(begin + BLOCK_ROWS, len(vectors))
            yield begin, np.asarray(vectors[begin:end], np.float32), [{"id": i} for i in ids[begin:end]]
        return
    import pyarrow.parquet as pq

    table = pq.ParquetFile(part.table or part.vectors)
    mapped = np.load(part.vectors, mmap_mode="r") if part.column is None else None
    begin = 0
    for batch in table.iter_batches(batch_size=BLOCK_ROWS):
        end = begin + batch.num_rows
        if end > first:
            skip = max(0, first - begin)
            batch = batch.slice(skip)
            if mapped is not None:
                vectors = np.asarray(mapped[begin + skip : end], np.float32)
            else:
                vectors = _list_matrix(batch.column(part.column))
                batch = batch.drop_columns([part.column])
            yield begin + skip, vectors, batch.to_pylist()
        begin = end


def _picked(part: Part, rows: np.ndarray) -> list[np.ndarray]:
    """The float64 vectors of ``part`` at ``rows`` (sorted): an .npy part indexed in place, a parquet column read
    only in the row groups that hold them."""
    if part.column is None:
        return [np.asarray(np.load(part.vectors, mmap_mode="r")[rows], np.float64)]
    import pyarrow.parquet as pq

    file, out, begin = pq.ParquetFile(part.vectors), [], 0
    for group in range(file.metadata.num_row_groups):
        end = begin + file.metadata.row_group(group).num_rows
        inside = rows[(rows >= begin) & (rows < end)] - begin
        if len(inside):
            column = file.read_row_group(group, columns=[part.column]).column(0).combine_chunks()
            out.append(np.asarray(_list_matrix(column.take(inside)), np.float64))
        begin = end
    return out


def _list_matrix(column: Any) -> np.ndarray:
    """A parquet list<float> column (chunked or not) as a (rows, width) float32 matrix."""
    if hasattr(column, "combine_chunks"):
        column = column.combine_chunks()
    values = np.asarray(column.flatten().to_numpy(zero_copy_only=False), np.float32)
    return values.reshape(len(column), -1) if len(column) else values.reshape(0, 0)


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


def _first(record: dict[str, Any], given: str | None, names: Sequence[str]) -> Any:
    if given is not None:
        return record.get(given)
    return next((record[n] for n in names if record.get(n) not in (None, "")), None)


def _item(record: dict[str, Any], part: Part, row: int, options: SourceOptions, problem: str | None) -> Item:
    """The row as an item; its ``width`` and ``height`` columns, when both are whole numbers, are taken out of the
    row first (the item's ``size``)."""
    size = _size(record)
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
    return SizedItem(id=doc_id, source=source, caption=str(caption or ""), metadata=metadata, problem=problem,
                     size=size)


@dataclass
class SizedItem(Item):
    """An item with the image size its source gave ((0, 0): unknown)."""

    size: tuple[int, int] = (0, 0)


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
                  "local_features": False, "file": CALIBRATION_FILE}


def index_bank(encoder: Any, source: EmbeddingSource, writer: IndexWriter) -> ConceptBank | None:
    """The concept bank this job's documents are written with, so that an index has one calibration:

    - a source that gives its sparse vectors (an export): none;
    - an append onto an index calibrated on its collection: that calibration, read from the index's
      :data:`CALIBRATION_FILE` (an append's own sample is not used);
    - an append onto an index built from images (no calibration record): the model's own bank, calibrated on the
      reference photos as image indexing is;
    - otherwise (a new index, an overwrite) a calibration on the source's sample
      (:func:`collection_bank`), recorded in the manifest and published with the shards in
      :data:`CALIBRATION_FILE`.
    """
    recorded = writer.manifest.calibration if writer.appending else None
    if source.sparse:
        bank, record = collection_bank(encoder, source)
        writer.manifest.calibration = recorded or record
        return bank
    if writer.appending and recorded is None:
        return encoder.concepts()
    if recorded is not None and recorded.get("file"):
        path = writer.index_dir / recorded["file"]
        bank = ConceptBank.from_calibration(path, *concept_texts(encoder), encoder.model.vocabulary,
                                            encoder.concept_alignment())
        if bank is None:
            raise EmbeddingError(f"{path}: the index's calibration is missing or of other concept words; rebuild "
                                 f"the index with --overwrite (the append cannot be calibrated as it was)")
        return bank
    bank, record = collection_bank(encoder, source)
    if recorded is not None:  # an index of an earlier version recorded no file: calibrated on this sample
        log.warning("%s records no calibration file; this append is calibrated on its own sample", writer.index_dir)
        return bank
    writer.build_dir.mkdir(parents=True, exist_ok=True)
    writer.stage_file(bank.save_calibration(writer.build_dir / CALIBRATION_FILE), CALIBRATION_FILE)
    writer.manifest.calibration = record
    return bank


def release_image_tower(encoder: Any) -> None:
    """Free the image tower's weights of an encoder that will never encode an image (a job indexing embeddings
    that built its own encoder): its parameters move to PyTorch's ``meta`` device, which holds shapes and no
    memory, so the job holds the text tower alone (for ViT-B-32 ~350 MB less; ViT-H-14 ~2.5 GB). The fingerprint
    the index records is taken first (it hashes every weight); the text tower's (the concept words' cache key)
    hashes no image weight. An image encoded with it afterwards fails on the meta device."""
    _ = encoder.fingerprint, encoder.record
    encoder.model.clip.visual.to("meta")


def image_tower_released(encoder: Any) -> bool:
    """Whether ``encoder``'s model holds no image tower weight (every one on the ``meta`` device)."""
    return all(p.device.type == "meta" for p in encoder.model.clip.visual.parameters())


# ---------------------------------------------------------------------------------------------- chunks


def embedding_chunks(source: EmbeddingSource, start: int, existing: set[str], bank: ConceptBank | None, top_k: int,
                     builder_args: dict[str, Any], skip_reason: Callable[[Item, set[str]], str | None]
                     ) -> Iterator[Chunk]:
    """The source's items from position ``start`` on, batched into chunks as the image pipeline's: dense = the
    unit embedding, sparse = its concept vector (or the source's own); no decode, no model."""
    builder = _EmbeddingBatches(bank, top_k, **builder_args)
    position = start - 1
    for position, (item, vector, given) in enumerate(source.items(start), start):
        width, height = item.size
        chunk = builder.add(position, item, skip_reason(item, existing), width, height, (vector, given))
        if chunk is not None:
            yield chunk
    if (chunk := builder.flush(position + 1)) is not None:
        yield chunk


class _EmbeddingBatches(ChunkBuilder):
    """The image pipeline's batching, with each batch's concept vectors made as the index's CSR at once
    (:meth:`ConceptBank.image_csr`: the same impacts as ``to_csr`` of :meth:`ConceptBank.image_vectors`, without
    a dict per document, which cost more than scoring them); a source's own sparse vectors go through ``to_csr``."""

    def __init__(self, bank: ConceptBank | None, top_k: int, **builder_args: Any):
        super().__init__(encode=self._encode, **builder_args)
        self.bank, self.top_k = bank, top_k

    def _encode(self, payloads: list[tuple[np.ndarray, dict[str, float] | None]]) -> EncodedBatch:
        dense = np.stack([vector for vector, _ in payloads]).astype(np.float32)
        return EncodedBatch(dense=dense, sparse=[sparse or {} for _, sparse in payloads])

    def flush(self, end: int) -> Chunk | None:
        if self.bank is None or not self.records:
            return super().flush(end)
        chunk = Chunk(end=end, records=self.records, skipped=self.skipped)
        dense = np.stack([vector for vector, _ in self.payloads]).astype(np.float32)
        chunk.encoded = EncodedBatch(dense=dense, sparse=[{} for _ in self.records])  # as a spooled chunk reads
        indptr, tokens, weights = self.bank.image_csr(dense, self.top_k)
        chunk.csr = indptr, tokens.astype(index_dtype(len(self.vocabulary))), quantise(weights, self.scale)
        self.records, self.payloads, self.skipped = [], [], []
        return chunk


SIZE_COLUMNS = ("width", "height")  # LAION's image size columns, and an export's: the documents' own size


def _size(record: dict[str, Any]) -> tuple[int, int]:
    """The image's width and height when the row gives both as whole numbers (then taken out of the row: they
    are the document's own fields, as image indexing stores them, not metadata), else (0, 0) (unknown)."""
    width, height = record.get("width"), record.get("height")
    if type(width) is int and type(height) is int:
        for name in SIZE_COLUMNS:
            record.pop(name)
        return width, height
    return 0, 0
