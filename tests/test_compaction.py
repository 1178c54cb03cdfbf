"""Compaction, the merge policy and deletes that cost nothing (issue 37).

Compaction rewrites shards through the one writer, so these tests check what a user relies on: every answer of
the golden cases is the same before and after (the text route's BM25 statistics excepted: they counted deleted
rows, and after compaction they are exactly those of an index built at once from the live documents, which is
checked too); a ``kill -9`` at every step of ``stair-search compact`` leaves the index answering as before (the
kill mechanism and command processes of tests/test_publish_atomic.py); a serving registry swaps the compacted
version in while a request holding the old one still answers; small appends stay one shard below the merge floor; and a
shard whose best rows are deleted still returns k live documents without asking its parts for k + deleted rows.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stair_search.index import FeatureRecord, IndexReader, IndexWriter, Manifest, ShardQuery, delete_documents
from stair_search.index.compact import (
    MergePolicy,
    compact,
    parse_policy,
    plan_compaction,
    plan_policy,
    read_policy,
    set_merge_policy,
)
from stair_search.index.dense import DenseShard, DenseSpec
from stair_search.index.layout import MANIFEST, TOMBSTONE_PREFIX
from stair_search.index.manifest import ShardInfo
from stair_search.index.publish import INTENT_FILE
from stair_search.index.sparse import DEFAULT_SCALE, to_csr
from stair_search.retrieve import QueryRouter
from tests.conftest import COLOURS, draw_shape
from tests.test_golden import BACKGROUNDS, CASES, DELETED, SHAPES, build_index, differences, outcome
from tests.test_publish_atomic import Commands, assert_clean, kill

ITEMS = [(c, s, bg) for bg in BACKGROUNDS for c in COLOURS for s in SHAPES]
# Golden cases of the main index: every mode and route, filters on each, paging, feedback, vectors, more-like-this
# and a reranker (all of them, with the rest of the golden cases, compare equal too: 41 cases, 3x slower).
MAIN_CASES = ["sparse", "sparse_explain", "dense", "hybrid_rrf", "hybrid_convex", "auto_keyword", "auto_image",
              "text_mode", "text_mode_deleted_doc", "filter_equality", "filter_any_of_list",
              "filter_range_past_the_deleted", "filter_text_mode", "page_hybrid", "feedback_dense", "rerank_bsap",
              "vectors_both_convex_filtered_paged", "more_like_dense_filtered", "more_like_deleted"]
# Cases whose answer reads the text route's BM25 statistics, which counted the deleted rows before compaction.
BM25_CASES = {"auto_keyword", "text_mode", "text_mode_deleted_doc", "filter_text_mode"}


def answers(path: Path, encoder: Any) -> dict[str, Any]:
    router = QueryRouter(IndexReader(path), encoder)
    try:
        return {name: outcome(router, CASES[name], {"<index>": str(path)}) for name in MAIN_CASES}
    finally:
        router.close()


def stored(path: Path) -> dict[str, tuple]:
    """Every live document's stored fields, dense vector and sparse vector, by id."""
    with IndexReader(path) as index:
        found: dict[str, tuple] = {}
        for batch in index.live():
            docs = index.documents(batch)
            for doc, vector, sparse in zip(docs, index.vectors(batch), index.sparse_vectors(batch), strict=True):
                found[doc["id"]] = (doc["source"], doc["caption"], doc["metadata"], vector.tolist(), sparse)
        return found


def build_live(folder: Path, encoder: Any) -> Path:
    """The golden main index's live documents (same ids, fields and ``n``) in one shard, built at once."""
    kept = [(n, item) for n, item in enumerate(ITEMS) if "-".join(item) not in DELETED]
    records = [FeatureRecord(id=f"{c}-{s}-{bg}", source=f"drawn://{c}/{s}/{bg}", width=64, height=64,
                             caption=f"a {c} {s} on {bg}", metadata={"colour": c, "shape": s, "background": bg, "n": n})
               for n, (c, s, bg) in kept]
    with IndexWriter(folder, encoder.record, shard_size=100) as writer:
        writer.add(records, encoder.encode_images([draw_shape(c, s, background=bg) for _, (c, s, bg) in kept]))
        writer.commit()
    return folder


