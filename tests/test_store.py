"""Feature store: real files in tmp_path, written and read back through the public API.

Format 2 (features.arrow + memory-mapped .npy arrays) is what write_features writes; format 1 (one parquet file,
what indexes built before format 2 hold) is written here by :func:`write_v1`, straight with pyarrow.parquet and
the format 1 schema, and must keep giving the same answers.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stair_search.index.layout import FEATURES_FILE, LEGACY_FEATURES_FILE
from stair_search.index.store import (
    SLICE_ROWS,
    FeatureRecord,
    FeatureStore,
    array_paths,
    store_files,
    store_path,
    write_features,
)

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


def write_v1(path: Path, records: list[FeatureRecord], row_group_size: int = 1024) -> None:
    """A format 1 store as the parquet writer before format 2 made it (schema, encodings, row groups)."""
    m, dim = next(((r.local.shape[0], r.local.shape[1]) for r in records if r.local is not None), (0, 0))
    meta = {"format": 1, "num_local": m, "dim": dim}
    schema = pa.schema([pa.field("id", pa.string(), nullable=False), ("source", pa.string()), ("width", pa.int32()),
                        ("height", pa.int32()), ("caption", pa.string()), ("metadata", pa.string()),
                        ("local", pa.list_(pa.float16(), m * dim)), ("local_positions", pa.list_(pa.float16(), m * 2))],
                       metadata={b"stair_search": json.dumps(meta).encode()})

    def fixed(arrays: list, size: int) -> pa.Array:
        list_type = pa.list_(pa.float16(), size)
        values = [None if a is None else np.asarray(a, np.float16).reshape(-1).tolist() for a in arrays]
        return pa.array(values, list_type) if size else pa.nulls(len(arrays), list_type)

    strings = ["id", "source", "width", "height", "caption", "metadata"]
    compression = {name: "snappy" for name in strings} | {"local": "none", "local_positions": "none"}
    with pq.ParquetWriter(path, schema, use_dictionary=strings, compression=compression) as writer:
        for start in range(0, max(len(records), 1), row_group_size):
            chunk = records[start : start + row_group_size]
            columns = {"id": [r.id for r in chunk], "source": [r.source for r in chunk],
                       "width": [r.width for r in chunk], "height": [r.height for r in chunk],
                       "caption": [r.caption for r in chunk],
                       "metadata": [json.dumps(r.metadata, ensure_ascii=False) for r in chunk],
                       "local": fixed([r.local for r in chunk], m * dim),
                       "local_positions": fixed([r.local_positions for r in chunk], m * 2)}
            writer.write_table(pa.table(columns, schema=schema), row_group_size=row_group_size)


def write(fmt: str, path: Path, records: list[FeatureRecord], rows_per_part: int = 1024) -> Path:
    """A store of ``records`` in format ``fmt`` ("v2" or "v1") at ``path`` (its suffix set to the format's)."""
    if fmt == "v1":
        write_v1(path.with_suffix(".parquet"), records, rows_per_part)
        return path.with_suffix(".parquet")
    write_features(path.with_suffix(".arrow"), records, batch_size=rows_per_part)
    return path.with_suffix(".arrow")


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
def records() -> list[FeatureRecord]:
    """2,500 records: parts of 256 rows give 10 batches / row groups, the last one partial."""
    return make_records(2500, np.random.default_rng(0))


@pytest.fixture(scope="module")
def stores(tmp_path_factory, records) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("store")
    return {fmt: write(fmt, folder / "shard-0", records, rows_per_part=256) for fmt in ("v2", "v1")}


@pytest.fixture(params=["v2", "v1"])
def fmt(request) -> str:
    return request.param


# ------------------------------------------------------------------------------------- both formats, same answers


def test_round_trip_by_id_in_shuffled_order(stores, records, fmt, rng):
    picks = rng.choice(len(records), size=40, replace=False)
    with FeatureStore.open(stores[fmt]) as store:
        assert len(store) == 2500
        assert store.ids == [r.id for r in records]
        assert (store.num_local, store.dim) == (M, D)
        assert store.path == stores[fmt]
        got = store.get([records[i].id for i in picks] + ["no-such-doc"])
        assert got[-1] is None
        for row, record in zip(picks, got[:-1], strict=True):
            assert_same(record, records[row])
            assert store.row_of(records[row].id) == row
        assert store.row_of("no-such-doc") is None


@pytest.mark.parametrize("count", [1, SLICE_ROWS, SLICE_ROWS + 1, 300])
def test_rows_of_every_size_keep_request_order(stores, records, fmt, count, rng):
    """Few rows are gathered as slices, many with one take: both give the records, in order, repeats kept."""
    wanted = rng.integers(0, len(records), size=count).tolist()
    wanted[-1] = wanted[0]
    with FeatureStore.open(stores[fmt]) as store:
        got = store.rows(wanted)
        assert len(got) == count
        for row, record in zip(wanted, got, strict=True):
            assert_same(record, records[row])


def test_rows_keep_request_order_repeats_and_column_subsets(stores, records, fmt):
    with FeatureStore.open(stores[fmt]) as store:
        wanted = [2499, 0, 1300, 0, 255, 256]
        got = store.rows(wanted, columns=["id", "metadata"])
        assert [g["id"] for g in got] == [records[r].id for r in wanted]
        assert all(set(g) == {"id", "metadata"} for g in got)
        assert got[2]["metadata"] == records[1300].metadata
        assert [set(g) for g in store.rows([5, 6], columns=["local_positions"])] == [{"local_positions"}] * 2
        assert store.rows([]) == []
        with pytest.raises(IndexError):
            store.rows([2500])
        with pytest.raises(IndexError):
            store.rows([-1])
        with pytest.raises(ValueError, match="unknown columns"):
            store.rows([0], columns=["nope"])
        with pytest.raises(ValueError, match="unknown columns"):
            store.rows([0], columns=["has_local"])  # format 2's presence column is no public column


def test_local_features_stack_in_request_order(stores, records, fmt):
    wanted = [7, 2400, 7, 900]
    with FeatureStore.open(stores[fmt]) as store:
        local, positions = store.local_features(wanted)
        assert type(local) is np.ndarray and type(positions) is np.ndarray  # copies, not views of the map
        assert local.shape == (4, M, D) and local.dtype == np.float16
        assert positions.shape == (4, M, 2) and positions.dtype == np.float16
        np.testing.assert_array_equal(local, np.stack([records[r].local for r in wanted]))
        np.testing.assert_array_equal(positions, np.stack([records[r].local_positions for r in wanted]))
        empty_local, empty_positions = store.local_features([])
        assert empty_local.shape == (0, M, D) and empty_positions.shape == (0, M, 2)
        with pytest.raises(IndexError):
            store.local_features([0, 2500])


def test_records_without_local_features(tmp_path, rng, fmt):
    records = make_records(5, rng, with_local=False)
    store = FeatureStore.open(write(fmt, tmp_path / "plain", records))
    assert (store.num_local, store.dim) == (0, 0)
    for got, want in zip(store.rows(range(5)), records, strict=True):
        assert_same(got, want)
    local, positions = store.local_features([1, 3])
    assert local.shape == (2, 0, 0) and positions.shape == (2, 0, 2)


def test_mixing_records_with_and_without_local_features(tmp_path, rng, fmt):
    records = make_records(6, rng)
    records[2].local = records[2].local_positions = None
    records[4].local_positions = None
    store = FeatureStore.open(write(fmt, tmp_path / "mixed", records, rows_per_part=4))
    for got, want in zip(store.get([r.id for r in records]), records, strict=True):
        assert_same(got, want)
    local, positions = store.local_features([2, 4, 5])
    assert not local[0].any() and not positions[0].any() and not positions[1].any()  # missing -> zeros
    np.testing.assert_array_equal(local[1], records[4].local)
    np.testing.assert_array_equal(positions[2], records[5].local_positions)


def test_ids_with_newlines_unicode_and_separators_round_trip(tmp_path, rng, fmt):
    records = make_records(5, rng)
    odd_ids = ["a\nb", "日本語/画像.png", "tab\there", "x,y;\"z\"", "\u2028line"]
    for record, doc_id in zip(records, odd_ids, strict=True):
        record.id = doc_id
    store = FeatureStore.open(write(fmt, tmp_path / "odd", records))
    assert store.ids == [r.id for r in records]
    for got, want in zip(store.get(["tab\there", "a\nb", "x,y;\"z\""]), [records[2], records[0], records[3]],
                         strict=True):
        assert_same(got, want)


def test_empty_store(tmp_path, fmt):
    store = FeatureStore.open(write(fmt, tmp_path / "empty", []))
    assert len(store) == 0 and store.ids == [] and store.get(["x"]) == [None] and store.rows([]) == []
    local, positions = store.local_features([])
    assert local.shape[0] == 0 and positions.shape[0] == 0


def test_concurrent_reads_agree(stores, records, fmt):
    store = FeatureStore.open(stores[fmt])
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def worker(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            start.wait()
            for _ in range(30):
                picks = rng.choice(len(records), size=12, replace=False)
                got = store.rows(picks, columns=["id", "metadata", "local"])
                assert [g["id"] for g in got] == [records[r].id for r in picks]
                assert [g["metadata"] for g in got] == [records[r].metadata for r in picks]
                local, positions = store.local_features(picks)
                np.testing.assert_array_equal(local, np.stack([records[r].local for r in picks]))
                np.testing.assert_array_equal(positions, np.stack([records[r].local_positions for r in picks]))
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


# ------------------------------------------------------------------------------------------------- format 2


def test_format_2_files_are_an_arrow_file_and_memory_mapped_arrays(stores, records):
    path = stores["v2"]
    assert [p.name for p in store_files(path)] == ["shard-0.arrow", "shard-0.local.npy", "shard-0.local_positions.npy"]
    with pa.ipc.open_file(pa.memory_map(str(path))) as reader:
        assert reader.num_record_batches == 10
        assert reader.schema.names == ["id", "source", "width", "height", "caption", "metadata",
                                       "has_local", "has_local_positions"]
        assert json.loads(reader.schema.metadata[b"stair_search"]) == {"format": 2, "num_local": M, "dim": D}
    paths = array_paths(path)
    np.testing.assert_array_equal(np.load(paths["local"])[1234], records[1234].local)
    assert np.load(paths["local_positions"]).shape == (2500, M, 2)


def test_opening_format_2_copies_nothing_into_memory(stores):
    """The Arrow table points into the memory map: opening allocates next to nothing of the file's size (the
    presence bits unpacked to numpy bools), where reading the file into memory allocates all of it."""
    size = stores["v2"].stat().st_size
    before = pa.total_allocated_bytes()
    store = FeatureStore.open(stores["v2"])
    allocated = pa.total_allocated_bytes() - before
    assert allocated < 0.02 * size, allocated
    with pa.OSFile(str(stores["v2"])) as handle:  # the same read without the map copies the file
        copied = pa.ipc.open_file(handle).read_all()
        assert pa.total_allocated_bytes() - before - allocated > 0.9 * size
        del copied
    assert len(store.rows(range(2500), ["caption"])) == 2500
    store.close()


def test_reads_after_close_fail_clearly_and_reads_under_way_finish(stores, records):
    store = FeatureStore.open(stores["v2"])
    results: list[object] = []

    def reader() -> None:
        for _ in range(200):
            try:
                results.append(store.local_features([3, 2000])[0])
            except ValueError as exc:
                assert "closed" in str(exc)
                results.append("closed")

    thread = threading.Thread(target=reader)
    thread.start()
    store.close()
    thread.join()
    for result in results:
        assert isinstance(result, str) or np.array_equal(result, np.stack([records[3].local, records[2000].local]))
    with pytest.raises(ValueError, match="closed"):
        store.rows([0])
    store.close()  # twice is harmless


def test_a_missing_or_mismatched_array_file_is_a_clear_error(tmp_path, rng):
    path = tmp_path / "features.arrow"
    write_features(path, make_records(5, rng))
    local = array_paths(path)["local"]
    good = local.read_bytes()
    np.save(local, np.zeros((4, M, D), np.float16))  # another write's array: one row short
    with pytest.raises(ValueError, match="different writes"):
        FeatureStore.open(path)
    np.save(local, np.zeros((5, M, D), np.float32))
    with pytest.raises(ValueError, match="float32"):
        FeatureStore.open(path)
    local.write_bytes(good)
    assert len(FeatureStore.open(path)) == 5
    local.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(local))):
        FeatureStore.open(path)


