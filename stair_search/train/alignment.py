"""Trained alignments of image embeddings: to the concept words (``StairConfig.concept_alignment``) and to the
captions (``StairConfig.dense_alignment``).

Why: the training-free concept weights (models/concepts.py) compare an image's dense vector with the text tower's
embedding of a single word, but the dense space was trained on whole captions, so a drawing of a peach lies nearer
the caption "green apple" than the word "peach". One linear map of the centred image embedding, trained so that
each training image's nearest concept words are its caption's (DeViSE, Frome et al. 2013: a softmax over every
concept word, the caption's words as targets), moves images toward the words people use for them. Being linear and
shared by all 21k words, it carries over to words no training caption held, which is what the concept side is for.

The dense alignment is the same map trained against whole captions instead of words (a contrastive softmax over
every distinct training caption): a model whose dense space was trained on a broad corpus (emoji in five styles,
UI icons) is pulled toward one collection's captions without touching the tower, and every vector read off the
dense space (the dense route, the local features, the concept words) follows.

Starts from the identity (the training-free bank) and trains only the map: no tower runs, a few seconds per epoch
on CPU for a few thousand images. Pure functions over numpy arrays; torch only for the gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stair_search.images import model_view
from stair_search.models.concepts import ConceptBank, centred_images
from stair_search.vocabulary import Vocabulary


def caption_concepts(bank: ConceptBank, vocabulary: Vocabulary, captions: Sequence[str]) -> list[list[int]]:
    """Per caption, the bank rows (concept indices) of its own words' first pieces that are concepts."""
    row_of = {int(token): row for row, token in enumerate(bank.token_ids.tolist())}
    return [sorted({row_of[i] for i in vocabulary.first_word_pieces(text) if i in row_of}) for text in captions]


def fit_map(images: np.ndarray, candidates: np.ndarray, targets: Sequence[Sequence[int]],
            centre: np.ndarray | None = None, epochs: int = 20, lr: float = 1e-3, temperature: float = 0.05,
            batch_size: int = 128, seed: int = 0) -> np.ndarray:
    """(D, D) float32 map ``A`` trained from the identity so that ``unit((image - centre) A^T)`` is nearest its
    target rows of ``candidates`` ((N, D) unit): cross-entropy of a softmax over all N at ``temperature``, uniform
    over each image's targets (images without any are left out). The one training loop of both alignments (a
    concept alignment: ``candidates`` the bank's embeddings, ``centre`` its ``image_mean``)."""
    rows = [i for i, t in enumerate(targets) if t]
    if not rows:
        raise ValueError("No training caption holds a target (a concept word or a caption): nothing to align to.")
    inputs = torch.tensor(np.asarray(images, np.float32)[rows])
    mean = torch.zeros(inputs.shape[1]) if centre is None else torch.tensor(centre, dtype=torch.float32)
    goals = torch.tensor(np.asarray(candidates, np.float32))
    generator = torch.Generator().manual_seed(seed)
    align = torch.nn.Parameter(torch.eye(inputs.shape[1]))
    optimiser = torch.optim.Adam([align], lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(inputs), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            logits = F.normalize((inputs[batch] - mean) @ align.T, dim=-1) @ goals.T / temperature
            loss = -(_goal([targets[rows[i]] for i in batch.tolist()], len(goals))
                     * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return align.detach().numpy().astype(np.float32)


def _goal(targets: Sequence[Sequence[int]], candidates: int) -> torch.Tensor:
    """(B, N) target distributions: uniform over each image's target rows (built per batch: memory stays bounded
    by the batch, not the training set)."""
    goal = torch.zeros(len(targets), candidates)
    for row, columns in enumerate(targets):
        goal[row, list(columns)] = 1.0 / len(columns)
    return goal


def map_loss(images: np.ndarray, candidates: np.ndarray, targets: Sequence[Sequence[int]], align: np.ndarray,
             centre: np.ndarray | None = None, temperature: float = 0.05) -> float:
    """The training loss of ``align`` on these images (what ``fit_map`` lowers; for checks and reports)."""
    rows = [i for i, t in enumerate(targets) if t]
    centre = np.zeros(np.asarray(images).shape[1]) if centre is None else centre
    logits = centred_images(np.asarray(images)[rows], centre, align) @ np.asarray(candidates).T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(np.mean([-log_softmax[r, list(targets[i])].mean() for r, i in enumerate(rows)]))


ALIGNMENTS = ("concepts", "dense")  # what ``align_model`` can train: a config's concept_alignment or dense_alignment


def check_target(target: str) -> None:
    """Refuse an alignment target ``align_model`` cannot train, naming the ones it can."""
    if target not in ALIGNMENTS:
        raise ValueError(f"Unknown alignment target '{target}'; use --target {' or '.join(ALIGNMENTS)}.")


def align_model(pairs: Sequence[tuple[str, str]], model: str, out: str | Path, target: str = "concepts",
                epochs: int = 20, lr: float = 1e-3, temperature: float = 0.05, seed: int = 0,
                batch_size: int = 32) -> tuple[Path, float, float]:
    """Train ``model``'s ``target`` alignment on (image path, caption) ``pairs`` and save it to ``out`` (.npy, for a
    config's ``concept_alignment`` or ``dense_alignment``); returns the file and the loss before (identity) and
    after. ``dense``: each image nearest its own caption among all the distinct training captions (a contrastive
    map of the dense space; refused for a model that has one: its vectors are mapped already); ``concepts``:
    nearest its caption's concept words, from the training-free bank (a model's own concept alignment, if any,
    is not read)."""
    from stair_search.atomic import atomic_path
    from stair_search.encode import Encoder
    check_target(target)
    encoder = Encoder(model, batch_size=batch_size)
    if target == "dense" and encoder.model.config.dense_alignment:  # its dense vectors are mapped already
        raise ValueError(f"model {model} already has a dense_alignment; align its base model instead (one without "
                         f"the field), so that the map is trained from the identity.")
    dense = np.concatenate([encoder.encode_dense([_open(p) for p, _ in pairs[i : i + batch_size]])
                            for i in range(0, len(pairs), batch_size)])
    captions = [caption for _, caption in pairs]
    if target == "concepts":  # from the training-free bank, whether or not the model has an alignment already
        bank = encoder.concepts(aligned=False)
        candidates, centre = bank.embeddings, bank.image_mean
        targets = caption_concepts(bank, encoder.model.vocabulary, captions)
    else:
        distinct = sorted(set(captions))
        row_of = {caption: row for row, caption in enumerate(distinct)}
        candidates, centre = encoder.embed_texts(distinct), None
        targets = [[row_of[caption]] for caption in captions]
    before = map_loss(dense, candidates, targets, np.eye(dense.shape[1]), centre, temperature)
    align = fit_map(dense, candidates, targets, centre, epochs=epochs, lr=lr, temperature=temperature, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, align)
    return out, before, map_loss(dense, candidates, targets, align, centre, temperature)


def _open(path: str) -> Image.Image:
    """An image as the indexer hands it to the model (``images.model_view``)."""
    with Image.open(path) as image:
        return model_view(image)
