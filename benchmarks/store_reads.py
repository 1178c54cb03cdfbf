"""Feature store reads, format 1 (parquet) vs format 2 (memory-mapped Arrow + .npy): what a reranker and a hit list
pay per query.

One synthetic shard (default 20,000 documents with stair-lite's m and D, read from its model config) is written
in both formats: format 1 exactly as the parquet writer before format 2 made it (row groups of 128, dictionary +
snappy for the fields, plain fp16 local columns), format 2 by ``write_features``. Then, interleaved (the same
random rows for both, the order alternating), through the public ``FeatureStore``:

- ``local_features`` for ``--candidates`` random rows (what a reranker reads over the top 100);
- ``rows`` of ``--hits`` random rows, the stored fields a hit carries (id, source, width, height, caption, metadata).

The files are read warm (page cache), as a serving process reads them. Prints p50/p95 per read and format, their
ratio, the time to open each store, and the bytes per document of each format.

    python benchmarks/store_reads.py [--rows 20000] [--candidates 100] [--hits 10] [--repeats 200]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stair_search.index import STORED_FIELDS
from stair_search.index.store import FeatureRecord, FeatureStore, store_files, write_features

CONFIG = Path(__file__).resolve().parents[1] / "stair_search" / "models" / "configs" / "stair-lite.json"
V1_ROW_GROUP = 128  # what the index writer used for format 1


def make_records(count: int, num_local: int, dim: int, seed: int = 0) -> list[FeatureRecord]:
    """Documents like an image folder's: path sources, a caption, small metadata, unit fp16 local features."""
    rng = np.random.default_rng(seed)
    words = ["red", "circle", "dog", "beach", "sunset", "city", "street", "night", "café", "mountain", "river"]
    records = []
    for i in range(count):
        local = rng.standard_normal((num_local, dim)).astype(np.float32)
        local /= np.linalg.norm(local, axis=1, keepdims=True)
        caption = " ".join(rng.choice(words, size=8).tolist())
        records.append(FeatureRecord(
            id=f"photos/{i // 1000:03d}/img_{i:07d}.jpg", source=f"/data/photos/{i // 1000:03d}/img_{i:07d}.jpg",
            width=int(rng.integers(320, 4000)), height=int(rng.integers(240, 3000)), caption=caption,
            metadata={"album": f"album-{i % 97}", "year": 2000 + i % 25, "tags": caption.split()[:3]},
            local=local.astype(np.float16), local_positions=rng.random((num_local, 2)).astype(np.float16)))
    return records


def write_v1(path: Path, records: list[FeatureRecord], num_local: int, dim: int) -> None:
    """Format 1, as the store wrote it before format 2 (same schema, encodings and row groups)."""
    meta = {"format": 1, "num_local": num_local, "dim": dim}
    sizes = {"local": num_local * dim, "local_positions": num_local * 2}
    schema = pa.schema([pa.field("id", pa.string(), nullable=False), ("source", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("caption", pa.string()), ("metadata", pa.string()),
                        *((name, pa.list_(pa.float16(), size)) for name, size in sizes.items())],
                       metadata={b"stair_search": json.dumps(meta).encode()})
    fields = list(STORED_FIELDS)
    compression = {name: "snappy" for name in fields} | {name: "none" for name in sizes}
    with pq.ParquetWriter(path, schema, use_dictionary=fields, compression=compression) as writer:
        for start in range(0, len(records), V1_ROW_GROUP):
            chunk = records[start : start + V1_ROW_GROUP]
            columns = {name: [getattr(r, name) for r in chunk] for name in fields if name != "metadata"}
            columns["metadata"] = [json.dumps(r.metadata, ensure_ascii=False) for r in chunk]
            for name, size in sizes.items():
                flat = np.stack([getattr(r, name) for r in chunk]).reshape(-1)
                columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(flat), size)
            writer.write_table(pa.table(columns, schema=schema), row_group_size=V1_ROW_GROUP)


def percentiles(times: list[float]) -> tuple[float, float]:
    ms = 1000.0 * np.asarray(times)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def timed(call, *args) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def main() -> None:
    config = json.loads(CONFIG.read_text())
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--num-local", type=int, default=config["num_local"])
    parser.add_argument("--dim", type=int, default=config["clip"]["embed_dim"])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--hits", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()

    records = make_records(args.rows, args.num_local, args.dim)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"v1 parquet": Path(tmp) / "features.parquet", "v2 mmap": Path(tmp) / "features.arrow"}
        write_v1(paths["v1 parquet"], records, args.num_local, args.dim)
        write_features(paths["v2 mmap"], records)
        del records
        opened: dict[str, list[float]] = {name: [] for name in paths}
        for _ in range(5):
            for name, path in paths.items():
                opened[name].append(timed(lambda path: FeatureStore.open(path).close(), path))
        stores = {name: FeatureStore.open(path) for name, path in paths.items()}
        times: dict[tuple[str, str], list[float]] = {(name, read): [] for name in paths for read in ("local", "hits")}
        rng = np.random.default_rng(1)
        for turn in range(args.repeats + 20):  # the first 20 warm the page cache and the code paths
            candidates = rng.choice(args.rows, size=args.candidates, replace=False).tolist()
            hits = rng.choice(args.rows, size=args.hits, replace=False).tolist()
            order = list(stores.items()) if turn % 2 else list(reversed(stores.items()))
            for name, store in order:
                spent_local = timed(store.local_features, candidates)
                spent_hits = timed(store.rows, hits, STORED_FIELDS)
                if turn >= 20:
                    times[name, "local"].append(spent_local)
                    times[name, "hits"].append(spent_hits)
        a, b = stores["v1 parquet"], stores["v2 mmap"]
        check = rng.choice(args.rows, size=args.candidates, replace=False).tolist()
        assert all(np.array_equal(x, y) for x, y in zip(a.local_features(check), b.local_features(check), strict=True))
        assert a.rows(check, STORED_FIELDS) == b.rows(check, STORED_FIELDS)

        print(f"shard: {args.rows:,} documents, m={args.num_local}, D={args.dim}; {args.repeats} interleaved reads\n")
        print("| read | v1 parquet p50 / p95 ms | v2 mmap p50 / p95 ms | v1/v2 (p50) |\n|---|---:|---:|---:|")
        for read, label in (("local", f"local_features, {args.candidates} rows"),
                            ("hits", f"rows, {args.hits} hits' stored fields")):
            (p50_1, p95_1), (p50_2, p95_2) = percentiles(times["v1 parquet", read]), percentiles(times["v2 mmap", read])
            print(f"| {label} | {p50_1:.3f} / {p95_1:.3f} | {p50_2:.3f} / {p95_2:.3f} | {p50_1 / p50_2:.0f}x |")
        (o1, _), (o2, _) = percentiles(opened["v1 parquet"]), percentiles(opened["v2 mmap"])
        print(f"| open (ids -> row map) | {o1:.1f} | {o2:.1f} | {o1 / o2:.1f}x |\n")
        raw = args.num_local * (args.dim + 2) * 2
        for name, path in paths.items():
            files = store_files(path)
            sizes = {file.name: file.stat().st_size for file in files}
            detail = ", ".join(f"{file} {size / args.rows:,.0f}" for file, size in sizes.items())
            print(f"{name}: {sum(sizes.values()) / args.rows:,.0f} bytes/document ({detail}); "
                  f"raw local features + positions {raw:,}")
        for store in stores.values():
            store.close()


if __name__ == "__main__":
    main()