def test_compaction_answers_every_mode_as_before_and_as_an_index_built_at_once(tmp_path, tiny_encoder):
    main = build_index(tmp_path / "main", tiny_encoder, ITEMS, 8, DELETED)
    before, documents = answers(main, tiny_encoder), stored(main)
    result = compact(main)
    shards = Manifest.load(main).shards
    assert (result.shards_before, result.shards_after, result.purged) == (3, 1, 2) and len(shards) == 1
    assert shards[0].deleted is None and shards[0].count == 22
    assert stored(main) == documents  # ids, stored fields, dense and sparse vectors unchanged
    after = answers(main, tiny_encoder)
    changed = {name for name in MAIN_CASES if differences(before[name], after[name], name)}
    assert changed <= BM25_CASES, sorted(changed - BM25_CASES)
    once = answers(build_live(tmp_path / "once", tiny_encoder), tiny_encoder)
    found = [d for name in MAIN_CASES for d in differences(once[name], after[name], name)]
    assert not found, found[:10]
    assert compact(main).rewritten == 0  # nothing left to do


# ------------------------------------------------------------------------------------------------ kill -9


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    zygote = Commands(tmp_path_factory.mktemp("disk"))
    yield zygote
    zygote.close()


def first_stage(path: Path) -> dict[str, list[tuple[str, float]]]:
    """A sparse + dense first stage with a stored document's own vectors: (id, score) per route. Its top 4: the
    in-process sparse searcher (Seismic) is approximate in its tail, in any shard it is built for."""
    with IndexReader(path) as index:
        first = next(index.live())[:1]
        hits = index.search(ShardQuery(4, sparse=index.sparse_vectors(first)[0], dense=index.vectors(first)[0]))
        return {route: [(d["id"], round(c.score, 5)) for d, c in zip(index.documents(found, ["id"]), found,
                                                                      strict=True)]
                for route, found in hits.items()}


COMPACT_KILLS = [
    kill("stair_search.index.writer:write_shard", "after"),  # the new shard built beside the index, unpublished
    kill("os:replace", "after", INTENT_FILE),  # the intent written, nothing moved
    kill("stair_search.index.publish:move_in", "after"),  # the new shard moved in, no manifest names it
    kill("os:replace", "before", MANIFEST),  # the new manifest written and synced, not renamed
]


def test_kill_9_at_every_step_of_compact_leaves_the_index_answering_and_the_rerun_finishes(tmp_path, tiny_encoder,
                                                                                           commands):
    out = build_index(tmp_path / "index", tiny_encoder, ITEMS[:8], 4, DELETED[:1])
    expected, ids = first_stage(out), sorted(stored(out))
    for step, hook in enumerate(COMPACT_KILLS):
        killed = commands.run(["compact", str(out)], [hook], tmp_path / f"kill{step}.log")
        assert killed.returncode == -signal.SIGKILL, killed.output
        assert first_stage(out) == expected and sorted(stored(out)) == ids, hook
        rerun = commands.run(["compact", str(out)], [], tmp_path / f"rerun{step}.log")
        assert rerun.returncode == 0, rerun.output
        assert len(Manifest.load(out).shards) == 1 and first_stage(out) == expected, rerun.output
        assert_clean(out)
        delete_documents(out, [ids.pop()])  # something to compact again: a tombstone in the one shard
        expected = first_stage(out)


def test_a_serving_registry_swaps_in_the_compacted_index_while_a_request_keeps_the_old(tmp_path, tiny_encoder):
    from server import IndexRegistry

    out = build_index(tmp_path / "index", tiny_encoder, ITEMS[:12], 4, DELETED[:1])
    registry = IndexRegistry({"x": out}, batching=False)
    try:
        with registry.lease("x") as old:
            expected = first_stage(out)
            compact(out)
            assert registry.refresh() == ["x"] and registry.current("x").number == 2
            assert registry.current("x").index.shard_count == 1 and old.index.shard_count == 3
            first = next(old.index.live())[:1]  # the old version's parts (retired, not removed) still answer
            query = ShardQuery(4, dense=old.index.vectors(first)[0])
            assert [c.score for c in old.index.search(query)["dense"]] == pytest.approx(
                [score for _, score in expected["dense"]], abs=1e-4)
        assert old.closed and first_stage(out) == expected
    finally:
        for name in registry.names:
            registry.current(name).retire()


# ------------------------------------------------------------------------------------------------ the policy


def synthetic(encoder: Any, prefix: str, count: int, seed: int) -> tuple[list[FeatureRecord], np.ndarray, Any]:
    """``count`` documents with random unit vectors and random sparse vectors (no encoding: appends are cheap)."""
    rng = np.random.default_rng(seed)
    record = encoder.record
    dense = rng.standard_normal((count, record.embed_dim)).astype(np.float32)
    dense /= np.linalg.norm(dense, axis=1, keepdims=True)
    tokens = record.vocabulary.tokens
    sparse = [{tokens[t]: float(rng.uniform(0.1, 2.0)) for t in 1000 + rng.choice(40, 6, replace=False)}
              for _ in range(count)]
    records = [FeatureRecord(id=f"{prefix}{i}", source=f"synthetic://{prefix}{i}", width=1, height=1,
                             metadata={"even": i % 2 == 0}) for i in range(count)]
    return records, dense, to_csr(sparse, record.vocabulary, DEFAULT_SCALE)


