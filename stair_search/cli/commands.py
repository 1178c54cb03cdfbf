"""``stair-search``: demo, index, search, info. Heavy imports live inside the commands.

The command line composes the three packages (see ``stair_search/cli/__init__.py``): ``index`` builds an
``indexer.IndexJob``, ``search`` a ``SearchRequest``, ``serve`` the ``server`` app's settings.

A user error (a wrong path, an index that exists, an index another command is changing, a bad option value)
ends the command with one line on stderr and exit status 1 (:func:`main`); ``--debug`` before the command, or
``STAIR_SEARCH_DEBUG=1``, shows the traceback instead.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from stair_search import DEFAULT_MODEL

SPARSE_NOTES = {  # what a user is told when an index's sparse vectors do not come from trained STAIR heads
    "concepts": "this model has no trained sparse heads: its sparse vectors are training-free (each image's "
                "calibrated similarity to the vocabulary's words, models/concepts.py)",
    "none": "this index has no sparse vectors: sparse search finds nothing; use --mode dense",
}

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Sparse (STAIR / Lucene) + dense (FAISS) image search.")


def _print_version(value: bool) -> None:
    if value:
        from stair_search import __version__

        typer.echo(f"stair-search {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Sparse (STAIR / Lucene) + dense (FAISS) image search."""


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo index.")] = Path("indexes/demo"),
    model: Annotated[str, typer.Option(help="Model: name, config JSON or checkpoint.")] = DEFAULT_MODEL,
    split: Annotated[str, typer.Option(help="Which split of the emoji data set to index: test | val | train.")]
    = "test",
) -> None:
    """Build the emoji data set, index a split with the embedded default model, search and evaluate it."""
    from stair_search.cli.demo import run_demo

    run_demo(out=out, model=model, split=split)