def test_local_shapes_must_agree(tmp_path, rng):
    records = make_records(3, rng)
    records[2].local = rng.standard_normal((M, D + 1)).astype(np.float16)
    with pytest.raises(ValueError, match="doc-00002"):
        write_features(tmp_path / "x.arrow", records)
    records = make_records(3, rng)
    records[1].local_positions = np.zeros((M + 1, 2), dtype=np.float16)
    with pytest.raises(ValueError, match="local_positions"):
        write_features(tmp_path / "x.arrow", records)
    assert list(tmp_path.iterdir()) == []


def test_other_float_dtypes_are_stored_as_float16(tmp_path, rng):
    records = make_records(3, rng)
    records[1].local = records[1].local.astype(np.float32)
    write_features(tmp_path / "x.arrow", records)
    got = FeatureStore.open(tmp_path / "x.arrow").rows([1])[0]["local"]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, records[1].local.astype(np.float16))


def test_duplicate_and_empty_ids_are_refused(tmp_path, rng):
    records = make_records(4, rng)
    records[3].id = records[1].id
    with pytest.raises(ValueError, match="doc-00001"):
        write_features(tmp_path / "x.arrow", records)
    records = make_records(4, rng)
    records[2].id = ""
    with pytest.raises(ValueError, match="non-empty"):
        write_features(tmp_path / "x.arrow", records)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_file_and_keeps_the_old_store(tmp_path, rng):
    records = make_records(600, rng)
    records[550].metadata = {"bad": object()}  # fails in the third batch, after two were written
    fresh = tmp_path / "fresh.arrow"
    with pytest.raises(ValueError, match="doc-00550"):
        write_features(fresh, records, batch_size=256)
    assert list(tmp_path.iterdir()) == []

    existing = tmp_path / "existing.arrow"
    write_features(existing, make_records(3, rng))
    before = {p.name: p.read_bytes() for p in store_files(existing)}
    with pytest.raises(ValueError, match="JSON"):
        write_features(existing, records, batch_size=256)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # all three files, untouched
    assert len(FeatureStore.open(existing)) == 3


