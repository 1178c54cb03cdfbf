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