@app.command()
def index(
    source: Annotated[str, typer.Argument(help="Folder of images, .parquet, webdataset shards{000..009}.tar, "
                                                "or a .txt/.csv list of paths.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory to write.")],
    model: Annotated[str, typer.Option(help="Model: name, config JSON or checkpoint.")] = DEFAULT_MODEL,
    pretrained: Annotated[str | None, typer.Option(help="open_clip tag or checkpoint file.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    shard_size: Annotated[int, typer.Option(min=1)] = 100_000,
    dense: Annotated[str | None, typer.Option(help="flat | hnsw | ivfpq (default: by size)")] = None,
    append: Annotated[bool, typer.Option(help="Add new shards to an existing index.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index.")] = False,
    sync: Annotated[bool, typer.Option(help="Make the index match SOURCE in one version: index new images, delete "
                                            "those gone, index changed ones again (a folder's by size and "
                                            "modification time).")] = False,
    checksum: Annotated[bool, typer.Option(help="Record each image's SHA-1 (metadata 'sha1'); --sync compares it "
                                                "instead of size and time (reads every file).")] = False,
    workers: Annotated[int | None, typer.Option(min=0, help="Decode processes (default min(4, cores); 0: inline).")]
    = None,
    runner: Annotated[str, typer.Option(help="local | ray")] = "local",
    ray_address: Annotated[str | None, typer.Option(help="Ray cluster address (--runner ray; default: local).")]
    = None,
    resume: Annotated[bool, typer.Option(help="Continue a killed job with the same arguments.")] = True,
    merge: Annotated[bool | None, typer.Option("--merge/--no-merge", help="Apply the index's merge policy once "
                                                                        "published [default: as the index says: "
                                                                        "on unless switched off].")] = None,
    id_column: Annotated[str | None, typer.Option(help="parquet/CSV column with document ids.")] = None,
    path_column: Annotated[str | None, typer.Option(help="parquet/CSV column with image paths or URLs.")] = None,
    bytes_column: Annotated[str | None, typer.Option(help="parquet column with encoded image bytes.")] = None,
    caption_column: Annotated[str | None, typer.Option(help="parquet/CSV column with captions.")] = None,
    metadata_column: Annotated[list[str] | None, typer.Option(help="Column to keep as metadata (repeatable).")]
    = None,
    hash_ids: Annotated[bool, typer.Option(help="Id = SHA-1 of the image bytes (duplicates indexed once).")] = False,
    text_fields: Annotated[str, typer.Option(help="What the text route (BM25 keyword search) indexes, "
                                                  "comma-separated: caption and metadata field names; '' for no "
                                                  "text route.")] = "caption",
    max_pixels: Annotated[int | None, typer.Option(min=1, help="Skip images that decode to more pixels (width x "
                                                               "height; a JPEG at the size it is reduced to) as "
                                                               "too large [default: 64000000].")] = None,
    max_bytes: Annotated[int | None, typer.Option(min=1, help="Skip image files, tar members and parquet cells of "
                                                              "more bytes as too large [default: 256 MiB].")] = None,
    wait: Annotated[bool, typer.Option(help="If another command is changing the index, wait for it instead of "
                                            "stopping.")] = False,
    exif: Annotated[str, typer.Option(help="Photo fields kept from EXIF: basic (taken_at, camera), gps (those and "
                                           "latitude, longitude: a place is personal data) or none.")] = "basic",
    embeddings: Annotated[bool, typer.Option(help="SOURCE holds image embeddings computed elsewhere (a "
                                                  "clip-retrieval/LAION folder, a parquet of ids and vectors, a "
                                                  ".npy with its ids): indexed without decoding an image.")] = False,
    vector_column: Annotated[str | None, typer.Option(help="--embeddings: the parquet's list<float> column.")]
    = None,
) -> None:
    """Index images; unreadable ones are skipped and counted by reason (skipped.parquet in the index)."""
    import indexer
    from indexer.sources import SourceOptions

    options = SourceOptions(id_column=id_column, path_column=path_column, bytes_column=bytes_column,
                            caption_column=caption_column, metadata_columns=tuple(metadata_column or ()),
                            hash_ids=hash_ids, checksum=checksum)
    limits = {k: v for k, v in {"max_pixels": max_pixels, "max_bytes": max_bytes}.items() if v}
    job = indexer.IndexJob(source, out, model=model, pretrained=pretrained, batch_size=batch_size,
                           shard_size=shard_size, dense=dense, append=append, overwrite=overwrite, workers=workers,
                           runner=runner, ray_address=ray_address, resume=resume, options=options, wait=wait,
                           text_fields=[f.strip() for f in text_fields.split(",") if f.strip()] or None,
                           exif=exif, embeddings=embeddings, vector_column=vector_column, sync=sync, **limits)
    summary = indexer.run(replace(job, merge=merge))
    typer.echo(f"{out}: {summary.describe()}; the index holds {summary.manifest.count} documents in "
               f"{len(summary.manifest.shards)} shard(s)")
    if summary.manifest.sparse in SPARSE_NOTES:
        typer.echo(f"note: {SPARSE_NOTES[summary.manifest.sparse]}", err=True)


@app.command()
def search(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index directory.")],
    query: Annotated[str | None, typer.Argument(help="Text query.")] = None,
    image: Annotated[Path | None, typer.Option(help="Image query (image-to-image).")] = None,
    mode: Annotated[str, typer.Option(help="auto (decided from the query) | sparse | dense | hybrid")] = "auto",
    k: Annotated[int, typer.Option("-k", min=1, max=1000)] = 10,
    fusion: Annotated[str, typer.Option(help="rrf | convex (hybrid only)")] = "rrf",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="convex weight of the sparse route")] = 0.5,
    rerank: Annotated[str, typer.Option(help="Rerankers over the top --depth, comma-separated: bsap, ssp, "
                                             "comclip, s3 (fused with the first stage by RRF).")] = "",
    depth: Annotated[int, typer.Option(min=1, help="Candidates per route, fused and reranked.")] = 100,
    feedback: Annotated[int | None, typer.Option(min=0, help="Pseudo-relevance feedback: move the dense query "
                                                 "toward this many top hits and search again (default: auto's "
                                                 "choice, the model's feedback_docs; 0: off).")] = None,
    explain: Annotated[bool, typer.Option(help="Show the matched tokens of each hit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per hit.")] = False,
    model: Annotated[str | None, typer.Option(help="Override the model recorded in the index.")] = None,
    filter: Annotated[list[str] | None, typer.Option("--filter", help="Metadata filter, repeatable: field=value, "
                                                     "field=a|b, field>=x (>, <=, <), or JSON.")] = None,
    offset: Annotated[int, typer.Option(min=0, help="Skip this many hits (paging).")] = 0,
    like: Annotated[str | None, typer.Option(help="More like this: a stored document's id as the query.")] = None,
    vector: Annotated[Path | None, typer.Option(help="A dense query embedding: .npy or a JSON list.")] = None,
    sparse: Annotated[str | None, typer.Option(help='A sparse query as JSON: {"dog": 1.2, "beach": 0.5}.')] = None,
    queries: Annotated[Path | None, typer.Option(help="Batch: one query per line (or 'id<TAB>query'); prints "
                                                      "one JSON object per hit with its query id.")] = None,
    query_weights: Annotated[str, typer.Option(help="Sparse route alone: auto (idf for a grounded model) | "
                                               "model (the text tower weighs the query) | idf (no tower run)")]
    = "auto",
) -> None:
    """Search an index with a text and/or an image, a stored document (--like), given vectors, or a file of
    queries."""
    from stair_search.cli.printing import print_response
    from stair_search.index import DamagedIndexError
    from stair_search.query.filters import FilterError, parse_cli_filters
    from stair_search.retrieve import SearchRequest, open_router

    kinds = [name for name, given in (("QUERY/--image", query is not None or image is not None),
                                      ("--like", like is not None),
                                      ("--vector/--sparse", vector is not None or sparse is not None),
                                      ("--queries", queries is not None)) if given]
    if len(kinds) != 1:
        raise typer.BadParameter("give one kind of query: a text QUERY and/or --image, --like ID, --vector and/or "
                                 f"--sparse, or --queries FILE (got {', '.join(kinds) or 'none'})")
    router = open_router(index_dir, model, query_weights=query_weights)
    try:
        # the rerankers, feedback and depth apply to text and image queries only (not --like, --vector, --sparse)
        encoded = like is None and vector is None and sparse is None
        request = SearchRequest(
            mode=mode, k=k, fusion=fusion, alpha=alpha, explain=explain or as_json, offset=offset,
            filters=parse_cli_filters(filter or []) or None, like=like,
            dense=_read_vector(vector) if vector else None, sparse=_read_sparse(sparse) if sparse else None,
            **({"rerank": _rerankers(rerank), "depth": depth, "feedback": feedback} if encoded else {}))
        if queries is not None:
            _search_file(router, queries, request)
            return
        response = router.search(replace(request, text=query, image=_open_image(image) if image else None))
    except FilterError as exc:
        raise typer.BadParameter(str(exc), param_hint="--filter") from None
    except KeyError as exc:
        raise typer.BadParameter(str(exc.args[0]), param_hint="--like") from None
    except DamagedIndexError:  # the index's files, not the command line: one line, exit 1
        raise
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if mode == "auto" and not as_json:
        typer.echo(f"auto: {response.decision['mode']}, rerank {response.decision['rerank'] or 'none'} "
                   f"({response.decision['reason']})")
    if "note" in response.decision:
        typer.echo(f"note: {response.decision['note']}", err=True)
    if response.mode != "dense" and router.index.manifest.sparse in SPARSE_NOTES:
        typer.echo(f"note: {SPARSE_NOTES[router.index.manifest.sparse]}", err=True)
    if as_json:
        for hit in response.hits:
            typer.echo(json.dumps(hit.to_dict()))
    else:
        print_response(response, explain)


