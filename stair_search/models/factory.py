"""One factory for every model stair-search runs: ``create_model(spec, pretrained=None)``.

``spec`` may be
- a stair-search checkpoint file (``*.pt``, written by :func:`save_checkpoint`),
- a StairConfig JSON file, or the name of a model that ships with the package (``stair-lite-4``, ``stair-tiny``):
  its trained weights, and its config JSON or, for a retrained model that has none, its checkpoint's config,
- an open_clip built-in model name (``ViT-B-32``) with ``pretrained`` = an open_clip tag
  (``laion2b_s34b_b79k``, resolved from the local Hugging Face cache) or a local open_clip checkpoint file.
Nothing here reaches the network when the weights are local.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from stair_search import DEFAULT_MODEL
from stair_search.models.checkpoint import checkpoint_config, load_checkpoint, read_checkpoint
from stair_search.models.config import (
    CONFIG_DIR,
    WEIGHTS_DIR,
    StairConfig,
    builtin_configs,
    builtin_names,
    load_alignment,
)
from stair_search.models.stair import StairModel
from stair_search.vocabulary import Vocabulary, resolve_path

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".stair")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def create_model(spec: str | Path | StairConfig = DEFAULT_MODEL, pretrained: str | None = None,
                 device: str | None = None) -> StairModel:
    """Build a StairModel in eval mode on ``device`` (CUDA when present, else CPU)."""
    if isinstance(spec, StairConfig):
        config = spec
    else:
        text = str(spec)
        if Path(text).suffix in CHECKPOINT_SUFFIXES:
            model = _from_checkpoint(text, device)
            model.spec = str(Path(text).expanduser().resolve())
            return model
        shipped = shipped_checkpoint(text)
        if shipped is not None and pretrained is None:
            model = _from_checkpoint(shipped, device)
            model.spec = text
            return model
        config = resolve_config(text, pretrained)
    model = build_model(config, image_weights=config.weights is None)
    if config.weights is not None:  # a config over a trained model's weights (StairConfig.weights)
        load_checkpoint(model, read_checkpoint(shipped_checkpoint(config.weights) or config.weights))
    if not isinstance(spec, StairConfig):
        path = Path(str(spec)).expanduser()
        model.spec = str(path.resolve()) if path.suffix == ".json" else str(spec)
    return model.to(device or default_device()).eval()


def _from_checkpoint(path: str | Path, device: str | None) -> StairModel:
    """Build the checkpoint's model from its config (no pretrained weights: the file has them), then load it."""
    payload = read_checkpoint(path)
    model = build_model(checkpoint_config(payload), image_weights=False)
    return load_checkpoint(model, payload).to(device or default_device()).eval()


def builtin_models() -> list[str]:
    """Names of the models that ship with the package: a config JSON, trained weights, or both."""
    return builtin_names()


def shipped_checkpoint(name: str) -> Path | None:
    """The trained weights that ship with the package for a built-in model name (``stair-tiny``), if any.

    ``create_model("stair-tiny")`` loads them; training starts from the config (``resolve_config``) instead.
    """
    path = WEIGHTS_DIR / f"{name}.pt"
    return path if name in builtin_models() and path.is_file() else None


def resolve_config(spec: str, pretrained: str | None = None) -> StairConfig:
    path = Path(spec).expanduser()
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(f"Model config '{spec}' not found (looked at {path.resolve()}).")
        config = StairConfig.from_json(path)
    elif spec in builtin_configs():
        config = StairConfig.from_json(CONFIG_DIR / f"{spec}.json")
    elif (shipped := shipped_checkpoint(spec)) is not None:  # shipped weights without a config of their own
        config = checkpoint_config(read_checkpoint(shipped))
    else:
        import open_clip

        if spec not in open_clip.list_models():
            raise ValueError(
                f"Unknown model '{spec}'. Give a stair-search checkpoint (*.pt), a StairConfig JSON file, "
                f"one of {builtin_models()}, or an open_clip model name (open_clip.list_models())."
            )
        config = StairConfig(name=spec, clip=spec)
    if pretrained is not None:
        config.pretrained = pretrained
    return config


