"""open_clip checkpoints as a step of their own: fetched (or copied from a local file) into a cache once, then found
there by every run, which never reaches the network for them.

Why: open_clip resolves a pretrained tag (``laion2b_s34b_b79k``) by asking the Hugging Face hub for the file on
every model build. On a machine without network that meant ~40 download retries over 53 s before the error, and
nothing said how to get the checkpoint there. Now ``stair-search fetch-model MODEL --pretrained TAG`` downloads it
(the one command that uses the network) into the Hugging Face cache, where open_clip and other tools look too, or
with ``--file PATH`` copies a checkpoint the user has into stair-search's own cache (``$STAIR_DATA/checkpoints``);
a run looks in both and, when the checkpoint is in neither, fails at once with one line naming that command.
A cached checkpoint is loaded as a file with the tag's own preprocessing (mean, std, interpolation, resize mode),
which is exactly what open_clip builds for the tag.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

HF_WEIGHTS = "open_clip_pytorch_model.bin"  # open_clip's default file name in a hub repository
HF_SAFE_WEIGHTS = "open_clip_model.safetensors"
URL_CACHE = Path("~/.cache/clip")  # where open_clip keeps checkpoints it downloads by URL
_PREPROCESS_KEYS = {"mean": "image_mean", "std": "image_std", "interpolation": "image_interpolation",
                    "resize_mode": "image_resize_mode"}


def store_dir() -> Path:
    """stair-search's own checkpoint cache (checkpoints given as local files to ``fetch-model --file``)."""
    from stair_search.paths import data_dir

    return data_dir() / "checkpoints"


def hub_cache() -> str:
    """The Hugging Face hub cache folder, as huggingface_hub resolves it (``$HF_HUB_CACHE``, ``$HF_HOME/hub``)."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def tag_config(model_name: str, tag: str) -> dict[str, Any] | None:
    """open_clip's entry for ``tag`` of ``model_name`` (hub repository or URL, preprocessing), or None when ``tag``
    is not one of that model's tags."""
    import open_clip

    return open_clip.get_pretrained_cfg(model_name, tag) or None


def fetch_command(model_name: str, tag: str) -> str:
    return f"stair-search fetch-model {model_name} --pretrained {tag}"


def find_checkpoint(model_name: str, tag: str, config: dict[str, Any]) -> Path | None:
    """The cached checkpoint of ``tag`` (stair-search's store first, then the Hugging Face cache, then open_clip's
    URL cache), or None; touches no network."""
    stored = _stored(model_name, tag)
    if stored is not None:
        return stored
    hub = config.get("hf_hub", "")
    if hub:
        found = _in_hub_cache(hub)
        if found is not None:
            return found
    url = config.get("url", "")
    cached = URL_CACHE.expanduser() / os.path.basename(url) if url else None
    return cached if cached is not None and cached.is_file() else None


def _stored(model_name: str, tag: str) -> Path | None:
    folder = store_dir() / model_name / tag
    files = sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith(".")) if folder.is_dir() \
        else []
    return files[0] if files else None


def _in_hub_cache(hub: str) -> Path | None:
    """A hub entry (``org/repo/`` or ``org/repo/file``) in the local cache, the safetensors alternative first (as
    open_clip downloads it)."""
    from huggingface_hub import try_to_load_from_cache

    repo, filename = os.path.split(hub)  # open_clip's own reading: "org/repo/" names its default file
    names = [filename] if filename else [HF_SAFE_WEIGHTS, HF_WEIGHTS]
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename[:-4] + ".safetensors")
    for name in names:
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str) and Path(found).is_file():
            return Path(found)
    return None


def missing_message(model_name: str, tag: str) -> str:
    """The one line a run prints when the checkpoint of ``tag`` is not cached: where it looked, what to run."""
    return (f"open_clip weights '{tag}' for {model_name} are not available offline (not in the Hugging Face cache "
            f"{hub_cache()} nor in {store_dir()}): fetch them once with `{fetch_command(model_name, tag)}` "
            f"(add --file PATH to take a checkpoint file you have), then run again")


def cached_weights(model_name: str, tag: str) -> tuple[str, dict[str, Any]]:
    """The local checkpoint file of a pretrained tag and the keyword arguments that give open_clip's preprocessing
    for that tag (``create_model_and_transforms(model_name, pretrained=file, **kwargs)``); FileNotFoundError naming
    ``fetch-model`` when it is not cached."""
    config = tag_config(model_name, tag)
    if config is None:
        raise ValueError(f"'{tag}' is not an open_clip tag of {model_name}; its tags: {_tags(model_name)}")
    found = find_checkpoint(model_name, tag, config)
    if found is None:
        raise FileNotFoundError(missing_message(model_name, tag))
    return str(found), {arg: config[key] for key, arg in _PREPROCESS_KEYS.items() if config.get(key)}


def _tags(model_name: str) -> list[str]:
    import open_clip

    return list(open_clip.list_pretrained_tags_by_model(model_name))


def fetch(model_name: str, tag: str, file: Path | None = None) -> Path:
    """Put the checkpoint of ``tag`` into the cache once and return where it is: ``file`` (a local checkpoint of that
    model) is checked to load into ``model_name`` and copied into stair-search's store; without one, open_clip
    downloads it from the hub into the Hugging Face cache (the only step that uses the network)."""
    config = tag_config(model_name, tag)
    if config is None:
        raise ValueError(f"'{tag}' is not an open_clip tag of {model_name}; its tags: {_tags(model_name)}")
    if file is not None:
        return _store(model_name, tag, Path(file).expanduser())
    found = find_checkpoint(model_name, tag, config)
    if found is not None:
        return found
    import open_clip

    return Path(open_clip.download_pretrained(config))


def _store(model_name: str, tag: str, file: Path) -> Path:
    """Check ``file`` loads into ``model_name`` (strictly), then copy it into the store atomically."""
    if not file.is_file():
        raise FileNotFoundError(f"Checkpoint '{file}' not found (looked at {file.resolve()}); give the path of an "
                                f"open_clip checkpoint of {model_name}.")
    import open_clip

    try:
        open_clip.create_model(model_name, pretrained=str(file))
    except Exception as error:
        raise ValueError(f"{file} is not a checkpoint of {model_name} ({' '.join(str(error).split())[:300]}); "
                         f"give the file of tag {tag}.") from None
    folder = store_dir() / model_name / tag
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / file.name
    staged = folder / f".{file.name}.copying"
    shutil.copyfile(file, staged)
    for other in folder.iterdir():  # one checkpoint per tag: a new file replaces the old one
        if other.is_file() and other not in (staged, target):
            other.unlink()
    staged.replace(target)
    return target