def append(out: Path, encoder: Any, prefix: str, count: int, seed: int, merge: bool | None = None,
           dense_spec: DenseSpec | None = None) -> Manifest:
    records, dense, csr = synthetic(encoder, prefix, count, seed)
    with IndexWriter(out, encoder.record, append=True, text_fields=None, merge=merge,
                     dense_spec=dense_spec) as writer:
        writer.add_quantised(records, dense, csr)
        return writer.commit()


def test_small_appends_stay_one_shard_below_the_floor(tmp_path, tiny_encoder):
    out, appends = tmp_path / "index", 12  # every append after the first merges the same way: 12 show it as 30 did
    counts = [len(append(out, tiny_encoder, f"a{n}-", 3, n).shards) for n in range(appends)]
    assert counts == [1] * appends, counts  # below the floor (2,000 documents): each append merged into the shard
    manifest = Manifest.load(out)
    assert manifest.count == 3 * appends and sum(s.count for s in manifest.shards) == 3 * appends
    with IndexReader(out) as index:
        assert sorted(index.ids()) == sorted(f"a{n}-{i}" for n in range(appends) for i in range(3))
    # switched off: per append (--no-merge) and in the manifest (merge-policy INDEX off)
    assert [len(append(out, tiny_encoder, f"b{n}-", 3, 100 + n, merge=False).shards) for n in range(3)] == \
        [counts[-1] + n + 1 for n in range(3)]
    set_merge_policy(out, parse_policy(["off"], read_policy(out)))
    assert len(append(out, tiny_encoder, "c-", 3, 200).shards) == counts[-1] + 4
    assert not read_policy(out).enabled and Manifest.load(out).merge_policy["enabled"] is False
    set_merge_policy(out, parse_policy(["on", "min_deleted=1"], read_policy(out)))
    assert len(append(out, tiny_encoder, "d-", 3, 300).shards) == 1  # on again: the next append merges them all


def test_a_shard_past_the_deleted_fraction_is_rewritten_by_the_next_delete(tmp_path, tiny_encoder):
    out = tmp_path / "index"
    append(out, tiny_encoder, "x", 10, 1)
    set_merge_policy(out, MergePolicy(min_deleted=3, deleted_fraction=0.3))
    delete_documents(out, ["x0", "x1", "x2"])  # 3 of 10: at the fraction, not past it
    assert Manifest.load(out).shards[0].deleted_count == 3
    delete_documents(out, ["x3"])  # 4 of 10: rewritten without them
    shard = Manifest.load(out).shards[0]
    assert (shard.count, shard.deleted_count, shard.deleted) == (6, 0, None)
    with IndexReader(out) as index:
        assert sorted(index.ids()) == [f"x{i}" for i in range(4, 10)]


def test_plans_keep_runs_adjacent_and_within_the_shard_size():
    def shards(*lives: int, deleted: int = 0) -> list[ShardInfo]:
        return [ShardInfo(name=f"s{i}", count=n + deleted, dense={}, deleted_count=deleted)
                for i, n in enumerate(lives)]

    assert plan_compaction(shards(5, 5, 5, 5), 10) == [[0, 1], [2, 3]]
    assert plan_compaction(shards(10, 10), 10) == []  # full shards without deletes stay
    assert plan_compaction(shards(10, 10, deleted=1), 10) == [[0], [1]]
    policy = MergePolicy(tier_size=3, floor=10)
    # below the floor (after an append): every adjacent pair, until one shard is left or the next would pass it
    assert plan_policy(shards(3, 3, 3), policy, 100) == [[0, 1, 2]]
    assert plan_policy(shards(3, 3), policy, 100) == [[0, 1]]
    assert plan_policy(shards(8, 3, 3), policy, 100) == [[0, 1, 2]]  # 3+3 is 6, still below: then 8+6
    assert plan_policy(shards(12, 3, 3), policy, 100) == [[1, 2]]  # a shard past the floor is left alone
    assert plan_policy(shards(50, 3, 3, 3), policy, 100) == [[1, 2, 3]]  # the big shard is left alone
    assert plan_policy(shards(3, 3, 3), policy, 8) == [[1, 2]]  # only as much as fits the shard size
    # after a delete alone: tier_size adjacent shards of one tier (below 10, 10..29, 30..89, ...), as after appends
    assert plan_policy(shards(3, 3), policy, 100, appended=False) == []
    assert plan_policy(shards(3, 3, 3), policy, 100, appended=False) == [[0, 1, 2]]
    assert plan_policy(shards(12, 12, 12), policy, 100, appended=False) == [[0, 1, 2]]
    assert plan_policy(shards(12, 12, 40), policy, 100) == []
    assert plan_policy(shards(3, 3, 3), MergePolicy(enabled=False), 100) == []
    with pytest.raises(ValueError, match="unknown setting"):
        MergePolicy.from_dict({"tiers": 3})
    with pytest.raises(ValueError, match="use off, on or NAME=VALUE"):
        parse_policy(["fast"], MergePolicy())


