"""``run``: index any source (same options as ``stair-search index``).

This version decodes in the calling process and builds the index with IndexWriter; worker processes,
resume after a kill, and the skipped-items report build on the same sources and decoder.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from indexer.decode import decode
from indexer.sources import SourceOptions, iter_items
from stair_search.encode import Encoder
from stair_search.index.dense import DenseSpec
from stair_search.index.manifest import Manifest
from stair_search.index.store import FeatureRecord
from stair_search.index.writer import IndexWriter


@dataclass
class JobSummary:
    manifest: Manifest
    indexed: int
    seconds: float
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, source, reason)

    def describe(self) -> str:
        reasons = Counter(reason.split(":")[0] for _, _, reason in self.skipped)
        text = f"indexed {self.indexed} in {self.seconds:.1f} s ({self.indexed / max(self.seconds, 1e-9):.1f} images/s)"
        return text + (f", skipped {len(self.skipped)}: " + ", ".join(f"{n} {r}" for r, n in reasons.items())
                       if self.skipped else "")


def run(source: str | Path, out: str | Path, model: str = "stair-tiny", pretrained: str | None = None,
        batch_size: int = 32, shard_size: int = 100_000, dense: str | None = None, append: bool = False,
        overwrite: bool = False, device: str | None = None, encoder: Encoder | None = None,
        options: SourceOptions | None = None) -> JobSummary:
    """Index every readable image of ``source`` into the index directory ``out``; bad items are skipped."""
    started = time.perf_counter()
    encoder = encoder or Encoder(model, batch_size=batch_size, device=device, pretrained=pretrained)
    writer = IndexWriter(out, encoder, shard_size=shard_size, dense_spec=DenseSpec(dense) if dense else None,
                         append=append, overwrite=overwrite)
    skipped: list[tuple[str, str, str]] = []
    records: list[FeatureRecord] = []
    pixels: list[torch.Tensor] = []
    indexed = 0
    try:
        for position, item in enumerate(iter_items(str(source), options)):
            decoded = decode(item, position, encoder.model.preprocess)
            if decoded.skip_reason:
                skipped.append((item.id, item.source, decoded.skip_reason))
                continue
            records.append(FeatureRecord(id=item.id, source=item.source, width=decoded.width,
                                         height=decoded.height, caption=item.caption, metadata=item.metadata))
            pixels.append(decoded.pixels)
            if len(pixels) == batch_size:
                indexed += _flush(writer, encoder, records, pixels)
        indexed += _flush(writer, encoder, records, pixels)
        if not indexed:
            raise ValueError(f"Nothing to index in '{source}': {len(skipped)} item(s) found, none readable "
                             f"({', '.join(sorted({r for _, _, r in skipped})) or 'no images'}).")
        manifest = writer.close()
    except BaseException:
        writer.abort()
        raise
    return JobSummary(manifest, indexed, time.perf_counter() - started, skipped)


def _flush(writer: IndexWriter, encoder: Encoder, records: list[FeatureRecord], pixels: list[torch.Tensor]) -> int:
    if not pixels:
        return 0
    writer.add(list(records), encoder.encode_pixels(torch.stack(pixels)))
    count = len(pixels)
    records.clear()
    pixels.clear()
    return count
