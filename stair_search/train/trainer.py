"""STAIR training loop: image-text pairs -> a stair-search checkpoint.

Three stages (design.md section 2), each a number of epochs:
1. ``grounded``: both towers learn; the text vector is masked to the word-pieces of its own text, so the
   image side is taught to emit the real words that describe it.
2. ``text``: the image tower and head are frozen as a teacher; the text side, unmasked, learns the space.
3. ``joint``: both fine-tuned together.
The loss is sparse InfoNCE (raw dot products of the sparse vectors) + dense InfoNCE (CLIP's logit scale)
+ FLOPS on both sides with a quadratic warm-up. A frozen text tower's parameters never get gradients.

A pretrained image tower with a frozen stem (``StairConfig.unfrozen_blocks``) is trained on cached features:
every image goes through the stem once, and each step runs only the top of the network and the heads, so a
CNN pretrained on ImageNet fine-tunes on CPU in minutes instead of hours. ``tower_frozen`` names the stages in
which the rest of the tower stays frozen too (only the projection, the prior's weights and the heads learn).
With ``heads_only`` nothing but the two sparse heads learns, so the whole image tower's outputs are cached
(:class:`HeadInputs`) and a step costs only the heads: thousands of steps fit in minutes on CPU.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

from stair_search import DEFAULT_MODEL
from stair_search.atomic import atomic_path
from stair_search.images import to_rgb
from stair_search.models import StairModel, TowerOutput, save_checkpoint
from stair_search.models.factory import build_model, resolve_config
from stair_search.models.heads import weights_of
from stair_search.train.losses import distill, flops, flops_weight, info_nce, word_prediction

STAGES = ("grounded", "text", "joint")
STATE_FILE = "train-state.pt"
TRUST_SAMPLE = 4000  # training images the trust gate's subspace is fitted on (seeded sample)


@dataclass
class TrainConfig:
    model: str = DEFAULT_MODEL  # a StairConfig name/JSON (trained from its config) or a checkpoint to go on from
    epochs: Sequence[int] = (6, 2, 2)  # epochs of the grounded, text and joint stages
    batch_size: int = 128
    lr: float = 5e-4  # peak: linear warm-up over ``warmup`` of the steps, then cosine decay to zero
    warmup: float = 0.05
    weight_decay: float = 0.05
    flops: float = 2e-3  # LexLIP's weight
    flops_warmup: float = 0.5  # fraction of all steps over which the FLOPS weight ramps up
    dense_weight: float = 1.0
    augment: bool = True  # random zoom and shift of the images (no flips: "left of" must stay left)
    emit_from_data: bool = True  # limit the heads to the word-pieces of the training texts
    ground_text: bool = False  # keep queries grounded to their own words at search time
    tower_frozen: Sequence[str] = ()  # stages in which the image tower's trunk stays frozen (not its projection)
    tower_lr: float = 0.1  # LR multiplier of the image tower's pretrained trunk
    stop_after: int | None = None  # early stop: end after this many epochs of the schedule (its LR curve kept)
    # Train the sparse heads only (D2S-style): both towers, their projections and the prior stay exactly as they
    # are, so a pretrained dual encoder keeps its dense space and gains heads (what the image head reads is
    # computed once through the frozen tower: HeadInputs).
    heads_only: bool = False
    # Weight of distilling the frozen dense scores into the sparse ones (D2S): the in-batch softmax of the sparse
    # image x text scores is pulled towards the dense one's, a soft target beside InfoNCE's one-hot.
    distill: float = 0.0
    # Weight of the caption-word loss (heads-only): the image head's logits predict the image's own caption words
    # (losses.word_prediction), a direct signal for every word, where InfoNCE reaches only words already emitted.
    words: float = 0.0
    seed: int = 0
    device: str | None = None


@dataclass
class EpochLog:
    stage: str
    epoch: int
    loss: float
    image_nonzeros: float
    text_nonzeros: float
    val_r1_sparse: float | None
    val_r1_dense: float | None
    seconds: float


@dataclass
class TrainResult:
    checkpoint: Path
    log: list[EpochLog] = field(default_factory=list)


def load_pairs(path: str | Path) -> list[tuple[str, str]]:
    """(image path, caption) pairs from a parquet file with ``image_path`` (or ``path``) and ``caption``."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    column = next((c for c in ("image_path", "path") if c in table.column_names), None)
    if column is None or "caption" not in table.column_names:
        raise ValueError(f"{path}: training pairs need an 'image_path' (or 'path') and a 'caption' column; "
                         f"it has {table.column_names}.")
    return list(zip(table[column].to_pylist(), table["caption"].to_pylist(), strict=True))


