"""``stair-search``: demo, index, search, info. Heavy imports live inside the commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Sparse (STAIR / Lucene) + dense (FAISS) image search.")


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Where to write the demo index.")] = Path("indexes/demo"),
    model: Annotated[str, typer.Option(help="Model: name, config JSON or checkpoint.")] = "stair-tiny",
    limit: Annotated[int, typer.Option(help="How many emoji images to index.")] = 400,
) -> None:
    """Fetch real emoji images, index them with the embedded default model and search them."""
    from stair_search.demo import run_demo

    run_demo(out=out, model=model, limit=limit)


@app.command()
def index(
    source: Annotated[str, typer.Argument(help="Folder of images, .parquet, webdataset shards{000..009}.tar, "
                                                "or a .txt/.csv list of paths.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Index directory to write.")],
    model: Annotated[str, typer.Option(help="Model: name, config JSON or checkpoint.")] = "stair-tiny",
    pretrained: Annotated[str | None, typer.Option(help="open_clip tag or checkpoint file.")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    shard_size: Annotated[int, typer.Option(min=1)] = 100_000,
    dense: Annotated[str | None, typer.Option(help="flat | hnsw | ivfpq (default: by size)")] = None,
    append: Annotated[bool, typer.Option(help="Add new shards to an existing index.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing index.")] = False,
) -> None:
    """Index images; unreadable ones are skipped and counted by reason."""
    import indexer

    summary = indexer.run(source, out, model=model, pretrained=pretrained, batch_size=batch_size,
                          shard_size=shard_size, dense=dense, append=append, overwrite=overwrite)
    typer.echo(f"{out}: {summary.describe()}; the index holds {summary.manifest.count} documents in "
               f"{len(summary.manifest.shards)} shard(s)")


@app.command()
def search(
    index_dir: Annotated[Path, typer.Argument(metavar="INDEX", help="Index directory.")],
    query: Annotated[str | None, typer.Argument(help="Text query.")] = None,
    image: Annotated[Path | None, typer.Option(help="Image query (image-to-image).")] = None,
    mode: Annotated[str, typer.Option(help="sparse | dense | hybrid")] = "hybrid",
    k: Annotated[int, typer.Option("-k", min=1, max=1000)] = 10,
    fusion: Annotated[str, typer.Option(help="rrf | convex (hybrid only)")] = "rrf",
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="convex weight of the sparse route")] = 0.5,
    explain: Annotated[bool, typer.Option(help="Show the matched tokens of each hit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per hit.")] = False,
    model: Annotated[str | None, typer.Option(help="Override the model recorded in the index.")] = None,
) -> None:
    """Search an index with a text and/or an image."""
    from stair_search.search import open_router, print_response

    if query is None and image is None:
        raise typer.BadParameter("give a text QUERY, --image PATH, or both")
    router = open_router(index_dir, model)
    pil = _open_image(image) if image else None
    response = router.search(text=query, image=pil, mode=mode, k=k, fusion=fusion, alpha=alpha,
                             explain=explain or as_json)
    if as_json:
        for hit in response.hits:
            typer.echo(json.dumps(hit.to_dict()))
    else:
        print_response(response, explain)


@app.command()
def info(index_dir: Annotated[Path, typer.Argument(metavar="INDEX")]) -> None:
    """Print an index's manifest."""
    from stair_search.index.manifest import Manifest

    typer.echo(json.dumps(Manifest.load(index_dir).to_dict(), indent=2))


@app.command()
def train(
    pairs: Annotated[Path, typer.Argument(help="Training pairs: parquet with image_path and caption columns.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory (model.pt, train-state.pt).")],
    model: Annotated[str, typer.Option(help="StairConfig name/JSON to train, or a checkpoint to go on from.")]
    = "stair-tiny",
    val: Annotated[Path | None, typer.Option(help="Validation pairs (same format): R@1 each epoch.")] = None,
    epochs: Annotated[str, typer.Option(help="Epochs of the grounded,text,joint stages.")] = "6,2,2",
    batch_size: Annotated[int, typer.Option(min=2)] = 128,
    lr: Annotated[float, typer.Option()] = 5e-4,
    flops: Annotated[float, typer.Option(help="FLOPS regularisation weight.")] = 2e-3,
    ground_text: Annotated[bool, typer.Option(help="Keep queries grounded to their own words.")] = False,
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
                         ground_text=ground_text, seed=seed)
    result = run_training(load_pairs(pairs), out, config, val_pairs=load_pairs(val) if val else (), resume=resume,
                          on_epoch=lambda e: typer.echo(
                              f"{e.stage:8s} epoch {e.epoch:3d}  loss {e.loss:.3f}  non-zeros image "
                              f"{e.image_nonzeros:.1f} text {e.text_nonzeros:.1f}  val R@1 sparse "
                              f"{e.val_r1_sparse} dense {e.val_r1_dense}  {e.seconds:.0f} s"))
    typer.echo(f"checkpoint: {result.checkpoint}")


def _open_image(path: Path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise typer.BadParameter(f"cannot read image '{path}': {exc}") from exc


if __name__ == "__main__":
    app()