def build_model(config: StairConfig, image_weights: bool = True) -> StairModel:
    """Backbone + heads from a config. Untrained parts are initialised from ``config.seed``, so two
    processes building the same config get the same model (an index and its searcher must agree).
    ``image_weights=False`` skips loading ``config.image_weights`` (a checkpoint about to overwrite them)."""
    vocabulary = Vocabulary.load(config.vocabulary)
    with torch.random.fork_rng(devices=[]), _quiet_transformers():
        torch.manual_seed(config.seed)
        clip, preprocess, tokenizer = _build_clip(config)
        model = StairModel(clip, config, vocabulary, preprocess, tokenizer)
    if config.image_weights and image_weights:
        _load_image_weights(model)
    if config.dense_alignment:  # a file beside the weights, never in a checkpoint: loaded on every build
        model.align_dense(torch.from_numpy(load_alignment(config.dense_alignment, "dense_alignment", config.name)))
    return model


def _load_image_weights(model: StairModel) -> None:
    """The pretrained image network into open_clip's timm trunk (and its classifier into the ImageNet prior).
    With a prior, the learned projection starts at zero: the untrained model is then ConSE's zero-shot one."""
    from stair_search.models.image_weights import load_image_weights

    trunk = getattr(model.clip.visual, "trunk", None)
    if trunk is None:
        raise ValueError(f"image_weights need a timm image tower; '{model.config.name}' has "
                         f"{type(model.clip.visual).__name__}.")
    prior = model.image_prior
    load_image_weights(trunk, resolve_path(model.config.image_weights), model.config.image_weights_format,
                       classifier=prior.classifier if prior is not None else None)
    if prior is not None:
        torch.nn.init.zeros_(model.clip.visual.head.proj.weight)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load report (e.g. the unused BERT pooler) while a model is built."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def _build_clip(config: StairConfig) -> tuple[torch.nn.Module, Any, Any]:
    import open_clip

    if isinstance(config.clip, str):
        weights, preprocessing = _resolve_pretrained(config.clip, config.pretrained)
        clip, _, preprocess = open_clip.create_model_and_transforms(config.clip, pretrained=weights, **preprocessing)
        return clip, preprocess, open_clip.get_tokenizer(config.clip)

    model_cfg = _resolve_model_cfg(config.clip)
    text_cfg = model_cfg["text_cfg"]
    if "hf_model_name" in text_cfg:
        text_cfg["hf_model_pretrained"] = Path(text_cfg["hf_model_name"]).is_dir()
        clip = open_clip.CustomTextCLIP(**model_cfg)
        tokenizer = open_clip.tokenizer.HFTokenizer(
            text_cfg.get("hf_tokenizer_name", text_cfg["hf_model_name"]),
            context_length=text_cfg.get("context_length", 77),
        )
    else:
        clip = open_clip.CLIP(**model_cfg)
        tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))
    if config.pretrained:
        open_clip.load_checkpoint(clip, _existing_file(config.pretrained))
    preprocess = open_clip.image_transform(model_cfg["vision_cfg"]["image_size"], is_train=False,
                                           mean=_triple(config.image_mean), std=_triple(config.image_std))
    return clip, preprocess, tokenizer


def _triple(values: list[float] | None) -> tuple[float, ...] | None:
    return tuple(values) if values else None


def _resolve_model_cfg(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """Copy of an open_clip model_cfg with ``pkg://`` locations turned into local paths."""
    model_cfg = copy.deepcopy(model_cfg)
    text_cfg = model_cfg.setdefault("text_cfg", {})
    for key in ("hf_model_name", "hf_tokenizer_name"):
        if key in text_cfg:
            text_cfg[key] = str(resolve_path(text_cfg[key]))
    return model_cfg


def _existing_file(path: str) -> str:
    resolved = Path(path).expanduser()
    if not resolved.is_file():
        raise FileNotFoundError(f"Checkpoint '{path}' not found (looked at {resolved.resolve()}).")
    return str(resolved)


def _resolve_pretrained(model_name: str, pretrained: str | None) -> tuple[str | None, dict[str, Any]]:
    """The checkpoint file open_clip loads and its preprocessing arguments: a local file stays a file (open_clip's
    defaults); a tag is its cached file with the tag's preprocessing (models/open_clip_weights.py: never the
    network; not cached is one FileNotFoundError naming ``stair-search fetch-model``)."""
    if pretrained is None:
        return None, {}
    from stair_search.models.open_clip_weights import cached_weights, tag_config

    if tag_config(model_name, pretrained) is not None:
        return cached_weights(model_name, pretrained)
    return _existing_file(pretrained), {}