def _rerankers(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _search_file(router, path: Path, request) -> None:
    """``--queries``: every line a query (``id<TAB>text``, or the line number as its id) with ``request``'s
    options; JSON lines out."""
    lines = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines()]
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        query_id, _, text = line.partition("\t") if "\t" in line else (str(number), "", line)
        response = router.search(replace(request, text=text.strip()))
        for hit in response.hits:
            typer.echo(json.dumps({"query_id": query_id, **hit.to_dict()}))


def _read_vector(path: Path) -> list[float]:
    import numpy as np

    try:
        if path.suffix == ".npy":
            return np.load(path).astype(float).reshape(-1).tolist()
        return [float(v) for v in json.loads(path.read_text(encoding="utf-8"))]
    except (OSError, ValueError, TypeError) as exc:
        raise typer.BadParameter(f"cannot read a vector from '{path}' (.npy or a JSON list of numbers): {exc}",
                                 param_hint="--vector") from None


def _read_sparse(text: str) -> dict[str, float]:
    try:
        value = json.loads(text)
        return {str(token): float(weight) for token, weight in dict(value).items()}
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(f"not a JSON object of word-piece: weight ({exc})", param_hint="--sparse") from None


@app.command()
def delete(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index directory.")],
    ids: Annotated[list[str], typer.Argument(metavar="ID...", help="Ids of the documents to delete.")],
    wait: Annotated[bool, typer.Option(help="If another command is changing the index, wait for it instead of "
                                            "stopping.")] = False,
) -> None:
    """Delete documents from every part of an index (no rebuild); exits 1 if an id was not found."""
    from stair_search.index import delete_documents

    result = delete_documents(index_dir, ids, wait=wait)
    typer.echo(f"{index_dir}: deleted {len(result.deleted)} document(s)")
    if result.unknown:
        typer.echo(f"not in the index (or deleted before): {', '.join(result.unknown)}", err=True)
        raise typer.Exit(1)


@app.command()
def compact(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index directory.")],
    shard_size: Annotated[int | None, typer.Option(min=1, help="Documents per shard at most [default: the merge "
                                                              "policy's, else 100000].")] = None,
    wait: Annotated[bool, typer.Option(help="If another command is changing the index, wait for it instead of "
                                            "stopping.")] = False,
) -> None:
    """Merge shards into as few as the shard size allows and drop deleted documents from every part (one atomic
    change: searches and servers keep answering)."""
    from stair_search.index.compact import compact as compact_index

    result = compact_index(index_dir, shard_size=shard_size, wait=wait)
    typer.echo(f"{index_dir}: {result.describe()}")


