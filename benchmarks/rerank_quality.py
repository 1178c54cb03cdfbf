"""Each training-free reranker on vs off: quality and added latency per query, over the top 50 of hybrid search.

Two judged sets, each indexed here with the chosen model (Lucene + FAISS + stored local features):

- **compositional** (``stair_search.eval.datasets.synthetic``): ``--compositional`` scenes "a red circle left of a
  blue square", each indexed with its hard negative (colours or sides swapped). One query per scene (its caption).
  *accuracy*: the scene's own image ranks above its swapped negative in the returned top 50 (a pair that is
  absent altogether counts as wrong); *R@1*: an image for which the caption is true is first (a negative whose
  caption equals the query counts as relevant too).
- **emoji tags** (``stair_search.eval.datasets.emoji``, test split, both styles; built under ``$STAIR_DATA`` on
  first use): *nDCG@10* over the tag queries.

Every query goes through the public ``QueryRouter.search``, hybrid RRF, ``depth`` = k = 50, so a reranker
reorders exactly the top 50 fused candidates. The configurations run interleaved, query by query, so load from
other processes hits them alike. *Added ms/query* = the median over queries of (that configuration's time - the
no-reranker time of the same query): it includes embedding the reranker's phrases (dense only, cached across
queries) and reading the stored features, never the image files.

    python benchmarks/rerank_quality.py [--model stair-tiny] [--compositional 200] [--depth 50]

Prints one markdown table, then the stored local-feature bytes per image.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from stair_search.encode import Encoder
from stair_search.eval import metrics
from stair_search.eval.datasets.synthetic import CompositionalExample, make_compositional
from stair_search.eval.runner import compute_metrics
from stair_search.index import IndexReader, IndexWriter
from stair_search.index.store import FeatureRecord, array_paths, store_path
from stair_search.rerank import RERANKERS
from stair_search.retrieve import QueryRouter, SearchRequest

ROUTE = "hybrid-rrf"
# (row name, rerankers, knobs): the reranked order is RRF over the first stage and each reranker's order.
CONFIGURATIONS: tuple[tuple[str, tuple[str, ...], dict], ...] = (
    ("none (hybrid RRF)", (), {}),
    *((name, (name,), {}) for name in RERANKERS),
    ("s3, 2 variants (limit=2)", ("s3",), {"s3": {"limit": 2}}),
    ("comclip + spatial check", ("comclip",), {"comclip": {"spatial_weight": 0.5}}),
    ("all four", RERANKERS, {}),
)


@dataclass
class Document:
    id: str
    image: Image.Image
    caption: str


def build_index(out: Path, encoder: Encoder, documents: Sequence[Document]) -> IndexReader:
    """Encode and write ``documents`` (one shard) the way the indexer does, and open the index."""
    with IndexWriter(out, encoder.record, overwrite=True) as writer:
        for start in range(0, len(documents), encoder.batch_size):
            batch = documents[start : start + encoder.batch_size]
            records = [FeatureRecord(id=d.id, source=f"memory://{d.id}", width=d.image.width, height=d.image.height,
                                     caption=d.caption) for d in batch]
            writer.add(records, encoder.encode_images([d.image for d in batch]))
        writer.commit()
    return IndexReader(out)


def compositional_set(n: int) -> tuple[list[Document], dict[str, str], metrics.Qrels, list[CompositionalExample]]:
    """Documents (each scene and its negative), one query per scene, and qrels: every image the caption is true of."""
    examples = make_compositional(n, seed=0)
    documents, true_of = [], {}
    for i, example in enumerate(examples):
        for suffix, image, caption in (("pos", example.image, example.caption),
                                       ("neg", example.negative_image, example.negative_caption)):
            documents.append(Document(f"c{i:05d}-{suffix}", image, caption))
            true_of.setdefault(caption, []).append(f"c{i:05d}-{suffix}")
    queries = {f"q{i:05d}": example.caption for i, example in enumerate(examples)}
    qrels = {qid: dict.fromkeys(true_of[text], 1) for qid, text in queries.items()}
    return documents, queries, qrels, examples


def pair_accuracy(run: dict[str, list[str]], examples: Sequence[CompositionalExample], kind: str | None = None
                  ) -> float:
    """Share of scenes whose own image ranks above its swapped negative (absent = below everything)."""
    wins, total = 0, 0
    for i, example in enumerate(examples):
        if kind is not None and example.kind != kind:
            continue
        ranked = run.get(f"q{i:05d}", [])
        positions = {doc: rank for rank, doc in enumerate(ranked)}
        positive, negative = positions.get(f"c{i:05d}-pos"), positions.get(f"c{i:05d}-neg")
        wins += positive is not None and (negative is None or positive < negative)
        total += 1
    return wins / max(total, 1)


def emoji_set() -> tuple[list[Document], dict[str, str], metrics.Qrels]:
    """The emoji test split (both styles) and its tag queries."""
    from stair_search.cli.demo import open_dataset

    dataset = open_dataset()
    records = dataset.records("test")
    documents = [Document(r["id"], Image.open(r["image_path"]).convert("RGB"), r["label"]) for r in records]
    return documents, dataset.queries("test", "tag"), dataset.qrels("test", "tag", "all")


@dataclass
class Measured:
    metrics: dict[str, float]
    run: dict[str, list[str]]  # qid -> ranked doc ids
    ms: list[float]  # wall time of each query, in qid order


def run_configurations(index: IndexReader, encoder: Encoder, queries: dict[str, str], qrels: metrics.Qrels, depth: int
                       ) -> dict[str, Measured]:
    """Row name -> quality and per-query times of every configuration, through the public ``QueryRouter.search``.

    Configurations are interleaved query by query (in a rotating order), so a burst of load from other processes
    hits all of them alike; the first pass over a few queries is an untimed warm-up (JVM JIT, page cache,
    WordNet, the rerankers' cached prompts).
    """
    routers = [(name, QueryRouter(index, encoder, depth=depth, reranker_knobs=knobs), rerankers)
               for name, rerankers, knobs in CONFIGURATIONS]
    for text in list(queries.values())[:3]:
        for _, router, rerankers in routers:
            router.search(SearchRequest(text=text, mode="hybrid", k=depth, depth=depth, rerank=rerankers))
    runs: dict[str, dict[str, list[str]]] = {name: {} for name, *_ in routers}
    times: dict[str, list[float]] = {name: [] for name, *_ in routers}
    for turn, (qid, text) in enumerate(queries.items()):
        for name, router, rerankers in routers[turn % len(routers):] + routers[: turn % len(routers)]:
            started = time.perf_counter()
            response = router.search(SearchRequest(text=text, mode="hybrid", k=depth, depth=depth, rerank=rerankers))
            times[name].append(1000.0 * (time.perf_counter() - started))
            runs[name][qid] = [hit.id for hit in response.hits]
    return {name: Measured(compute_metrics(runs[name], qrels), runs[name], times[name]) for name in runs}


def added_ms(measured: Measured, baseline: Measured) -> float:
    """Median over queries of (this configuration's time - the no-reranker time for the same query)."""
    return float(np.median(np.subtract(measured.ms, baseline.ms)))


def local_feature_bytes(index: IndexReader, index_dir: Path) -> tuple[float, int]:
    """(on-disk bytes per image of the local features and their positions, raw m x (D + 2) x 2 bytes).

    Format 2 stores them as two .npy arrays; a format 1 shard (features.parquet) as two parquet columns."""
    path = store_path(next(index_dir.glob("shards/*")))
    m, dim = index.manifest.num_local, index.manifest.embed_dim
    if path.suffix == ".parquet":
        meta = pq.ParquetFile(path).metadata
        columns = [meta.row_group(g).column(c) for g in range(meta.num_row_groups) for c in range(meta.num_columns)]
        stored = sum(c.total_compressed_size for c in columns if c.path_in_schema.split(".")[0].startswith("local"))
        return stored / meta.num_rows, m * (dim + 2) * 2
    arrays = array_paths(path)
    rows = np.load(arrays["local"], mmap_mode="r").shape[0]
    return sum(file.stat().st_size for file in arrays.values()) / rows, m * (dim + 2) * 2


def table(compositional: dict[str, Measured], emoji: dict[str, Measured] | None,
          examples: Sequence[CompositionalExample], depth: int) -> str:
    """The one markdown table: quality per set, and the added latency over the no-reranker row."""
    baseline = CONFIGURATIONS[0][0]
    lines = ["| reranker | comp. accuracy | attribute swaps | relation swaps | comp. R@1 | emoji tags nDCG@10 "
             "| added ms/query (comp.) | added ms/query (emoji) |", "|---|" + "---:|" * 7]
    for name, *_ in CONFIGURATIONS:
        measured = compositional[name]
        cells = [f"{100 * pair_accuracy(measured.run, examples, kind):.1f}" for kind in (None, "attribute", "relation")]
        cells.append(f"{100 * measured.metrics['R@1']:.1f}")
        cells.append(f"{100 * emoji[name].metrics['nDCG@10']:.1f}" if emoji else "-")
        for results in (compositional, emoji):
            skip = name == baseline or not results
            cells.append("-" if skip else f"{added_ms(results[name], results[baseline]):+.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    medians = [f"{label} {np.median(results[baseline].ms):.1f}" for label, results in
               (("compositional", compositional), ("emoji", emoji)) if results]
    lines.append(f"\nAccuracy and R@1 in %, nDCG@10 in %. Added ms/query: median over queries of the difference to "
                 f"the same query without a reranker. No-reranker median ms/query (hybrid RRF, depth = k = {depth}, "
                 f"query encoding included): {', '.join(medians)}.")
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="stair-tiny", help="model spec (name, config JSON or checkpoint)")
    parser.add_argument("--pretrained", default=None, help="open_clip tag or checkpoint file, for open_clip models")
    parser.add_argument("--compositional", type=int, default=200, help="synthetic scenes (each + its negative)")
    parser.add_argument("--depth", type=int, default=50, help="candidates fused and reranked (and k)")
    parser.add_argument("--no-emoji", action="store_true", help="skip the emoji tag queries")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.compositional < 1 or args.depth < 1:
        parser.error("--compositional and --depth must be positive")

    started = time.perf_counter()
    encoder = Encoder(args.model, pretrained=args.pretrained)
    emoji, emoji_queries = None, 0
    with tempfile.TemporaryDirectory(prefix="rerank-quality-") as tmp:
        tmp = Path(tmp)
        documents, queries, qrels, examples = compositional_set(args.compositional)
        index = build_index(tmp / "compositional", encoder, documents)
        stored, raw = local_feature_bytes(index, tmp / "compositional")
        compositional = run_configurations(index, encoder, queries, qrels, args.depth)
        if not args.no_emoji:
            documents, queries, qrels = emoji_set()
            emoji_queries = len(queries)
            emoji = run_configurations(build_index(tmp / "emoji", encoder, documents), encoder, queries, qrels,
                                       args.depth)
    print(f"model {args.model}; {args.compositional} compositional scenes (+ negatives), "
          f"{emoji_queries} emoji tag queries; hybrid RRF, depth = k = {args.depth}; "
          f"torch threads {torch.get_num_threads()}\n")
    print(table(compositional, emoji, examples, args.depth))
    print(f"\nStored local features: {stored:.0f} bytes/image on disk (parquet columns local + local_positions), "
          f"{raw} bytes raw (m x (D + 2) x 2, fp16). Total run {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