def test_rewrite_replaces_the_old_store(tmp_path, rng):
    path = tmp_path / "shard.arrow"
    write_features(path, make_records(3, rng))
    records = make_records(7, rng)
    write_features(path, records, batch_size=2)
    store = FeatureStore.open(path)
    assert len(store) == 7
    np.testing.assert_array_equal(store.local_features([6])[0][0], records[6].local)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard.arrow", "shard.local.npy",
                                                           "shard.local_positions.npy"]


def test_open_refuses_missing_and_foreign_files(tmp_path):
    missing = tmp_path / "nowhere.arrow"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        FeatureStore.open(missing)
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"id": ["a", "b"], "x": [1, 2]}), foreign)
    with pytest.raises(ValueError, match="not a stair_search feature store"):
        FeatureStore.open(foreign)
    foreign_arrow = tmp_path / "foreign.arrow"
    with pa.OSFile(str(foreign_arrow), "wb") as sink, pa.ipc.new_file(sink, pa.schema([("id", pa.string())])) as w:
        w.write_table(pa.table({"id": ["a"]}))
    with pytest.raises(ValueError, match="not a stair_search feature store"):
        FeatureStore.open(foreign_arrow)
    junk = tmp_path / "junk.arrow"
    junk.write_bytes(b"not arrow or parquet at all")
    with pytest.raises(ValueError, match=re.escape(str(junk))):
        FeatureStore.open(junk)
    truncated = tmp_path / "truncated.arrow"
    write_features(truncated, make_records(3, np.random.default_rng(1)))
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(ValueError, match=re.escape(str(truncated))):
        FeatureStore.open(truncated)