@app.command("merge-policy")
def merge_policy(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index directory.")],
    settings: Annotated[list[str] | None, typer.Argument(
        metavar="[SETTING=VALUE...]", help="off | on | enabled=, tier_size=, floor=, deleted_fraction=, "
                                           "shard_size= (none: print the policy).")] = None,
    wait: Annotated[bool, typer.Option(help="If another command is changing the index, wait for it instead of "
                                            "stopping.")] = False,
) -> None:
    """Print or set when the index merges its shards by itself after appends and deletes."""
    from stair_search.index.compact import parse_policy, read_policy, set_merge_policy

    policy = set_merge_policy(index_dir, parse_policy(settings, read_policy(index_dir)), wait) if settings \
        else read_policy(index_dir)
    typer.echo(json.dumps(policy.to_dict()))


@app.command()
def info(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX")],
    skipped: Annotated[int, typer.Option(min=0, help="How many of the items indexing skipped to list on stderr, "
                                         "with their reasons (all of them: INDEX/skipped.parquet).")] = 5,
) -> None:
    """Print an index's manifest (stdout, JSON) and what indexing skipped (stderr: the count, the first few)."""
    from stair_search.index import Manifest
    from stair_search.index.layout import SKIPPED_REPORT
    from stair_search.index.skipped import read_skipped_report

    typer.echo(json.dumps(Manifest.load(index_dir).to_dict(), indent=2))
    count, first = read_skipped_report(index_dir, skipped)
    if count:
        shown = "" if not first else ":" if len(first) == count else f"; the first {len(first)}:"
        typer.echo(f"skipped {count} item{'s' if count != 1 else ''} ({index_dir / SKIPPED_REPORT}){shown}", err=True)
        for item, source, reason in first:
            typer.echo(f"  {item}: {reason} ({source})" if source != item else f"  {item}: {reason}", err=True)


@app.command()
def export(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX")],
    out: Annotated[Path, typer.Option("--out", "-o", help="File to write (.parquet, or .npy with --format npy).")],
    format: Annotated[str, typer.Option("--format", help="parquet (ids, sources, captions, metadata, dense and "
                                                         "sparse vectors) | npy (the dense matrix)")] = "parquet",
    batch_size: Annotated[int, typer.Option(min=1, help="Documents read and written at a time.")] = 4096,
) -> None:
    """Export every live document's vectors and stored fields, streaming (bounded memory)."""
    from stair_search.index.export import export as export_index

    written = export_index(index_dir, out, format, batch_size)
    typer.echo(f"{out}: {written} documents")