# ------------------------------------------------------------------------------------------------ deletes


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_a_deleted_heavy_shard_returns_k_live_documents_without_a_deeper_first_ask(tmp_path, tiny_encoder,
                                                                                  monkeypatch, kind):
    out = tmp_path / "index"
    append(out, tiny_encoder, "d", 200, 5, merge=False, dense_spec=DenseSpec(kind))
    records, dense, _ = synthetic(tiny_encoder, "d", 200, 5)
    query = dense[0]
    order = np.argsort(-(dense @ query), kind="stable")
    doomed = [records[i].id for i in order[:150]]  # the query's 150 best rows, the rest stay
    set_merge_policy(out, MergePolicy(enabled=False))
    assert len(delete_documents(out, doomed).deleted) == 150
    live = [i for i in order if records[i].id not in set(doomed)]
    asked: list[tuple[int, int]] = []  # (rows the searched FAISS index holds, rows asked of it)
    search = DenseShard.search
    monkeypatch.setattr(DenseShard, "search",
                        lambda self, q, n: (asked.append((self.ntotal, n)), search(self, q, n))[1])
    with IndexReader(out) as index:
        hits = index.search(ShardQuery(10, dense=query))["dense"]
        assert [d["id"] for d in index.documents(hits, ["id"])] == [records[i].id for i in live[:10]]
        if kind == "flat":  # searched through a copy without the deleted rows: k asked of 50 rows, once
            assert asked == [(50, 10)], asked
        else:  # HNSW keeps them: k + at most k first, deeper only while too few are live
            assert asked[0] == (200, 20) and len(asked) > 1, asked
        assert np.allclose(index.vectors(hits), dense[live[:10]], atol=1e-6)
        filtered = index.search(ShardQuery(10, dense=query, filter=index.check_filter({"even": True})))["dense"]
        assert [d["id"] for d in index.documents(filtered, ["id"])] == [
            records[i].id for i in live if i % 2 == 0][:10]
        sparse = index.search(ShardQuery(10, sparse=index.sparse_vectors(hits[:1])[0]))["sparse"]
        assert len(sparse) == 10 and all(d is not None for d in index.documents(sparse, ["id"]))
    tombstones = list(out.glob(f"shards/*/{TOMBSTONE_PREFIX}*"))
    assert len(tombstones) == 1


@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_a_dense_index_without_some_rows_searches_and_reads_the_others_by_their_own_numbers(kind):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((700, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    full = DenseShard.build(vectors, DenseSpec(kind, {"nlist": 4, "m": 4, "nbits": 4, "nprobe": 4}
                                                if kind == "ivfpq" else {}))
    assert full.spec.kind == kind
    dropped = np.sort(rng.choice(700, 300, replace=False))
    kept = np.setdiff1d(np.arange(700), dropped)
    copy = full.without(dropped)
    assert copy is not None and copy.ntotal == 400 and full.ntotal == 700  # the index it came from is unchanged
    queries = vectors[:5] + 0.1 * rng.standard_normal((5, 16)).astype(np.float32)
    scores, rows = copy.search(queries, 10)
    all_scores, all_rows = full.search(queries, 700)
    for q in range(5):  # the full index's ranking with the dropped rows taken out
        keep = np.isin(all_rows[q], kept)
        assert rows[q].tolist() == all_rows[q][keep][:10].tolist()
        assert np.allclose(scores[q], all_scores[q][keep][:10], atol=1e-5)
    assert np.allclose(copy.reconstruct(kept[:20]), full.reconstruct(kept[:20]), atol=1e-6)
    with pytest.raises((ValueError, RuntimeError)):
        copy.reconstruct(dropped[:1])
    assert DenseShard.build(vectors, DenseSpec("hnsw")).without(dropped) is None  # no removal from its graph
