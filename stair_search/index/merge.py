"""Merging shards, for compaction and the merge policy: an index that is appended to and deleted from for years
stays as fast as one built at once.

Why: every append adds at least one shard and every delete only writes a tombstone, so without merging an index
that gets the day's photos every night holds 365 shards after a year (each costs every query a search per route),
and its deleted rows stay in every part. Two ways out, both through the one :class:`IndexWriter` (no second
writer): the live rows of a run of adjacent shards are read back (stored fields, local features, the stored
sparse impacts and the dense vectors FAISS holds) and added to the writer again, in row order, as one new shard
that takes the run's place in the manifest (``IndexWriter.replace``). The writer publishes that as any other
change (index/publish.py: the new shards moved in, then the manifest in one rename; the replaced shards retire
and go after their grace), so a reader sees the old or the new version, never a mixture, and a kill at any
moment leaves the old index.

Keeping runs adjacent and rows in order keeps every live document's (shard, row) order, so equal scores still
break the same way and sparse and dense scores are unchanged. The text route's BM25 and ``idf`` query weights
read corpus statistics, which count deleted rows until the shard is rewritten: after compaction they are those of
the live documents, as in an index built at once from them.

* ``compact.compact`` (``stair-search compact INDEX``): every shard with deleted rows is rewritten and adjacent
  shards are packed into as few as ``shard_size`` allows.
* :class:`MergePolicy`, applied by the writer after each append and delete: tiered, in the spirit of Lucene's
  TieredMergePolicy and its floor segment size. Every shard below ``floor`` live documents counts as
  floor-sized: after an append, two adjacent ones are merged into one (so an index stays one shard until it
  passes the floor, then holds at most one shard below it, after the larger ones; a delete alone merges none of
  them, see ``plan_policy``). Above the floor, one tier per factor ``tier_size``, and ``tier_size`` adjacent
  shards of one tier are merged whenever their sum fits ``shard_size``: the number of shards grows with the
  logarithm of the index's size, and each document is rewritten a logarithmic number of times. A shard whose
  deleted fraction passes ``deleted_fraction`` is rewritten (once it holds ``min_deleted`` deleted rows: a few
  cost a query almost nothing, ``shard._live``). Stored in the manifest (``merge_policy``), switched off with
  ``enabled: false``.

  Why a floor: a query costs every shard a fixed ~0.2 ms on the sparse route (Seismic's call and the exact
  re-scoring) and ~0.03 ms on the dense one whatever its size, about what 2,000 more documents cost it
  (``benchmarks/index_lifecycle.py``), so shards smaller than that are what made an appended index slow.
  Rewriting a small shard costs little, so they are merged at once; the price, as in Lucene, is that below the
  floor an append rewrites the small shard it joins (up to ``floor`` documents, about a second).

IVF-PQ shards are re-trained on their decoded vectors when rewritten (flat and HNSW hold exact vectors).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from stair_search.index.dense import DenseShard, DenseSpec
from stair_search.index.layout import DENSE_FILE, SPARSE_DIR, read_tombstone
from stair_search.index.manifest import Manifest, ModelRecord, ShardInfo
from stair_search.index.sparse import CSR, CSR_FILES, _load_csr_part
from stair_search.index.store import FeatureRecord, FeatureStore, store_path
from stair_search.vocabulary import Vocabulary

DEFAULT_SHARD_SIZE = 100_000  # the writer's and the job's default
READ_BATCH = 4096  # live rows read back at a time from a shard being rewritten


@dataclass(frozen=True)
class MergePolicy:
    """When the writer merges shards by itself (see the module docstring); ``shard_size`` None: the writer's."""

    enabled: bool = True
    tier_size: int = 5  # this many adjacent shards of one tier above the floor are merged into one
    floor: int = 2_000  # shards with fewer live documents count as floor-sized: two adjacent ones are merged
    # a shard with more of its rows deleted is rewritten ... (its deleted rows stay in Seismic's posting lists: a
    # 30%-deleted shard's sparse route costs 1.2-1.3x the compacted one's, a 20%-deleted one's 1.1x)
    deleted_fraction: float = 0.2
    min_deleted: int = 100  # ... once it holds this many deleted rows (a few cost less than a rewrite)
    shard_size: int | None = None

    def __post_init__(self) -> None:
        if self.tier_size < 2 or self.floor < 1 or self.min_deleted < 1:
            raise ValueError(f"merge policy: tier_size must be 2 or more, floor and min_deleted 1 or more, got "
                             f"tier_size {self.tier_size}, floor {self.floor}, min_deleted {self.min_deleted}")
        if not 0 < self.deleted_fraction <= 1:
            raise ValueError(f"merge policy: deleted_fraction must be in (0, 1], got {self.deleted_fraction}")
        if self.shard_size is not None and self.shard_size < 1:
            raise ValueError(f"merge policy: shard_size must be 1 or more, got {self.shard_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> MergePolicy:
        """The policy a manifest records (None: the defaults); unknown keys are a ValueError naming them."""
        data = dict(data or {})
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"merge policy: unknown setting(s) {unknown}; known: {[f.name for f in fields(cls)]}")
        return cls(**data)

    def tier(self, live: int) -> int:
        """0 below ``floor``, then one more per factor ``tier_size``."""
        return 0 if live < self.floor else 1 + int(math.log(live / self.floor, self.tier_size))