def train(pairs: Sequence[tuple[str, str]], out_dir: str | Path, config: TrainConfig | None = None,
          val_pairs: Sequence[tuple[str, str]] = (), resume: bool = False,
          on_epoch: Callable[[EpochLog], None] | None = None) -> TrainResult:
    """Train on ``pairs``; writes ``out_dir/model.pt`` (fp16, the shippable checkpoint) after each epoch
    and ``out_dir/train-state.pt`` (optimizer + position) so that ``resume=True`` continues a killed run."""
    config = config or TrainConfig()
    if not pairs:
        raise ValueError("No training pairs given.")
    _check_config(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _seed(config.seed)
    model = _initial_model(config, [c for _, c in pairs])
    images = _cached_images(model, [p for p, _ in pairs], out / "stem-cache")
    if config.heads_only:
        images = head_inputs(model, images)
    captions = [c for _, c in pairs]
    targets = caption_words(model, captions) if config.words else None
    if model.config.frozen_text and hasattr(getattr(model.clip, "text", None), "transformer"):
        model.clip.text.transformer = FrozenTextCache(model.clip.text.transformer, model.tokenizer(captions),
                                                      model.pad_id)
    val = (_cached_images(model, [p for p, _ in val_pairs], out / "stem-cache"), [c for _, c in val_pairs]) \
        if val_pairs else None
    steps_per_epoch = math.ceil(len(pairs) / config.batch_size)
    total_steps = steps_per_epoch * sum(config.epochs)
    optimizer = torch.optim.AdamW(_param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(int(config.warmup * total_steps),
                                                                            total_steps))
    done_epochs, log = 0, []
    state_path = out / STATE_FILE
    if resume and state_path.is_file():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        done_epochs, log = state["epochs_done"], [EpochLog(**e) for e in json.loads(state["log"])]
    schedule = [stage for stage, n in zip(STAGES, config.epochs, strict=True) for _ in range(n)]
    for epoch in range(done_epochs, min(len(schedule), config.stop_after or len(schedule))):
        started = time.perf_counter()
        stats = _train_epoch(model, (optimizer, scheduler), images, captions, schedule[epoch], epoch, config,
                             total_steps, steps_per_epoch, targets)
        r1 = _validate(model, *val) if val else (None, None)
        entry = EpochLog(schedule[epoch], epoch + 1, *stats, *r1, round(time.perf_counter() - started, 1))
        log.append(entry)
        _save(model, out / "model.pt")
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "epochs_done": epoch + 1,
                    "log": json.dumps([asdict(e) for e in log])}, state_path)
        if on_epoch:
            on_epoch(entry)
    fit_gate = model.trust is not None and not config.heads_only  # heads-only keeps the dense side as it was
    if fit_gate and len(images) > 2 * model.config.trust_components:  # else it stays 1 everywhere
        fit_trust(model, images, val[0] if val else None, seed=config.seed)
        _save(model, out / "model.pt")
    return TrainResult(out / "model.pt", log)


def trust_sample(count: int, seed: int = 0) -> torch.Tensor:
    """Which of ``count`` training images the trust gate is fitted on: a seeded sample of ``TRUST_SAMPLE``."""
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:TRUST_SAMPLE]


