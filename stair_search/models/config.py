"""StairConfig: the plain, JSON-serialisable description of a STAIR model (an open_clip backbone + heads)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from stair_search.vocabulary import DEFAULT_VOCABULARY, resolve_path

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass
class StairConfig:
    """What to build. ``clip`` is an open_clip built-in model name (``"ViT-B-32"``) or a full open_clip
    ``model_cfg`` dict; ``pretrained`` is an open_clip tag or a local open_clip checkpoint file."""

    name: str
    clip: str | dict[str, Any]
    pretrained: str | None = None
    vocabulary: str = DEFAULT_VOCABULARY
    image_top_k: int = 64  # non-zero tokens kept per image (index size vs recall)
    # Cap on query tokens (0: no cap). A trained STAIR text vector has far fewer non-zeros; the cap keeps an
    # untrained or badly regularised head from sending thousands of terms to Lucene.
    text_top_k: int = 128
    num_local: int = 8  # local (patch) features stored per image for the rerankers
    seed: int = 0  # initialises whatever the weights do not cover, so an untrained model is reproducible
    # Hugging Face text towers loaded from a local folder and kept frozen are not stored in checkpoints:
    # the checkpoint records the folder's weight hash instead (keeps the shipped default model small).
    frozen_text: bool = False
    # Word-pieces the sparse heads may emit (None: the whole vocabulary). A trained model lists the words of
    # its training texts: heads then cost ~vocabulary-subset/30k of a full head, and never emit words they
    # had no signal for.
    # ``"words"``: every whole-word word-piece of the vocabulary (open vocabulary: a query word never seen in
    # training can still be matched, through the head's tie to the word-piece embeddings).
    emit_tokens: list[str] | str | None = None
    # Mask a text's sparse vector to the word-pieces of the text itself (STAIR stage-1 grounding kept at
    # query time): queries stay literal and explainable; images still expand to related words.
    ground_text: bool = False
    # A grounded query's own whole words (stop words aside) weigh at least this much, so a word the text head
    # learned nothing about still reaches the index instead of leaving the query empty (0: off).
    text_floor: float = 0.0
    # Pretrained image network weights loaded when the model is built from this config (a ``pkg://`` or local
    # file, in ``image_weights_format``); a checkpoint of the model carries them itself.
    image_weights: str | None = None
    image_weights_format: str = "efficientnet-pytorch"
    # "imagenet": keep the image network's ImageNet classifier as a ConSE prior (models/prior.py).
    image_prior: str | None = None
    # Trainable top stages of a timm EfficientNet tower: the rest is the frozen stem that training caches.
    unfrozen_blocks: int = 0
    # With the ImageNet prior: principal components of the training images' features that the trust gate
    # (models/trust.py) measures an image against, scaling the learned parts down on images unlike the
    # training data (0: no gate).
    trust_components: int = 0
    # The sparse route's convex weight for keyword-like queries under ``auto`` (tuned per model on a val split).
    keyword_alpha: float = 0.7
    # Pseudo-relevance feedback under ``auto`` for text queries that go hybrid (keyword-like and descriptive):
    # the dense query moves toward the mean embedding of this many top fused hits and the dense route runs
    # again before the final fusion (retrieve/router.py; tuned per model on a val split; 0: off). Query time
    # only: never part of a fingerprint.
    feedback_docs: int = 0
    # Where sparse vectors come from: "heads" (the STAIR heads), "heads+concepts" (the heads' image vectors plus
    # ``concept_weight`` x the training-free ones, queries from the text head), "concepts" (training-free:
    # models/concepts.py) or "none". None: "heads" for a model loaded from a stair-search checkpoint (trained
    # heads), "concepts" for one built from a config or an open_clip name (its heads would be random: never used
    # silently).
    sparse: str | None = None
    # With sparse "heads+concepts": how much an image's training-free concept weights (z / Z_SCALE) add to its
    # heads' weights before the image top-k cut (tuned per model on a val split).
    concept_weight: float = 0.5
    # With concept words (sparse "heads+concepts" or "concepts"): a trained (D, D) linear map applied to an image's
    # centred dense vector before it is compared with the concept words (``stair-search align``; a ``pkg://`` or
    # local ``.npy``). None: the identity, the training-free bank.
    concept_alignment: str | None = None
    # A trained (D, D) linear map applied to an image's dense vector and local features (after the prior), so the
    # dense space fits one collection's captions (``stair-search align --target dense``; a ``pkg://`` or local
    # ``.npy``). None: the identity. Everything read off the dense space follows, the concept words included.
    dense_alignment: str | None = None
    # Trained weights that a model built from this config loads (a stair-search checkpoint: a built-in model name
    # or a .pt path), so that a shipped config can reuse a shipped model's weights with other settings. Its
    # architecture fields must be the checkpoint's; a checkpoint saved from the model stores None here.
    weights: str | None = None
    image_mean: list[float] | None = None  # preprocessing (None: open_clip's defaults)
    image_std: list[float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StairConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown StairConfig keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_json(cls, path: str | Path) -> StairConfig:
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        data.setdefault("name", path.stem)
        return cls.from_dict(data)


def builtin_configs() -> list[str]:
    """Names of the StairConfigs that ship with the package."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def builtin_names() -> list[str]:
    """Names of the models that ship with the package: a config JSON, trained weights, or both (torch-free: what
    decides whether a model's queries run on ONNX Runtime without building it)."""
    return sorted(set(builtin_configs()) | {p.stem for p in WEIGHTS_DIR.glob("*.pt")})


def load_alignment(location: str, field: str, model: str) -> np.ndarray:
    """A config's trained (D, D) float32 map (``concept_alignment`` / ``dense_alignment``: a ``pkg://`` or local
    .npy), or an error naming the command that makes one."""
    path = resolve_path(location)
    if not path.is_file():
        target = "concepts" if field == "concept_alignment" else "dense"
        raise FileNotFoundError(f"{field} '{location}' of model {model} not found (looked at {path}); make one "
                                f"with `stair-search align --target {target}` or remove the field.")
    return np.load(path).astype(np.float32)