Group = list[int]  # positions of adjacent shards in the manifest, rewritten as one


def plan_policy(shards: Sequence[ShardInfo], policy: MergePolicy, shard_size: int,
                appended: bool = True) -> list[Group]:
    """The runs of adjacent shards the policy rewrites now (each run becomes one shard); [] when none or off.
    ``appended``: the change just published added shards; only then are shards below the floor merged (a delete
    alone leaves an index built small on purpose, ``--shard-size 8`` for a cluster's fan-out, as it is: the
    index does not record the shard size it was built with, and a delete's writer knows none)."""
    if not policy.enabled:
        return []
    limit = policy.shard_size or shard_size
    groups: list[Group] = [[i] for i in range(len(shards))]
    live = [shards[i].live for i in range(len(shards))]
    while True:  # merge the last qualifying run first (appends arrive at the end), until none is left
        found = _last_run(live, policy, limit, appended)
        if found is None:
            break
        start, width = found
        run = range(start, start + width)
        groups[start:start + width] = [[p for i in run for p in groups[i]]]
        live[start:start + width] = [sum(live[i] for i in run)]
    return [g for g in groups if len(g) > 1 or _too_deleted(shards[g[0]], policy)]


def _last_run(live: Sequence[int], policy: MergePolicy, limit: int, floor: bool) -> tuple[int, int] | None:
    """(start, length) of the last run the policy merges: two adjacent shards below the floor (they count as
    floor-sized; ``floor``: looked for), else ``tier_size`` adjacent shards of one tier; None when no such run
    fits ``limit``."""
    for start in range(len(live) - 2, -1, -1) if floor else ():
        if live[start] < policy.floor and live[start + 1] < policy.floor and live[start] + live[start + 1] <= limit:
            return start, 2
    for start in range(len(live) - policy.tier_size, -1, -1):
        sizes = live[start:start + policy.tier_size]
        if len({policy.tier(s) for s in sizes}) == 1 and sum(sizes) <= limit:
            return start, policy.tier_size
    return None


def plan_compaction(shards: Sequence[ShardInfo], shard_size: int) -> list[Group]:
    """Every shard with deleted rows rewritten, adjacent shards packed greedily into runs of at most
    ``shard_size`` live documents; a run of one shard without deletes is left alone."""
    groups: list[Group] = []
    total = shard_size + 1
    for position, shard in enumerate(shards):
        if groups and total + shard.live <= shard_size:
            groups[-1].append(position)
            total += shard.live
        else:
            groups.append([position])
            total = shard.live
    return [g for g in groups if len(g) > 1 or shards[g[0]].deleted_count]