def test_a_shard_folder_opens_whichever_store_it_has(tmp_path, rng):
    records = make_records(3, rng)
    assert store_path(tmp_path) == tmp_path / FEATURES_FILE  # neither: errors name the current file
    write_v1(tmp_path / LEGACY_FEATURES_FILE, records)
    assert store_path(tmp_path) == tmp_path / LEGACY_FEATURES_FILE
    assert store_files(store_path(tmp_path)) == [tmp_path / LEGACY_FEATURES_FILE]
    assert FeatureStore.open(store_path(tmp_path)).ids == [r.id for r in records]
    write_features(tmp_path / FEATURES_FILE, records[:2])
    assert store_path(tmp_path) == tmp_path / FEATURES_FILE
    assert len(FeatureStore.open(store_path(tmp_path))) == 2


# ------------------------------------------------------------------------------------------------- format 1


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


def test_v1_row_lookup_decodes_only_the_row_group_that_holds_it(stores, records, tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(stores["v1"].read_bytes())
    assert pq.ParquetFile(path).num_row_groups == 10
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


def test_v1_local_features_decode_only_local_columns_of_needed_groups(stores, records, tmp_path):
    path = tmp_path / "corrupt.parquet"
    path.write_bytes(stores["v1"].read_bytes())
    corrupt_except(path, lambda g, name: name == "id" or (g in (2, 9) and name in ("local", "local_positions")))
    store = FeatureStore.open(path)
    wanted = [2400, 600, 2499]
    local, positions = store.local_features(wanted)
    np.testing.assert_array_equal(local, np.stack([records[r].local for r in wanted]))
    np.testing.assert_array_equal(positions, np.stack([records[r].local_positions for r in wanted]))
    with pytest.raises((OSError, pa.ArrowException)):
        store.rows([600], columns=["caption"])  # same group, other column: corrupted, so never read above


def test_v1_and_v2_answer_every_read_identically(tmp_path, rng):
    records = make_records(50, rng)
    for i in (3, 17, 40):
        records[i].local = records[i].local_positions = None
    records[8].local_positions = None
    v1 = FeatureStore.open(write("v1", tmp_path / "a", records, rows_per_part=16))
    v2 = FeatureStore.open(write("v2", tmp_path / "a", records, rows_per_part=16))
    assert (v1.ids, v1.num_local, v1.dim, len(v1)) == (v2.ids, v2.num_local, v2.dim, len(v2))
    wanted = rng.integers(0, 50, size=45).tolist()
    for got1, got2 in zip(v1.rows(wanted), v2.rows(wanted), strict=True):
        assert got1.keys() == got2.keys()
        for name in got1:
            if isinstance(got1[name], np.ndarray):
                np.testing.assert_array_equal(got1[name], got2[name])
            else:
                assert got1[name] == got2[name], name
    for a, b in zip(v1.local_features(wanted), v2.local_features(wanted), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_format_1_file_must_say_format_1(tmp_path, rng):
    path = tmp_path / "odd.parquet"
    write_v1(path, make_records(2, rng))
    table = pq.read_table(path)
    meta = {b"stair_search": json.dumps({"format": 2, "num_local": M, "dim": D}).encode()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(ValueError, match="format 2; a file of this kind must be format 1"):
        FeatureStore.open(path)