@torch.inference_mode()
def fit_trust(model: StairModel, images: torch.Tensor, val_images: torch.Tensor | None = None, seed: int = 0,
              sampled: bool = False) -> None:
    """Fit the model's trust gate (models/trust.py) on the training images (pixels, or stem features when the
    tower has a stem; ``sampled``: already :func:`trust_sample`'s rows) against held-out ones: the validation
    images, or without them a tenth of the sample."""
    model.eval()
    rows = torch.arange(len(images)) if sampled else trust_sample(len(images), seed)
    if val_images is None or not len(val_images):
        held_out = max(1, len(rows) // 10)
        rows, val_images = rows[held_out:], images[rows[:held_out]]
    model.trust.fit(_features(model, images[rows]), _features(model, val_images))
    model.train()


def _features(model: StairModel, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """(N, C) pooled network features (what the prior and the trust gate read) of pixels or stem features."""
    device = model.image_head.bias.device
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float()
        stem = batch if model.tower.has_stem else model.tower.stem(batch)
        chunks.append(model.tower.tail(stem).features.float().cpu())
    return torch.cat(chunks)


class FrozenTextCache(torch.nn.Module):
    """Stands in for a frozen Hugging Face text transformer during training: the hidden states of every
    training caption are computed once (in eval mode, no dropout) and looked up by token ids, so each step
    skips the text transformer, the largest forward cost of ``stair-tiny`` (MiniLM is 22 M parameters).
    Unknown inputs (validation texts) go through the real transformer."""

    def __init__(self, transformer: torch.nn.Module, token_ids: torch.Tensor, pad_id: int, batch_size: int = 256):
        super().__init__()
        self.transformer, self.pad_id = transformer, pad_id
        self.hidden: dict[tuple[int, ...], torch.Tensor] = {}
        keys = list(dict.fromkeys(self._key(row) for row in token_ids))
        with torch.inference_mode():
            for start in range(0, len(keys), batch_size):
                chunk = keys[start : start + batch_size]
                ids = torch.full((len(chunk), max(map(len, chunk))), pad_id, dtype=torch.long)
                for i, key in enumerate(chunk):
                    ids[i, : len(key)] = torch.tensor(key)
                ids = ids.to(next(transformer.parameters()).device)
                states = transformer.eval()(input_ids=ids, attention_mask=(ids != pad_id).long()).last_hidden_state
                self.hidden.update({key: states[i, : len(key)].clone() for i, key in enumerate(chunk)})

    def _key(self, row: torch.Tensor) -> tuple[int, ...]:
        used = (row != self.pad_id).nonzero()
        return tuple(row[: int(used.max()) + 1].tolist()) if len(used) else ()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        keys = [self._key(row) for row in input_ids]
        if not all(key in self.hidden for key in keys):
            return self.transformer(input_ids=input_ids, attention_mask=attention_mask)
        first = self.hidden[keys[0]]
        states = first.new_zeros((len(keys), input_ids.shape[1], first.shape[-1]))
        for i, key in enumerate(keys):
            states[i, : len(key)] = self.hidden[key]
        return SimpleNamespace(last_hidden_state=states)


def _save(model: StairModel, path: Path) -> None:
    """The shippable checkpoint, with the real text transformer in place of the training cache."""
    text = getattr(model.clip, "text", None)
    cache = getattr(text, "transformer", None)
    if not isinstance(cache, FrozenTextCache):
        save_checkpoint(model, path, half=True)
        return
    text.transformer = cache.transformer
    try:
        save_checkpoint(model, path, half=True)
    finally:
        text.transformer = cache


def _initial_model(config: TrainConfig, captions: Sequence[str]) -> StairModel:
    from stair_search.models import create_model
    from stair_search.models.factory import CHECKPOINT_SUFFIXES

    stair_config = None if Path(config.model).suffix in CHECKPOINT_SUFFIXES else resolve_config(config.model)
    if stair_config is None or stair_config.weights is not None:  # go on from a trained model (or the one a
        model = create_model(config.model, device=config.device).train()  # config names, with its settings)
        model.sparse_source = "heads"
        return model
    stair_config.ground_text = stair_config.ground_text or config.ground_text
    stair_config.sparse = "heads"  # what training trains: its checkpoint's sparse vectors come from the heads
    if config.emit_from_data and stair_config.emit_tokens is None:
        from stair_search.vocabulary import Vocabulary

        vocabulary = Vocabulary.load(stair_config.vocabulary)
        stair_config.emit_tokens = sorted({vocabulary.tokens[i] for c in captions for i in vocabulary.token_ids(c)})
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = build_model(stair_config).to(device).train()
    if model.image_prior is not None:
        _fill_prior(model)
    return model


def _fill_prior(model: StairModel) -> None:
    """The ImageNet class names through the model's own (frozen) text tower, once, before training."""
    from stair_search.encode import Encoder
    from stair_search.models.prior import fill_class_texts, imagenet_class_names

    model.eval()  # no dropout in the text tower: the class texts' embeddings are kept for good
    encoder = Encoder(model, batch_size=128)
    words = model.vocabulary.content_words  # whole words, no stop words: the pieces a query can match

    def name_words(name: str) -> list[int]:
        return [i for i in model.vocabulary.token_ids(name) if words[i]]

    fill_class_texts(model.image_prior, imagenet_class_names(),
                     lambda texts: torch.from_numpy(encoder.embed_texts(texts)), name_words)
    model.train()


def _check_config(config: TrainConfig) -> None:
    unknown = sorted(set(config.tower_frozen) - set(STAGES))
    if unknown:
        raise ValueError(f"tower_frozen names unknown stages {unknown}; the stages are {STAGES}.")
    if config.words and not config.heads_only:
        raise ValueError("words (the caption-word loss) reads the image head's cached inputs, which only heads-only "
                         "training has: add --heads-only or drop --words.")


def _param_groups(model: StairModel, config: TrainConfig) -> list[dict]:
    """Trainable parameters, the pretrained trunk at ``tower_lr`` x the LR (it only needs to move a little)."""
    trunk = {id(p) for p in model.tower.trunk_parameters()}
    params = _trainable(model, config)
    groups = [{"params": [p for p in params if id(p) not in trunk]},
              {"params": [p for p in params if id(p) in trunk], "lr": config.lr * config.tower_lr}]
    return [g for g in groups if g["params"]]


def _frozen(model: StairModel, config: TrainConfig) -> set[int]:
    """Parameters that never learn: a frozen text tower, a cached stem, the ImageNet prior's classifier (with
    ``heads_only``: everything but the two sparse heads)."""
    if config.heads_only:
        heads = {id(p) for head in (model.image_head, model.text_head) for p in head.parameters()}
        return {id(p) for p in model.parameters() if id(p) not in heads}
    frozen = [p for name, p in model.named_parameters()
              if model.config.frozen_text and name.startswith("clip.text.transformer.")]
    frozen += model.tower.stem_parameters()
    if model.image_prior is not None:
        frozen += list(model.image_prior.classifier.parameters())
    return {id(p) for p in frozen}


def _trainable(model: StairModel, config: TrainConfig) -> list[torch.nn.Parameter]:
    frozen = _frozen(model, config)
    params = []
    for param in model.parameters():
        if id(param) in frozen:
            param.requires_grad_(False)
        else:
            params.append(param)
    return params


def _cached_images(model: StairModel, paths: Sequence[str], folder: Path) -> torch.Tensor:
    """``_load_images``, kept in ``folder`` for a run with a frozen stem: a resumed or repeated run over the same
    images and stem weights reads the stem features back instead of recomputing them (minutes on CPU)."""
    if not model.tower.has_stem:
        return _load_images(model, paths)
    import hashlib

    digest = hashlib.sha256("\n".join(paths).encode())
    for param in model.tower.stem_parameters():
        digest.update(param.detach().cpu().float().numpy().tobytes())
    digest.update(repr((model.preprocess, model.image_size)).encode())
    path = folder / f"{digest.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    images = _load_images(model, paths)
    with atomic_path(path) as tmp:
        torch.save(images, tmp)
    return images


def _load_images(model: StairModel, paths: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """All images pre-processed once, and through the tower's frozen stem when it has one (then kept as
    fp16 stem features: ~19 KB per image for EfficientNet-Lite0 at 224 px, instead of 600 KB of pixels)."""
    from PIL import Image

    device = model.image_head.bias.device
    chunks = []
    for start in range(0, len(paths), batch_size):
        tensors = []
        for path in paths[start : start + batch_size]:
            with Image.open(path) as image:
                tensors.append(model.preprocess(to_rgb(image)))
        pixels = torch.stack(tensors)
        if model.tower.has_stem:
            with torch.inference_mode():
                pixels = model.tower.stem(pixels.to(device)).half().cpu()
        chunks.append(pixels)
    return torch.cat(chunks)


def _set_stage(model: StairModel, stage: str, config: TrainConfig) -> None:
    teacher = stage == "text"
    frozen = _frozen(model, config)
    for module in (model.clip.visual, model.image_head):
        for param in module.parameters():
            param.requires_grad_(not teacher and id(param) not in frozen)
    if stage in config.tower_frozen:
        for param in model.tower.trunk_parameters():
            param.requires_grad_(False)
    if model.image_prior is not None:
        for param in (model.image_prior.dense_weight, model.image_prior.sparse_weight):
            param.requires_grad_(not teacher and not config.heads_only)


@dataclass
class HeadInputs:
    """What the sparse heads read of each training image, computed once through the frozen tower: a heads-only
    step then runs the heads alone (the tower's forward is most of a step's cost, and it never changes)."""

    tokens: torch.Tensor  # (N, L, C) ImageFeatures.head_tokens, fp16
    features: torch.Tensor | None  # (N, C) pooled network features (the trust gate and the prior read them), fp16
    dense: torch.Tensor  # (N, D) the images' dense embeddings (the distillation teacher's image side)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, rows: list[int]) -> HeadInputs:
        return HeadInputs(self.tokens[rows], None if self.features is None else self.features[rows], self.dense[rows])

    def to(self, device: torch.device | str) -> HeadInputs:
        return HeadInputs(self.tokens.to(device).float(),
                          None if self.features is None else self.features.to(device).float(), self.dense.to(device))


@torch.inference_mode()
def head_inputs(model: StairModel, images: torch.Tensor, batch_size: int = 128) -> HeadInputs:
    """The frozen tower's outputs for ``images`` (pixels, or stem features when the tower has a stem)."""
    was_training = model.training
    model.eval()
    device = model.image_head.bias.device
    tokens, features, dense = [], [], []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size].to(device).float()
        out = model.tower.tail(batch) if model.tower.has_stem else model.tower(batch)
        tokens.append(out.head_tokens.half().cpu())
        features.append(None if out.features is None else out.features.half().cpu())
        dense.append(model.image_dense(out, with_local=False)[0].float().cpu())
    model.train(was_training)
    return HeadInputs(torch.cat(tokens), None if features[0] is None else torch.cat(features), torch.cat(dense))


def _encode_head_inputs(model: StairModel, inputs: HeadInputs) -> tuple[TowerOutput, torch.Tensor]:
    """The image side from cached head inputs (heads-only), and the head's (B, n) pooled logits."""
    logits = model.image_head.pooled_logits(inputs.tokens)
    sparse, _ = model.image_sparse(model.image_head.expand(weights_of(logits)), inputs.features)
    return TowerOutput(dense=inputs.dense, sparse=sparse), logits


def caption_words(model: StairModel, captions: Sequence[str]) -> list[torch.Tensor]:
    """Each caption's words as positions among the image head's tokens: the first whole-word piece of each word
    (function words aside), the piece a query's lookup matches (query/weights.py)."""
    position = model.image_head.emit_position.cpu()
    out = []
    for caption in captions:
        rows = position[torch.tensor(sorted(set(model.vocabulary.first_word_pieces(caption))), dtype=torch.long)]
        out.append(rows[rows >= 0])
    return out


def _encode_images(model: StairModel, images: torch.Tensor) -> TowerOutput:
    """Pixels, or cached stem features when the tower has a frozen stem."""
    if model.tower.has_stem:
        return model.encode_image_stem(images.to(model.image_head.bias.device).float(), local=False)
    return model.encode_image(images)


def _warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up (a from-scratch ViT diverges under a full LR at step 0), then cosine."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _augment(pixels: torch.Tensor, max_zoom: float = 0.2, max_shift: float = 0.1) -> torch.Tensor:
    """Random zoom-out/in and shift per image, edges replicated: the same picture at another size and place.
    Small images (64 px emoji) otherwise let a ViT memorise exact pixel positions."""
    n = pixels.shape[0]
    scale = 1 + (torch.rand(n) * 2 - 1) * max_zoom
    shift = (torch.rand(n, 2) * 2 - 1) * max_shift
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return F.grid_sample(pixels, grid, padding_mode="border", align_corners=False)


def _train_epoch(model: StairModel, optimizers: tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
                 images: torch.Tensor | HeadInputs, captions: list[str],
                 stage: str, epoch: int, config: TrainConfig, total_steps: int,
                 steps_per_epoch: int, targets: list[torch.Tensor] | None = None) -> tuple[float, float, float]:
    """One epoch; ``targets``: each caption's words among the image head's tokens (the caption-word loss)."""
    optimizer, scheduler = optimizers
    _set_stage(model, stage, config)
    cached = model.tower.has_stem
    model.train()
    device = model.image_head.bias.device
    order = torch.randperm(len(captions)).tolist()
    losses, image_nnz, text_nnz = [], [], []
    for step_in_epoch, start in enumerate(range(0, len(order), config.batch_size)):
        batch = _distinct_captions(order[start : start + config.batch_size], captions)
        if len(batch) < 2:
            continue
        texts = [captions[i] for i in batch]
        pixels = images[batch].to(device)
        if isinstance(pixels, HeadInputs):
            image_out, logits = _encode_head_inputs(model, pixels)
        else:
            pixels = _augment(pixels) if config.augment and not cached else pixels
            image_out, logits = _encode_images(model, pixels), None
        grounded = stage == "grounded" or model.config.ground_text  # a grounded model is searched masked
        text_out = model.encode_text(model.tokenizer(texts).to(device), ground=texts if grounded else None)
        image_sparse, text_sparse = image_out.sparse, text_out.sparse
        ids = model.image_head.token_ids  # work in the heads' compact token space
        image_sparse, text_sparse = image_sparse[:, ids], text_sparse[:, ids]
        dense_logits = model.clip.logit_scale.exp() * F.normalize(image_out.dense, dim=-1) @ \
            F.normalize(text_out.dense, dim=-1).T
        step = epoch * steps_per_epoch + step_in_epoch
        lam = flops_weight(step, int(config.flops_warmup * total_steps), config.flops)
        dense_weight = 0.0 if config.heads_only else config.dense_weight  # a frozen dense space: nothing to learn
        sparse_logits = image_sparse @ text_sparse.T
        loss = info_nce(sparse_logits) + dense_weight * info_nce(dense_logits) \
            + lam * (flops(image_sparse) + flops(text_sparse))
        if config.distill:
            loss = loss + config.distill * distill(sparse_logits, dense_logits.detach())
        if targets is not None:
            hot = torch.zeros_like(logits)
            for row, i in enumerate(batch):
                hot[row, targets[i]] = 1.0
            loss = loss + config.words * word_prediction(logits, hot)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.clip.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        image_nnz.append(float((image_sparse > 0).sum(1).float().mean()))
        text_nnz.append(float((text_sparse > 0).sum(1).float().mean()))
    return float(np.mean(losses)), float(np.mean(image_nnz)), float(np.mean(text_nnz))


def _distinct_captions(batch: list[int], captions: list[str]) -> list[int]:
    """Drop repeats of a caption within a batch: two identical texts would be each other's false negative."""
    seen: set[str] = set()
    kept = []
    for i in batch:
        if captions[i] not in seen:
            seen.add(captions[i])
            kept.append(i)
    return kept


@torch.inference_mode()
def _validate(model: StairModel, images: torch.Tensor, captions: list[str]) -> tuple[float, float]:
    """Text -> image R@1 over the validation pairs (sparse dot product, dense cosine)."""
    from stair_search.encode import Encoder

    model.eval()
    encoder = Encoder(model, batch_size=128)
    img = encoder.encode_stem(images) if model.tower.has_stem else encoder.encode_pixels(images)
    txt = encoder.encode_texts(captions)
    sparse = _sparse_matrix(txt.sparse, model) @ _sparse_matrix(img.sparse, model).T
    dense = txt.dense @ img.dense.T
    target = np.arange(len(captions))
    return (float((sparse.argmax(1) == target).mean()), float((dense.argmax(1) == target).mean()))


def _sparse_matrix(vectors: list[dict[str, float]], model: StairModel) -> np.ndarray:
    index = model.vocabulary.index
    matrix = np.zeros((len(vectors), len(index)), np.float32)
    for row, vector in enumerate(vectors):
        for token, weight in vector.items():
            matrix[row, index[token]] = weight
    return matrix


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