def _too_deleted(shard: ShardInfo, policy: MergePolicy) -> bool:
    return (shard.deleted_count >= policy.min_deleted
            and shard.deleted_count / shard.count > policy.deleted_fraction)


def model_record(manifest: Manifest) -> ModelRecord:
    """What the writer needs of the model to re-add an index's own documents: read from its manifest (no
    weights: the vectors are read back, not encoded again)."""
    vocabulary = Vocabulary.load(manifest.vocabulary)
    if vocabulary.sha256 != manifest.vocabulary_sha256:
        raise ValueError(f"the vocabulary at {manifest.vocabulary} is not the one the index was built with; "
                         f"install the stair-search version that built it, or rebuild the index.")
    model = manifest.model
    return ModelRecord(name=model["name"], spec=model["spec"], pretrained=model.get("pretrained"),
                       fingerprint=model["fingerprint"], vocabulary_location=manifest.vocabulary,
                       vocabulary=vocabulary, embed_dim=manifest.embed_dim, num_local=manifest.num_local,
                       sparse_source=manifest.sparse)


def live_batches(index_dir: Path, shard: ShardInfo) -> Iterator[tuple[list[FeatureRecord], np.ndarray, CSR]]:
    """A shard's live rows, in row order, ``READ_BATCH`` at a time, as the writer takes them
    (``add_quantised``): the stored records (fields and local features), dense vectors and sparse impacts."""
    folder = shard.path(index_dir)
    dead = read_tombstone(folder, shard.deleted, shard.name)
    live = np.setdiff1d(np.arange(shard.count, dtype=np.int64), dead)
    indptr, indices, values = (_load_csr_part(folder / SPARSE_DIR / f"{n}.npy") for n in CSR_FILES)
    dense = DenseShard.load(folder / DENSE_FILE, DenseSpec.from_dict(shard.dense))
    with FeatureStore.open(store_path(folder)) as store:
        for start in range(0, len(live), READ_BATCH):
            rows = live[start:start + READ_BATCH]
            records = [FeatureRecord(**row) for row in store.rows(rows)]
            yield records, dense.reconstruct(rows), _csr_rows(indptr, indices, values, rows)


def _csr_rows(indptr: np.ndarray, indices: np.ndarray, values: np.ndarray, rows: np.ndarray) -> CSR:
    """The CSR triple of ``rows`` (in order) of a stored sparse matrix."""
    starts, ends = indptr[rows].astype(np.int64), indptr[rows + 1].astype(np.int64)
    take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends, strict=True)]) if len(rows) else []
    take = np.asarray(take, dtype=np.int64)
    new_indptr = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    return new_indptr, np.asarray(indices[take]), np.asarray(values[take])


@dataclass(frozen=True)
class CompactResult:
    """What a compaction or a policy run did."""

    shards_before: int
    shards_after: int
    rewritten: int  # shards read back and replaced
    documents: int  # live documents re-added
    purged: int  # deleted rows dropped

    def describe(self) -> str:
        if not self.rewritten:
            return f"nothing to compact ({self.shards_before} shard(s), no deleted rows to drop)"
        return (f"{self.shards_before} shard(s) -> {self.shards_after}: {self.rewritten} rewritten "
                f"({self.documents} documents re-added, {self.purged} deleted rows dropped)")


def rewrite(writer: Any, groups: Sequence[Group]) -> CompactResult:
    """Re-add the live rows of each group's shards to ``writer`` (an appending IndexWriter) as one shard that
    replaces them; the caller commits."""
    shards = list(writer.manifest.shards)
    documents = purged = 0
    for group in groups:
        for position in group:
            shard = shards[position]
            purged += shard.deleted_count
            for records, dense, csr in live_batches(writer.index_dir, shard):
                writer.add_quantised(records, dense, csr)
                documents += len(records)
        writer.replace([shards[p].name for p in group])
    gone = sum(len(g) for g in groups)
    kept = sum(1 for g in groups if any(shards[p].live for p in g))
    return CompactResult(len(shards), len(shards) - gone + kept, gone, documents, purged)