@app.command()
def train(
    pairs: Annotated[list[Path], typer.Argument(help="Training pairs: parquet file(s) with image_path and caption "
                                                     "columns (several files are concatenated).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (model.pt, train-state.pt).")],
    model: Annotated[str, typer.Option(help="StairConfig name/JSON to train, or a checkpoint to go on from.")]
    = DEFAULT_MODEL,
    val: Annotated[Path | None, typer.Option(help="Validation pairs (same format): R@1 each epoch.")] = None,
    epochs: Annotated[str, typer.Option(help="Epochs of the grounded,text,joint stages.")] = "6,2,2",
    batch_size: Annotated[int, typer.Option(min=2)] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate (linear warm-up, then cosine decay).")] = 5e-4,
    flops: Annotated[float, typer.Option(help="FLOPS regularisation weight.")] = 2e-3,
    ground_text: Annotated[bool, typer.Option(help="Keep queries grounded to their own words.")] = False,
    tower_frozen: Annotated[str, typer.Option(help="Comma-separated stages in which the image tower's trunk stays "
                                                   "frozen (e.g. grounded,text for a pretrained tower).")] = "",
    stop_after: Annotated[int | None, typer.Option(min=1, help="Early stop: end after this many epochs of the "
                                                              "schedule, keeping its learning-rate curve.")] = None,
    heads_only: Annotated[bool, typer.Option(help="Train only the sparse heads of a pretrained dual encoder (its "
                                                  "towers and dense space stay as they are).")] = False,
    words: Annotated[float, typer.Option(help="With --heads-only: weight of the caption-word loss (the image head "
                                              "predicts its caption's words; 1 is a good start).")] = 0.0,
    distill: Annotated[float, typer.Option(help="With --heads-only: weight of distilling the frozen dense scores "
                                                "into the sparse ones.")] = 0.0,
    resume: Annotated[bool, typer.Option(help="Continue a killed run from its train-state.pt.")] = False,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train a STAIR model (sparse + dense heads) on image-text pairs."""
    from stair_search.train import TrainConfig, load_pairs
    from stair_search.train import train as run_training

    stages = tuple(int(n) for n in epochs.split(","))
    if len(stages) != 3:
        raise typer.BadParameter(f"--epochs takes three numbers (grounded,text,joint), got '{epochs}'")
    config = TrainConfig(model=model, epochs=stages, batch_size=batch_size, lr=lr, flops=flops,
                         ground_text=ground_text, seed=seed,
                         tower_frozen=tuple(s for s in tower_frozen.split(",") if s), stop_after=stop_after,
                         heads_only=heads_only, words=words, distill=distill)
    training_pairs = [pair for path in pairs for pair in load_pairs(path)]
    result = run_training(training_pairs, out, config, val_pairs=load_pairs(val) if val else (), resume=resume,
                          on_epoch=lambda e: typer.echo(
                              f"{e.stage:8s} epoch {e.epoch:3d}  loss {e.loss:.3f}  non-zeros image "
                              f"{e.image_nonzeros:.1f} text {e.text_nonzeros:.1f}  val R@1 sparse "
                              f"{e.val_r1_sparse} dense {e.val_r1_dense}  {e.seconds:.0f} s"))
    typer.echo(f"checkpoint: {result.checkpoint}")


@app.command()
def align(
    pairs: Annotated[list[Path], typer.Argument(help="Training pairs: parquet file(s) with image_path and caption "
                                                     "columns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The .npy file to write (a config's concept_alignment "
                                                          "or dense_alignment).")],
    model: Annotated[str, typer.Option(help="The model whose image embeddings are aligned (for --target dense, "
                                            "one without a dense_alignment).")] = "stair-lite-2",
    target: Annotated[str, typer.Option(help="concepts: each image nearest its caption's words (a "
                                             "concept_alignment); dense: nearest its caption among all "
                                             "training captions (a dense_alignment).")] = "concepts",
    epochs: Annotated[int, typer.Option(min=1)] = 20,
    lr: Annotated[float, typer.Option()] = 1e-3,
    temperature: Annotated[float, typer.Option(help="Softmax temperature over the concept words or captions.")] = 0.05,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Train an alignment: the linear map that puts each training image nearest its caption's words (`--target
    concepts`, for sparse vectors read off the dense space) or nearest its caption (`--target dense`)."""
    from stair_search.train.alignment import align_model, check_target
    from stair_search.train.trainer import load_pairs

    check_target(target)  # before any pair is read or model is built
    training_pairs = [pair for path in pairs for pair in load_pairs(path)]
    path, before, after = align_model(training_pairs, model, out, target=target, epochs=epochs, lr=lr,
                                      temperature=temperature, seed=seed)
    typer.echo(f"aligned {model} ({target}) on {len(training_pairs)} pairs: loss {before:.3f} -> {after:.3f}; "
               f"wrote {path}")


@app.command()
def dataset(
    name: Annotated[str, typer.Argument(help="emoji | corpus | compositional")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the data set into.")],
    styles: Annotated[str, typer.Option(help="emoji: comma-separated styles.")] = "google,twitter",
    seed: Annotated[int, typer.Option(help="Seed of the splits (emoji) or the scenes (compositional).")] = 0,
    cache: Annotated[Path | None, typer.Option(help="emoji: npm cache folder (default $STAIR_DATA).")] = None,
    tarball: Annotated[list[str] | None, typer.Option(help="emoji: local package, KEY=PATH.tgz with KEY "
                                                            "google, twitter or tags; repeatable.")] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="compositional: number of examples.")] = 2000,
    sources: Annotated[str, typer.Option(help="corpus: comma-separated sources, 'training' (what the shipped "
                                              "model trains on) or 'all'.")] = "training",
) -> None:
    """Build a data set: `emoji` (records, splits, queries, qrels), `corpus` (the training corpus of emoji and
    icon sets, split by concept) or `compositional` (synthetic scenes)."""
    if name == "compositional":
        from stair_search.eval.datasets.synthetic import write_compositional

        typer.echo(f"wrote {n} examples (and their negatives) to {write_compositional(out, n, seed)}")
        return
    if name == "corpus":
        _build_corpus(out, sources, seed, cache)
        return
    if name != "emoji":
        raise typer.BadParameter(f"unknown data set '{name}'; expected 'emoji', 'corpus' or 'compositional'")
    from stair_search.eval.datasets.emoji import build_emoji_dataset

    tarballs = {}
    for item in tarball or []:
        key, sep, path = item.partition("=")
        if not sep or not path:
            raise typer.BadParameter(f"--tarball expects KEY=PATH (e.g. google=emoji-datasource-google-16.0.0.tgz), "
                                     f"got '{item}'")
        tarballs[key.strip()] = Path(path)
    built = build_emoji_dataset(out, styles=[s.strip() for s in styles.split(",") if s.strip()], seed=seed,
                                cache=cache, tarballs=tarballs)
    summary = built.summary
    typer.echo(f"{built.root}: {summary['images']} images of {summary['concepts']} concepts")
    for split, counts in summary["splits"].items():
        queries = {kind: summary["queries"][f"{split}.{kind}"]["queries"] for kind in ("label", "tag")}
        typer.echo(f"  {split}: {counts['concepts']} concepts, images {counts['images']}, "
                   f"{queries['label']} label and {queries['tag']} tag queries")


