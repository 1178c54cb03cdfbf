"""Writing a model's query bundle: the graphs and arrays that let models/query_runtime.py encode queries without
torch, exported once from the torch model into the data cache.

Why here and once: exporting needs torch and the model (seconds), running the export needs neither. The text graph
is the text tower up to the sparse head's transform (token ids -> pooled embedding, per-token head features); the
image graph is the whole image side up to its dense and sparse outputs, through the batch-norm-folded trunk the
Encoder's accelerated copy runs (models/towers.py), so the one exporter (models/runtime.py) serves both. Everything
is written into a staging folder beside the bundle's place and renamed into place only after the Encoder has
checked it against torch (``Encoder.prepare_queries``): a reader sees a whole, checked bundle or none. The same model
and packages give the same bytes (fixed example inputs, no timestamps), so two processes that race write the same
bundle and either rename wins.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from stair_search.models.checkpoint import dense_fingerprint, model_fingerprint
from stair_search.models.config import CONFIG_DIR
from stair_search.models.query_runtime import (
    BUNDLE_FORMAT,
    DECLINED,
    META,
    QueryModel,
    file_stamp,
    unit_rows,
)
from stair_search.models.runtime import export_onnx
from stair_search.models.stair import StairModel
from stair_search.models.towers import TimmTower, fold_batch_norms
from stair_search.vocabulary import resolve_path

# Texts the export traces and the check compares: short and long, punctuation, accents, a word the vocabulary
# splits, one longer than the context length.
PROBE_TEXTS = ("a red car", "Grinning face with big eyes!", "café crème brûlée at 5 o'clock",
               "hamster", "a dog left of a cat, on the beach " * 12)
PROBE_PHOTOS = ("chelsea.png", "coffee.png", "rocket.jpg", "camera.png")  # scikit-image's, one of them grey
SUFFIXES = (".json", ".pt", ".pth", ".stair")
# What "exact" means for a bundle: its unit dense vectors within this of torch's (measured ~1e-6 for MiniLM and
# EfficientNet-Lite0), its sparse weights (0 to ~5) within SPARSE_TOLERANCE over the same word-pieces.
DENSE_TOLERANCE = 1e-5
SPARSE_TOLERANCE = 1e-4


class TextQuery(nn.Module):
    """Token ids -> (pooled text embedding, the text head's transform of every token): the text graph."""

    def __init__(self, model: StairModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, tokens = self.model.text_tokens(input_ids)
        return pooled, self.model.text_head.transform(tokens)


class ImageQuery(nn.Module):
    """Pixels -> (dense, sparse, kept tokens) of the image side: the image graph. A timm CNN tower runs the folded
    trunk copy the Encoder's indexing path runs (``TimmTower.accelerated``)."""

    def __init__(self, model: StairModel):
        super().__init__()
        self.model = model
        tower = model.tower
        self.trunk = (fold_batch_norms(copy.deepcopy(tower.network.trunk).eval())
                      if isinstance(tower, TimmTower) else None)

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        tower = self.model.tower
        features = (tower.from_feature_map(self.trunk.forward_features(pixels), exportable=True)
                    if self.trunk is not None else tower(pixels))
        out = self.model.image_output(features, exportable=True)
        keep = out.keep if out.keep is not None else torch.zeros_like(out.sparse, dtype=torch.bool)
        return out.dense, out.sparse, keep, out.local


def exportable(model: StairModel) -> str | None:
    """Why ``model``'s queries cannot run from a bundle, or None when they can: a bundle needs a Hugging Face text
    tower and open_clip's ``HFTokenizer`` (open_clip's own CLIP tokenizer is Python that imports torch)."""
    tokenizer = model.tokenizer
    if type(tokenizer).__name__ != "HFTokenizer" or not hasattr(getattr(model.clip, "text", None), "transformer"):
        return f"{model.config.name} has open_clip's own text tower and tokenizer (no Hugging Face tokenizer)"
    if getattr(tokenizer, "tokenizer_mode", "") or getattr(tokenizer, "strip_sep_token", False) or \
            getattr(tokenizer.clean_fn, "__name__", "") != "_clean_whitespace":
        return f"{model.config.name}'s tokenizer has a mode this export does not replay"
    return None


def preprocess_steps(preprocess: Any) -> list[dict[str, Any]] | None:
    """The model's torchvision preprocessing as steps models/query_runtime.py replays, or None when it holds a step
    it does not know (then image queries keep torch)."""
    steps = []
    for transform in getattr(preprocess, "transforms", [None]):
        step = _step(transform)
        if step is None:
            return None
        steps.append(step)
    return steps


def _step(transform: Any) -> dict[str, Any] | None:
    kind = type(transform).__name__
    if kind == "Resize" and transform.antialias in (True, None):
        size = [transform.size] if isinstance(transform.size, int) else list(transform.size)
        return {"op": "resize", "size": size, "interpolation": transform.interpolation.value,
                "max_size": transform.max_size}
    if kind == "CenterCrop":
        return {"op": "center_crop", "size": list(transform.size)}
    if (kind == "MaybeConvertMode" and transform.mode == "RGB") or getattr(transform, "__name__", "") == \
            "_convert_to_rgb":
        return {"op": "rgb"}
    if kind in ("ToTensor", "MaybeToTensor"):
        return {"op": "to_tensor"}
    if kind == "Normalize":
        return {"op": "normalize", "mean": [float(v) for v in transform.mean],
                "std": [float(v) for v in transform.std]}
    return None


def model_sources(model: StairModel, spec: str, pretrained: str | None) -> list[Path]:
    """The files ``model`` was built from (its config, checkpoints, image weights, alignments, the text tower's
    and vocabulary's folders): a bundle is stale once any of them changes."""
    config = model.config
    path = Path(spec).expanduser()
    candidates = [path] if path.suffix in SUFFIXES else [CONFIG_DIR / f"{spec}.json"]
    weights_dir = Path(__file__).parent / "weights"
    for name in (spec, config.weights):
        if name:
            candidates += [weights_dir / f"{name}.pt", Path(name).expanduser()]
    locations = [config.image_weights, config.concept_alignment, config.dense_alignment, pretrained]
    candidates += [resolve_path(location) for location in locations if location]
    text_cfg = config.clip.get("text_cfg", {}) if isinstance(config.clip, dict) else {}
    for folder in {config.vocabulary, text_cfg.get("hf_model_name"), text_cfg.get("hf_tokenizer_name")} - {None}:
        found = resolve_path(folder)
        candidates += sorted(found.iterdir()) if found.is_dir() else []
    return sorted({p.resolve() for p in candidates if p.is_file()})


def write_bundle(model: StairModel, spec: str, pretrained: str | None, folder: Path) -> Path:
    """Export ``model``'s query side into ``folder`` (a staging folder: see :func:`staging`); ``spec`` and
    ``pretrained``: how the model was named (its sources). Raises what the exporter raises."""
    with torch.inference_mode(False), torch.no_grad():
        return _write_bundle(model, spec, pretrained, folder)


def _write_bundle(model: StairModel, spec: str, pretrained: str | None, folder: Path) -> Path:
    tokenizer = model.tokenizer.tokenizer
    ids = model.tokenizer(list(PROBE_TEXTS))
    used = int((ids != model.pad_id).any(dim=0).nonzero().max()) + 1
    (folder / "text.onnx").write_bytes(export_onnx(
        TextQuery(model).eval(), (ids[:, :used].cpu(),), ["input_ids"], ["pooled", "head_features"],
        {"input_ids": {0: "batch", 1: "sequence"}, "head_features": {0: "batch", 1: "sequence"}}))
    image = _write_image(model, folder)
    _write_tokenizer(tokenizer, folder / "tokenizer.json")
    _write_head(model, folder)
    meta = {"format": BUNDLE_FORMAT, "config": model.config.to_dict(), "record": _record(model),
            "dense_fingerprint": dense_fingerprint(model), "logit_scale": float(model.logit_scale),
            "text": {"graph": "text.onnx", "context_length": int(model.tokenizer.context_length),
                     "pad_id": int(model.pad_id), "pad_token": str(tokenizer.pad_token)},
            "image": image, "sources": [file_stamp(p) for p in model_sources(model, spec, pretrained)]}
    (folder / META).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def _write_image(model: StairModel, folder: Path) -> dict[str, Any] | None:
    steps = preprocess_steps(model.preprocess)
    if steps is None:
        return None
    example = torch.zeros(2, 3, *model.image_size)
    names = ["dense", "sparse", "keep", "local"]
    graph = export_onnx(ImageQuery(model).eval(), (example,), ["pixels"], names,
                        {name: {0: "batch"} for name in ["pixels", *names]})
    (folder / "image.onnx").write_bytes(graph)
    grid = model.tower(example[:1]).grid
    return {"graph": "image.onnx", "preprocess": steps, "keep": model.image_prior is not None,
            "grid": [int(grid[0]), int(grid[1])]}


def _write_tokenizer(tokenizer: Any, path: Path) -> None:
    """The Hugging Face tokenizer's own backend (normaliser, word-pieces, special tokens), without the padding and
    truncation a call left on it: the runtime sets those from the bundle's context length."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.no_truncation()
    path.write_text(backend.to_str(), encoding="utf-8")


def _write_head(model: StairModel, folder: Path) -> None:
    head = model.text_head
    token_ids = head.token_ids.cpu()
    np.save(folder / "text_token_ids.npy", token_ids.numpy().astype(np.int64))
    np.save(folder / "text_embeddings.npy", head.emit_embeddings.detach().cpu().float().numpy())
    np.save(folder / "text_bias.npy", head.bias.detach().cpu().float()[token_ids].numpy())


def _record(model: StairModel) -> dict[str, Any]:
    config = model.config
    return {"name": config.name, "spec": model.spec, "pretrained": config.pretrained,
            "fingerprint": model_fingerprint(model), "vocabulary_location": config.vocabulary,
            "embed_dim": int(model.embed_dim), "num_local": int(config.num_local),
            "sparse_source": model.sparse_source}


def staging(target: Path) -> Path:
    """A fresh hidden folder beside ``target`` to write a bundle into before :func:`publish`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    folder.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache's bundle from other users
    return folder


def publish(staged: Path, target: Path, checked: dict[str, Any]) -> None:
    """Rename the checked bundle into place, its meta noting the differences it was checked with (``checked``);
    when another process published it first, keep theirs."""
    meta_path = staged / META
    meta = json.loads(meta_path.read_text(encoding="utf-8")) | {"checked": checked}
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    try:
        staged.rename(target)
    except OSError:
        if not (target / META).is_file():
            raise
        shutil.rmtree(staged, ignore_errors=True)


def discard(staged: Path) -> None:
    """Remove a staging folder whose bundle is not published."""
    shutil.rmtree(staged, ignore_errors=True)


def decline(staged: Path, target: Path, reason: dict[str, Any], sources: list[Path]) -> None:
    """Record that this model's export is not exact (``reason``: what differed or failed), so that later runs keep
    torch without exporting again until one of its ``sources`` changes (or the record is deleted); the staged files
    are removed."""
    discard(staged)
    path = target.with_name(f"{target.name}.{DECLINED}")
    tmp = path.with_name(f".{path.name}.tmp")
    record = {"reason": reason, "sources": [file_stamp(p) for p in sources]}
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def compare(encoder: Any, queries: QueryModel) -> dict[str, Any]:
    """The largest differences between a staged bundle and the torch model of ``encoder`` (a
    ``stair_search.encode.Encoder``) on the probe texts and photos, and whether they are within tolerance
    (``exact``): unit dense vectors within DENSE_TOLERANCE, sparse weights within SPARSE_TOLERANCE over the same
    word-pieces, the same kept tokens, the same pixels."""
    texts = list(PROBE_TEXTS)
    torch_texts = encoder.encode_texts_torch(texts)
    onnx_texts = queries.encode_texts(texts, encoder.sparse_source)
    found = {"text_dense": _max_abs(torch_texts.dense, onnx_texts.dense),
             "text_embed": _max_abs(encoder.embed_texts_torch(texts), queries.embed_texts(texts)),
             "text_sparse": _sparse_difference(torch_texts.sparse, onnx_texts.sparse)}
    if queries.has_images:
        found |= _compare_images(encoder.model, queries)
    exact = all(found[k] <= DENSE_TOLERANCE for k in found if k.endswith(("dense", "embed", "pixels"))) and all(
        found[k] <= SPARSE_TOLERANCE for k in found if k.endswith("sparse")) and found.get("image_keep", 0.0) == 0
    return found | {"exact": exact}


def _compare_images(model: StairModel, queries: QueryModel) -> dict[str, float]:
    from stair_search.data.photos import sample_dir
    from stair_search.images import model_view

    images = [model_view(Image.open(sample_dir() / name)) for name in PROBE_PHOTOS]
    torch_pixels = torch.stack([model.preprocess(image) for image in images])
    pixels = np.stack([queries.pixels(image) for image in images])
    with torch.no_grad():
        out = model.encode_image(torch_pixels)
    dense, sparse, keep, local = queries.image_outputs(pixels)
    kept = out.keep.numpy() if out.keep is not None else np.zeros_like(sparse, bool)
    return {"image_pixels": _max_abs(torch_pixels.numpy(), pixels),
            "image_dense": _max_abs(unit_rows(out.dense.numpy()), unit_rows(dense)),
            "image_local_dense": _max_abs(unit_rows(out.local.numpy()), unit_rows(local)),
            "image_sparse": _max_abs(out.sparse.numpy(), sparse),
            "image_keep": float((kept != (keep if keep is not None else np.zeros_like(kept))).sum())}


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _sparse_difference(a: list[dict[str, float]], b: list[dict[str, float]]) -> float:
    """The largest weight difference of two lists of sparse vectors; infinite when their word-pieces differ."""
    if [sorted(x) for x in a] != [sorted(y) for y in b]:
        return float("inf")
    return max((abs(x[t] - y[t]) for x, y in zip(a, b, strict=True) for t in x), default=0.0)


def traced(model: StairModel, run: Callable[[], Any]) -> Any:
    """``run()`` with ``model`` in eval mode and autograd off (what an export and its check need)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return run()
    finally:
        model.train(was_training)
