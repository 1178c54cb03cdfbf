"""End to end: encoder -> IndexWriter (several shards) -> IndexReader / QueryRouter -> CLI, on images drawn here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from stair_search.cli import app
from stair_search.encode import Encoder
from stair_search.index import FeatureRecord, IndexMismatchError, IndexReader, IndexWriter, Manifest, ShardQuery
from stair_search.models import StairConfig, create_model, save_checkpoint
from stair_search.retrieve import QueryRouter, SearchRequest
from tests.conftest import COLOURS, TINY_CONFIG, draw_shape

SHAPES = ("circle", "square", "triangle")


def shape_records():
    items = [(c, s, bg) for c in COLOURS for s in SHAPES for bg in ("white", "black")]
    images = [draw_shape(c, s, background=bg) for c, s, bg in items]
    records = [FeatureRecord(id=f"{c}-{s}-{bg}", source=f"drawn://{c}/{s}/{bg}", width=64, height=64,
                             caption=f"a {c} {s} on {bg}", metadata={"colour": c}) for c, s, bg in items]
    return records, images


def build(index_dir, encoder, shard_size=10, **kwargs):
    records, images = shape_records()
    with IndexWriter(index_dir, encoder.record, shard_size=shard_size, **kwargs) as writer:
        for start in range(0, len(records), 7):  # batches that do not line up with shards
            writer.add(records[start : start + 7], encoder.encode_images(images[start : start + 7]))
        return writer.commit(), records, images


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_config_path):
    encoder = Encoder(create_model(str(tiny_config_path), device="cpu"))
    index_dir = tmp_path_factory.mktemp("idx") / "shapes"
    return index_dir, encoder, *build(index_dir, encoder)


def test_manifest_records_shards_model_and_counts(built):
    index_dir, encoder, manifest, records, _ = built
    loaded = Manifest.load(index_dir)
    assert loaded.to_dict() == manifest.to_dict()
    assert loaded.count == len(records) == 24
    # One shard-cutting rule: whole batches (7) queue until shard_size (10) is reached: 7 + 7, then 7 + 3.
    assert [s.count for s in loaded.shards] == [14, 10]
    assert loaded.model["fingerprint"] == encoder.fingerprint
    assert loaded.shards[0].dense["kind"] == "flat"
    # The build folder was renamed into place and the mutation lock removed: nothing stays beside the index.
    assert not any(p.name.startswith(".shapes") for p in index_dir.parent.iterdir())


def test_each_image_finds_itself_first_by_dense_and_by_sparse(built):
    index_dir, encoder, _, records, images = built
    router = QueryRouter(IndexReader(index_dir), encoder)
    for record, image in list(zip(records, images, strict=True))[::5]:
        for mode in ("dense", "sparse", "hybrid"):
            assert router.search(SearchRequest(image=image, mode=mode, k=3)).hits[0].id == record.id, mode


def test_sharded_search_equals_a_single_shard_index(built, tmp_path):
    index_dir, encoder, _, _, images = built
    build(tmp_path / "one", encoder, shard_size=1000)
    many, one = QueryRouter(IndexReader(index_dir), encoder), QueryRouter(IndexReader(tmp_path / "one"), encoder)
    for image in images[:6]:
        for mode in ("dense", "sparse"):
            request = SearchRequest(image=image, mode=mode, k=8)
            a, b = many.search(request).hits, one.search(request).hits
            np.testing.assert_allclose([h.score for h in a], [h.score for h in b], rtol=1e-5)
            assert {h.id for h in a if h.score > a[-1].score} == {h.id for h in b if h.score > b[-1].score}


def test_hits_carry_metadata_parts_and_explanations(built):
    index_dir, encoder = built[:2]
    response = QueryRouter(IndexReader(index_dir), encoder).search(SearchRequest(text="a red circle", mode="hybrid",
                                                                                 k=5, explain=True))
    assert response.fusion == "rrf" and len(response.hits) == 5
    for hit in response.hits:
        assert hit.source.startswith("drawn://") and hit.metadata["colour"] in COLOURS
        assert set(hit.parts) <= {"sparse", "dense"} and hit.parts
        if "sparse" in hit.parts:
            assert hit.matched, "a sparse hit shares at least one token with the query"
            assert sum(q * d for q, d in hit.matched.values()) == pytest.approx(hit.parts["sparse"], rel=0.05)
    dense_only = QueryRouter(IndexReader(index_dir), encoder).search(SearchRequest(text="a red circle", mode="dense",
                                                                                   k=3))
    assert dense_only.fusion is None and dense_only.hits[0].parts["dense"] == dense_only.hits[0].score


def test_an_encoder_with_other_weights_is_refused(built):
    index_dir = built[0]
    other = StairConfig.from_dict({**TINY_CONFIG, "seed": 99})
    with pytest.raises(IndexMismatchError, match=r"model weights"):
        QueryRouter(IndexReader(index_dir), Encoder(create_model(other, device="cpu")))


def test_a_deleted_shard_file_is_a_clear_error(built, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(built[0], copy)
    shard = Manifest.load(copy).shards[1]
    (shard.path(copy) / "dense.faiss").unlink()
    with pytest.raises(FileNotFoundError, match=r"dense\.faiss"):
        IndexReader(copy)


def test_existing_index_needs_append_or_overwrite(built, tmp_path):
    encoder = built[1]
    manifest, _, _ = build(tmp_path / "idx", encoder)
    with pytest.raises(FileExistsError, match="--append"):
        IndexWriter(tmp_path / "idx", encoder.record)
    appended, _, _ = build(tmp_path / "idx", encoder, append=True)
    assert appended.count == 2 * manifest.count and IndexReader(tmp_path / "idx").shard_count == 4
    replaced, _, _ = build(tmp_path / "idx", encoder, shard_size=100, overwrite=True)
    assert replaced.count == manifest.count and IndexReader(tmp_path / "idx").shard_count == 1


def test_cli_search_prints_json_hits_and_image_queries(built, tmp_path):
    index_dir, encoder, _, records, images = built
    checkpoint = save_checkpoint(encoder.model, tmp_path / "tiny.pt")
    runner = CliRunner()
    path = tmp_path / "query.png"
    images[3].save(path)
    result = runner.invoke(app, ["search", str(index_dir), "--image", str(path), "--json", "-k", "4",
                                 "--mode", "sparse", "--model", str(checkpoint)])
    assert result.exit_code == 0, result.output
    hits = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(hits) == 4 and hits[0]["id"] == records[3].id
    assert all(h["matched"] and h["parts"]["sparse"] == h["score"] for h in hits)
    result = runner.invoke(app, ["search", str(index_dir), "blue square", "--mode", "dense", "--json",
                                 "--model", str(checkpoint)])
    assert result.exit_code == 0, result.output
    assert len(result.output.strip().splitlines()) == 10
    table = runner.invoke(app, ["search", str(index_dir), "circle", "--explain", "--model", str(checkpoint)])
    assert table.exit_code == 0 and "matched" in table.output
    bad = runner.invoke(app, ["search", str(index_dir), "--image", str(tmp_path / "nope.png")])
    assert bad.exit_code != 0 and "cannot read image" in bad.output


def test_cli_index_builds_from_a_folder_and_skips_bad_files(tmp_path, tiny_config_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for colour in ("red", "blue", "green"):
        draw_shape(colour, "circle").save(folder / f"{colour}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    out = tmp_path / "index"
    result = CliRunner().invoke(app, ["index", str(folder), "--out", str(out), "--model", str(tiny_config_path)])
    assert result.exit_code == 0, result.output
    assert "indexed 3" in result.output and "skipped 2" in result.output
    index = IndexReader(out)
    assert sorted(index.documents(index.search(ShardQuery(5, dense=np.ones(32, np.float32)))["dense"], ["id"]),
                  key=lambda d: d["id"]) == [{"id": "blue.png"}, {"id": "green.png"}, {"id": "red.png"}]
    again = CliRunner().invoke(app, ["index", str(folder), "--out", str(out), "--model", str(tiny_config_path)])
    assert again.exit_code == 0 and "already complete" in again.output  # the same job, finished
    other = CliRunner().invoke(app, ["index", str(folder), "--out", str(out), "--model", str(tiny_config_path),
                                     "--batch-size", "2"])  # batching changes no document: still the same job
    assert other.exit_code == 0 and "already complete" in other.output
    other = CliRunner().invoke(app, ["index", str(folder), "--out", str(out), "--model", str(tiny_config_path),
                                     "--shard-size", "2"])
    assert other.exit_code != 0 and "--append" in str(other.exception)
    (folder / "red.png").write_bytes(b"")
    for name in ("blue.png", "green.png"):
        (folder / name).unlink()
    bad = CliRunner().invoke(app, ["index", str(folder), "--out", str(tmp_path / "none"),
                                   "--model", str(tiny_config_path)])
    assert bad.exit_code != 0 and "Nothing to index" in str(bad.exception)
    assert not (tmp_path / "none").exists()


def test_export_writes_every_live_document_batch_by_batch(built, tmp_path):
    import pyarrow.parquet as pq

    index_dir, encoder, _, records, images = built
    copy = tmp_path / "shapes"
    shutil.copytree(index_dir, copy)
    IndexReader(copy).delete([records[0].id])
    result = CliRunner().invoke(app, ["export", str(copy), "--out", str(tmp_path / "all.parquet"), "--batch-size", "5"])
    assert result.exit_code == 0 and "23 documents" in result.output, result.output
    table = pq.read_table(tmp_path / "all.parquet")
    assert table.column("id").to_pylist() == [r.id for r in records[1:]]  # the deleted one is not exported
    assert pq.ParquetFile(tmp_path / "all.parquet").metadata.num_row_groups == 5  # written 5 at a time
    expected = encoder.encode_images(images[1:])
    np.testing.assert_allclose(np.stack(table.column("dense").to_numpy(zero_copy_only=False)), expected.dense,
                               atol=1e-5)
    first = dict(table.column("sparse")[0].as_py())
    assert first == pytest.approx(IndexReader(copy).sparse_vectors([IndexReader(copy).find(records[1].id)])[0])
    assert first and json.loads(table.column("metadata")[0].as_py()) == records[1].metadata
    CliRunner().invoke(app, ["export", str(copy), "--out", str(tmp_path / "dense.npy"), "--format", "npy"])
    np.testing.assert_allclose(np.load(tmp_path / "dense.npy"), expected.dense, atol=1e-5)
    bad = CliRunner().invoke(app, ["export", str(copy), "--out", str(tmp_path), "--format", "npy"])
    assert bad.exit_code != 0 and "is a folder" in str(bad.exception)


def test_a_manifest_naming_a_path_outside_the_index_is_refused_and_nothing_is_written_there(built, tmp_path):
    """A shard or tombstone name with ``../`` in the manifest is refused (one line naming the file, exit 1), by
    search and by delete alike, and nothing is read or written outside the index."""
    index_dir, _, manifest, _, _ = built
    other = tmp_path / "other"
    shutil.copytree(index_dir, other)
    for field, name in (("name", f"../../other/shards/{manifest.shards[0].name}"), ("deleted", "../../x.npy")):
        copy = tmp_path / f"tampered-{field}"
        shutil.copytree(index_dir, copy)
        data = json.loads((copy / "manifest.json").read_text())
        data["shards"][0][field] = name
        (copy / "manifest.json").write_text(json.dumps(data))
        with pytest.raises(ValueError, match="not a plain file name inside the index"):
            IndexReader(copy)
        before = sorted(p.name for p in other.rglob("*"))
        for args in (["delete", str(copy), "red-circle-white"], ["search", str(copy), "red"]):
            done = subprocess.run([sys.executable, "-m", "stair_search.cli", *args], capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 1 and "not a plain file name" in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1
        assert sorted(p.name for p in other.rglob("*")) == before  # no tombstone written into the other index