def _build_corpus(out: Path, sources: str, seed: int, cache: Path | None) -> None:
    from stair_search.data.corpus import SOURCES, TRAINING_SOURCES, build_corpus, write_splits

    chosen = {"training": list(TRAINING_SOURCES), "all": list(SOURCES)}.get(
        sources, [s.strip() for s in sources.split(",") if s.strip()])
    build_corpus(out, seed=seed, cache=cache, sources=chosen)
    for split, path in write_splits(out).items():
        typer.echo(f"  {split}: {path}")


@app.command("eval")
def evaluate_index(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index directory.")],
    queries: Annotated[Path, typer.Argument(help="Queries file: qid<TAB>text per line.")],
    qrels: Annotated[Path, typer.Argument(help="TREC qrels file: qid 0 docid grade per line.")],
    mode: Annotated[list[str] | None, typer.Option(help="sparse | dense | hybrid-rrf | hybrid-convex | auto "
                                                        "(the model's routes) | auto+text | text (the BM25 text "
                                                        "route); repeatable (default: the first five).")] = None,
    rerank: Annotated[list[str] | None, typer.Option(help="none | each | names joined by ',' (fused together); "
                                                          "repeatable (default: none).")] = None,
    k: Annotated[int, typer.Option("-k", min=1, max=1000)] = 10,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="convex weight of the sparse route")] = 0.5,
    depth: Annotated[int | None, typer.Option(min=1, help="Candidates before fusion/reranking.")] = None,
    runs_dir: Annotated[Path | None, typer.Option(help="Write one TREC run file per configuration here.")] = None,
    model: Annotated[str | None, typer.Option(help="Override the model recorded in the index.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write the report as JSON here.")] = None,
) -> None:
    """Evaluate search modes (and rerankers) on judged queries: R@1/5/10, MRR@10, nDCG@10, ms/query."""
    from stair_search.eval.runner import DEFAULT_MODES, evaluate, parse_rerank_sets

    try:
        report = evaluate(index_dir, queries, qrels, modes=mode or DEFAULT_MODES,
                          rerank_sets=parse_rerank_sets(rerank or ["none"]), k=k, model=model, alpha=alpha,
                          depth=depth, runs_dir=runs_dir)
    except (ValueError, FileNotFoundError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(report.to_markdown())
    if json_out is not None:
        json_out.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")


@app.command()
def serve(
    indexes: Annotated[list[str], typer.Argument(metavar="INDEX...", help="Index directories to serve, each "
                                                 "as PATH or NAME=PATH; the first is the default.")],
    host: Annotated[str, typer.Option(envvar="STAIR_HOST", help="Interface to listen on (0.0.0.0: every "
                                      "interface, as the Docker image sets).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[str | None, typer.Option(envvar="STAIR_API_KEY",
                                                help="Require this key in the X-API-Key header.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(help="Allow browser calls from this origin "
                                                          "(repeatable).")] = None,
    threads: Annotated[int, typer.Option(min=1, max=64, help="Search worker threads.")] = 8,
    encode_threads: Annotated[int, typer.Option(min=1, max=64, help="threads of the query encoder, ONNX Runtime's "
                                                "or torch's (1: no oversubscribed cores under load; see "
                                                "benchmarks/encode_threads.py)")] = 1,
    batching: Annotated[bool, typer.Option(help="Gather concurrent searches' query encodes into shared forwards."
                                           )] = True,
    batch_wait_ms: Annotated[float, typer.Option(min=0, max=100, help="Under load, how long a forward waits for "
                                                 "more queries (ms).")] = 2.0,
    query_weights: Annotated[str, typer.Option(help="Sparse route alone: auto (idf for a grounded model) | "
                                               "model | idf (no text tower run)")] = "auto",
    reload_interval: Annotated[float, typer.Option(min=0, help="Seconds between checks for a newly "
                                                   "published index (0: never).")] = 2.0,
    model: Annotated[str | None, typer.Option(help="Override the model recorded in the index.")] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
    max_body_bytes: Annotated[int | None, typer.Option(help="Largest request body; 413 above (default 34 MiB).")]
    = None,
    max_image_bytes: Annotated[int | None, typer.Option(help="Largest query image after base64 decoding; 413 above "
                                                        "(default 24 MiB).")] = None,
    max_image_pixels: Annotated[int | None, typer.Option(help="Largest query image width x height; 413 above "
                                                         "(default 16000000).")] = None,
    search_timeout: Annotated[float | None, typer.Option(help="Seconds before a search answers 504 (default 20).")]
    = None,
    allow_image_url_host: Annotated[list[str] | None, typer.Option(help="Fetch query images by URL ('image_url') "
                                                                   "from this host name (repeatable; off by "
                                                                   "default).")] = None,
    cluster: Annotated[str | None, typer.Option(help="Serve on a Ray cluster (Ray Serve): 'local' starts one "
                                                "here, 'auto' joins the one this machine is part of, or a Ray "
                                                "address. See docs/cluster.md.")] = None,
    replicas: Annotated[int, typer.Option(min=1, help="--cluster: copies of every shard, on different nodes "
                                          "when there are enough.")] = 1,
    copy_shards: Annotated[str | None, typer.Option(help="--cluster: copy each shard to this node-local folder "
                                                    "before its replica is ready (default: read the shared "
                                                    "path).")] = None,
    shard_timeout: Annotated[float, typer.Option(min=0.1, help="--cluster: seconds a shard call waits for a "
                                                 "ready copy before the search answers 503.")] = 10.0,
) -> None:
    """Serve indexes over HTTP: search API (OpenAPI at /docs) and a search page at /; with --cluster, every
    shard a replicated Ray Serve deployment."""
    if cluster is None:
        check_port_free(host, port)  # before seconds of loading, not after them
    import uvicorn

    from server.app import create_app
    from server.settings import Limits, ServerSettings

    named = {}
    for spec in indexes:
        name, sep, path = spec.partition("=")
        name, path = (name, path) if sep else (Path(spec).name, spec)
        if name in named:
            raise typer.BadParameter(f"two indexes are named '{name}'; name them with NAME=PATH")
        named[name] = Path(path)
    given = {"max_body_bytes": max_body_bytes, "max_image_bytes": max_image_bytes,
             "max_image_pixels": max_image_pixels, "search_timeout_s": search_timeout}
    try:
        limits = Limits(**{name: value for name, value in given.items() if value is not None})
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    settings = ServerSettings(limits=limits, api_key=api_key, cors_origins=tuple(cors_origin or ()),
                              search_threads=threads, reload_interval_s=reload_interval,
                              image_url_hosts=tuple(allow_image_url_host or ()), encode_batching=batching,
                              batch_wait_s=batch_wait_ms / 1000, query_weights=query_weights)
    if cluster is not None:
        _serve_on_cluster(named, settings, cluster, replicas, copy_shards, shard_timeout, host, port, model)
        return
    from stair_search.models.runtime import THREADS_ENV

    os.environ[THREADS_ENV] = str(encode_threads)  # this process serves: its encodes' thread policy (the option)
    uvicorn.run(create_app(named, settings, model=model), host=host, port=port, log_level=log_level)


class CannotListen(RuntimeError):
    """``serve`` cannot listen where it was asked (a port taken, an unknown host); the message names it and the fix."""


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` as uvicorn will (SO_REUSEADDR: a port in TIME_WAIT is free) and let it go again."""
    import socket

    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise CannotListen(f"cannot listen on --host {host}: {exc.strerror}; give an address of this machine") from None
    family, kind, proto, _, address = found[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise CannotListen(f"cannot listen on {host}:{port} ({exc.strerror}): another server holds the port; "
                               f"stop it or serve on another one with --port N") from None


def _serve_on_cluster(named: dict[str, Path], settings, address: str, replicas: int, copy_to: str | None,
                      timeout: float, host: str, port: int, model: str | None) -> None:
    """Deploy on the cluster, then keep the shards in step with newly published manifests until Ctrl-C."""
    import threading

    from server.cluster import ClusterSettings, serve_on_cluster

    try:
        settings_for_cluster = ClusterSettings(address=address, replicas=replicas, copy_to=copy_to,
                                               shard_timeout_s=timeout)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    stop = threading.Event()
    typer.echo(f"deploying {', '.join(named)} on the Ray cluster ({address}); then serving at http://{host}:{port}"
               f" until Ctrl-C")
    try:
        serve_on_cluster(named, settings, settings_for_cluster, host, port, model, stop=stop)
    except KeyboardInterrupt:
        stop.set()
        typer.echo("stopped: the applications are deleted from the cluster")


@app.command("fetch-model")
def fetch_model(
    model: Annotated[str, typer.Argument(help="open_clip model name, e.g. ViT-B-32 (open_clip.list_models()).")],
    pretrained: Annotated[str | None, typer.Option(help="open_clip tag, e.g. laion2b_s34b_b79k.")] = None,
    file: Annotated[Path | None, typer.Option(help="A checkpoint file of that tag you already have: copied into "
                                                   "the cache (no network).")] = None,
) -> None:
    """Put an open_clip checkpoint into the cache once (the one step that downloads); index, search and serve then
    find it there and never reach the network. The shipped models need nothing fetched."""
    from stair_search.models.config import builtin_names
    from stair_search.models.open_clip_weights import fetch

    if model in builtin_names():
        typer.echo(f"{model} ships with stair-search: nothing to fetch")
        return
    if pretrained is None:
        raise typer.BadParameter("name the checkpoint: --pretrained TAG (e.g. laion2b_s34b_b79k for ViT-B-32)",
                                 param_hint="--pretrained")
    typer.echo(f"{model} {pretrained}: {fetch(model, pretrained, file)}")


@app.command()
def classify(
    image: Annotated[Path, typer.Argument(metavar="IMAGE", help="Image file to classify.")],
    labels: Annotated[str, typer.Option(help="Comma-separated class labels, e.g. cat,dog,red car.")],
    model: Annotated[str, typer.Option(help="Model: name, config JSON or checkpoint.")] = DEFAULT_MODEL,
    pretrained: Annotated[str | None, typer.Option(help="open_clip tag or checkpoint file.")] = None,
    template: Annotated[str, typer.Option(help="Prompt around each synonym; {} is the synonym.")] = "{}",
    k: Annotated[int, typer.Option("-k", min=1, help="Synonyms in the local centre.")] = 3,
    epsilon: Annotated[float | None, typer.Option(help="Vietoris-Rips radius (default: median distance).")] = None,
    wordnet: Annotated[bool, typer.Option(help="Add WordNet synonyms (else the label alone).")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per label.")] = False,
) -> None:
    """Zero-shot classification with S^3 synonym spaces: labels best first, with their scores."""
    from stair_search.encode import Encoder
    from stair_search.rerank.s3 import classify as classify_image

    pil = _open_image(image)
    names = [label.strip() for label in labels.split(",") if label.strip()]
    if not names:
        raise typer.BadParameter("give at least one label, e.g. --labels cat,dog", param_hint="--labels")
    encoder = Encoder(model, pretrained=pretrained)
    ranked = classify_image(encoder, pil, names, epsilon=epsilon, k=k, template=template,
                            source=None if wordnet else (lambda _label: []))
    for label, score in ranked:
        typer.echo(json.dumps({"label": label, "score": round(score, 6)}) if as_json else f"{score:8.4f}  {label}")


def _open_image(path: Path):
    from stair_search.images import ImageUnreadable, open_local_image

    try:  # a camera-sized photo is decoded at the size a model needs (DCT-scaled), EXIF orientation applied
        return open_local_image(path)
    except (OSError, ImageUnreadable) as exc:
        raise typer.BadParameter(f"cannot read image '{path}': {exc}") from exc


def _user_errors() -> tuple[type[BaseException], ...]:
    from stair_search.atomic import DiskFullError
    from stair_search.index import IndexLockedError
    from stair_search.query.wordnet import WordNetMissing

    return (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError, IndexLockedError,
            ModuleNotFoundError, WordNetMissing, DiskFullError, CannotListen)


def _whole_short_helps() -> None:
    """Each command's line in ``stair-search --help``: its docstring's first paragraph, wrapped (click would cut it
    at the terminal's width with "...")."""
    for command in app.registered_commands:
        if command.short_help is None and command.callback is not None:
            command.short_help = " ".join(inspect.getdoc(command.callback).split("\n\n")[0].split())


_whole_short_helps()


def main(argv: list[str] | None = None) -> None:
    """The ``stair-search`` entry point: the commands, with user errors as one line (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("STAIR_SEARCH_DEBUG", "") not in ("", "0")
    if args[:1] == ["--debug"]:
        debug, args = True, args[1:]
    if not args:  # the commands listed on stdout, exit status 2 (a command is missing), as click does it
        args, missing = ["--help"], True
    else:
        missing = False
    try:
        code = app(args=args, prog_name="stair-search", standalone_mode=False)
    except typer.Exit as stop:  # --help and typer.Exit
        code = stop.exit_code
    except typer.Abort:  # Ctrl-C at a prompt
        print("stair-search: aborted", file=sys.stderr)
        code = 1
    except typer.TyperException as exc:  # a usage error: a bad option value, a missing argument
        if debug:
            raise
        context = getattr(exc, "ctx", None)
        command = context.command_path.replace("stair-search", "").strip() if context else ""
        _one_line(f"{exc.format_message()} (see: stair-search {command + ' ' if command else ''}--help)")
        code = getattr(exc, "exit_code", 2)
    except _user_errors() as exc:
        if debug:
            raise
        _one_line(str(exc) or type(exc).__name__)
        code = 1
    raise SystemExit(2 if missing else code if isinstance(code, int) else 0)


def _one_line(message: str) -> None:
    print(f"stair-search: error: {' '.join(message.split())}", file=sys.stderr)


if __name__ == "__main__":
    main()
