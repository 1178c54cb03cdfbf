"""Feature store: real parquet files in tmp_path, written and read back through the public API."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stair_search.index.store import FeatureRecord, FeatureStore, write_features

M, D = 4, 32


def make_records(count: int, rng: np.random.Generator, with_local: bool = True) -> list[FeatureRecord]:
    """Records with random fp16 local features and unicode metadata, ids unique."""
    records = []
    for i in range(count):
        records.append(
            FeatureRecord(
                id=f"doc-{i:05d}",
                source=f"s3://bucket/imgs/{i}.jpg",
                width=100 + i,
                height=200 + i % 7,
                caption=f"caption {i} — café ☕",
                metadata={"tags": ["ünïcode", "日本語", f"n{i}"], "score": i / 3, "nested": {"ok": i % 2 == 0}},
                local=rng.standard_normal((M, D)).astype(np.float16) if with_local else None,
                local_positions=rng.random((M, 2)).astype(np.float16) if with_local else None,
            )
        )
    return records


def assert_same(got: dict, want: FeatureRecord) -> None:
    for name in ("id", "source", "width", "height", "caption", "metadata"):
        assert got[name] == getattr(want, name), name
    for name in ("local", "local_positions"):
        expected = getattr(want, name)
        if expected is None:
            assert got[name] is None
        else:
            assert got[name].dtype == np.float16
            np.testing.assert_array_equal(got[name], expected)


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, list[FeatureRecord]]:
    """2,500 records in row groups of 256 (10 groups, the last one partial)."""
    records = make_records(2500, np.random.default_rng(0))
    path = tmp_path_factory.mktemp("store") / "shard-0.parquet"
    write_features(path, records, row_group_size=256)
    return path, records


def test_round_trip_by_id_in_shuffled_order(big, rng):
    path, records = big
    picks = rng.choice(len(records), size=40, replace=False)
    with FeatureStore.open(path) as store:
        assert len(store) == 2500
        assert store.ids == [r.id for r in records]
        assert (store.num_local, store.dim) == (M, D)
        assert pq.ParquetFile(path).num_row_groups == 10
        got = store.get([records[i].id for i in picks] + ["no-such-doc"])
        assert got[-1] is None
        for row, record in zip(picks, got[:-1], strict=True):
            assert_same(record, records[row])
            assert store.row_of(records[row].id) == row
        assert store.row_of("no-such-doc") is None


def test_rows_keep_request_order_repeats_and_column_subsets(big):
    path, records = big
    with FeatureStore.open(path) as store:
        wanted = [2499, 0, 1300, 0, 255, 256]
        got = store.rows(wanted, columns=["id", "metadata"])
        assert [g["id"] for g in got] == [records[r].id for r in wanted]
        assert all(set(g) == {"id", "metadata"} for g in got)
        assert got[2]["metadata"] == records[1300].metadata
        assert store.rows([]) == []
        with pytest.raises(IndexError):
            store.rows([2500])
        with pytest.raises(IndexError):
            store.rows([-1])
        with pytest.raises(ValueError, match="unknown columns"):
            store.rows([0], columns=["nope"])


def test_local_features_stack_in_request_order(big):
    path, records = big
    wanted = [7, 2400, 7, 900]
    with FeatureStore.open(path) as store:
        local, positions = store.local_features(wanted)
        assert local.shape == (4, M, D) and local.dtype == np.float16
        assert positions.shape == (4, M, 2) and positions.dtype == np.float16
        np.testing.assert_array_equal(local, np.stack([records[r].local for r in wanted]))
        np.testing.assert_array_equal(positions, np.stack([records[r].local_positions for r in wanted]))
        empty_local, empty_positions = store.local_features([])
        assert empty_local.shape == (0, M, D) and empty_positions.shape == (0, M, 2)


def chunk_range(chunk: pq.ColumnChunkMetaData) -> tuple[int, int]:
    """Byte range [start, end) of one column chunk in the file."""
    start = chunk.data_page_offset
    if chunk.has_dictionary_page and chunk.dictionary_page_offset is not None:
        start = min(start, chunk.dictionary_page_offset)
    return start, start + chunk.total_compressed_size


def corrupt_except(path: Path, keep) -> None:
    """Overwrite every column chunk for which ``keep(row_group, column_name)`` is false with garbage bytes.

    Any read that decodes a corrupted chunk fails, so a successful read proves which chunks it touched.
    """
    meta = pq.ParquetFile(path).metadata
    data = bytearray(path.read_bytes())
    for g in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            chunk = meta.row_group(g).column(c)
            if not keep(g, chunk.path_in_schema.split(".")[0]):
                start, end = chunk_range(chunk)
                data[start:end] = b"\xff" * (end - start)
    path.write_bytes(bytes(data))


def test_row_lookup_decodes_only_the_row_group_that_holds_it(big, tmp_path):
    source, records = big
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(source.read_bytes())
    target_group, target_row = 5, 5 * 256 + 17
    corrupt_except(path, lambda g, name: name == "id" or g == target_group)
    store = FeatureStore.open(path)  # opening reads the id column only, which is intact
    assert_same(store.rows([target_row])[0], records[target_row])
    assert_same(store.get([records[target_group * 256].id])[0], records[target_group * 256])
    # The corruption is real: touching any other row group, as reading the whole table would, fails.
    with pytest.raises((OSError, pa.ArrowException)):
        store.rows([target_row - 256])
    with pytest.raises((OSError, pa.ArrowException)):
        pq.read_table(path)


def test_local_features_decode_only_local_columns_of_needed_groups(big, tmp_path):
    source, records = big
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(source.read_bytes())
    corrupt_except(path, lambda g, name: name == "id" or (g in (2, 9) and name in ("local", "local_positions")))
    store = FeatureStore.open(path)
    wanted = [2400, 600, 2499]
    local, positions = store.local_features(wanted)
    np.testing.assert_array_equal(local, np.stack([records[r].local for r in wanted]))
    np.testing.assert_array_equal(positions, np.stack([records[r].local_positions for r in wanted]))
    with pytest.raises((OSError, pa.ArrowException)):
        store.rows([600], columns=["caption"])  # same group, other column: corrupted, so never read above


def test_records_without_local_features(tmp_path, rng):
    records = make_records(5, rng, with_local=False)
    path = tmp_path / "plain.parquet"
    write_features(path, records)
    store = FeatureStore.open(path)
    assert (store.num_local, store.dim) == (0, 0)
    for got, want in zip(store.rows(range(5)), records, strict=True):
        assert_same(got, want)
    local, positions = store.local_features([1, 3])
    assert local.shape == (2, 0, 0) and positions.shape == (2, 0, 2)


def test_mixing_records_with_and_without_local_features(tmp_path, rng):
    records = make_records(6, rng)
    records[2].local = records[2].local_positions = None
    records[4].local_positions = None
    path = tmp_path / "mixed.parquet"
    write_features(path, records, row_group_size=4)
    store = FeatureStore.open(path)
    for got, want in zip(store.get([r.id for r in records]), records, strict=True):
        assert_same(got, want)
    local, positions = store.local_features([2, 4, 5])
    assert not local[0].any() and not positions[0].any() and not positions[1].any()  # missing -> zeros
    np.testing.assert_array_equal(local[1], records[4].local)
    np.testing.assert_array_equal(positions[2], records[5].local_positions)


def test_local_shapes_must_agree(tmp_path, rng):
    records = make_records(3, rng)
    records[2].local = rng.standard_normal((M, D + 1)).astype(np.float16)
    with pytest.raises(ValueError, match="doc-00002"):
        write_features(tmp_path / "x.parquet", records)
    records = make_records(3, rng)
    records[1].local_positions = np.zeros((M + 1, 2), dtype=np.float16)
    with pytest.raises(ValueError, match="local_positions"):
        write_features(tmp_path / "x.parquet", records)
    assert not (tmp_path / "x.parquet").exists()


def test_duplicate_and_empty_ids_are_refused(tmp_path, rng):
    records = make_records(4, rng)
    records[3].id = records[1].id
    with pytest.raises(ValueError, match="doc-00001"):
        write_features(tmp_path / "x.parquet", records)
    records = make_records(4, rng)
    records[2].id = ""
    with pytest.raises(ValueError, match="non-empty"):
        write_features(tmp_path / "x.parquet", records)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path, rng):
    records = make_records(600, rng)
    records[550].metadata = {"bad": object()}  # fails in the third row group, after two were written
    fresh = tmp_path / "fresh.parquet"
    with pytest.raises(ValueError, match="doc-00550"):
        write_features(fresh, records, row_group_size=256)
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing.parquet"
    write_features(existing, make_records(3, rng))
    before = existing.read_bytes()
    with pytest.raises(ValueError, match="JSON"):
        write_features(existing, records, row_group_size=256)
    assert existing.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["existing.parquet"]
    assert len(FeatureStore.open(existing)) == 3


def test_rewrite_replaces_the_old_file(tmp_path, rng):
    path = tmp_path / "shard.parquet"
    write_features(path, make_records(3, rng))
    write_features(path, make_records(7, rng), row_group_size=2)
    assert len(FeatureStore.open(path)) == 7
    assert [p.name for p in tmp_path.iterdir()] == ["shard.parquet"]


def test_open_refuses_missing_and_foreign_files(tmp_path):
    missing = tmp_path / "nowhere.parquet"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        FeatureStore.open(missing)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "x": [1, 2]}), foreign)
    with pytest.raises(ValueError, match="not a stair_search feature store"):
        FeatureStore.open(foreign)
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        FeatureStore.open(junk)


def test_empty_store(tmp_path):
    path = tmp_path / "empty.parquet"
    write_features(path, [])
    store = FeatureStore.open(path)
    assert len(store) == 0 and store.ids == [] and store.get(["x"]) == [None]


def test_concurrent_reads_agree(big):
    path, records = big
    store = FeatureStore.open(path)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        picks = np.random.default_rng(seed).choice(len(records), size=20, replace=False)
        try:
            for row in picks:
                assert store.get([records[row].id], columns=["id", "local"])[0]["id"] == records[row].id
                np.testing.assert_array_equal(store.local_features([row])[0][0], records[row].local)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
