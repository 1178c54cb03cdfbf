"""A trained alignment of image embeddings to the concept words (``StairConfig.concept_alignment``).

Why: the training-free concept weights (models/concepts.py) compare an image's dense vector with the text tower's
embedding of a single word, but the dense space was trained on whole captions, so a drawing of a peach lies nearer
the caption "green apple" than the word "peach". One linear map of the centred image embedding, trained so that
each training image's nearest concept words are its caption's (DeViSE, Frome et al. 2013: a softmax over every
concept word, the caption's words as targets), moves images toward the words people use for them. Being linear and
shared by all 21k words, it carries over to words no training caption held, which is what the concept side is for.

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
from stair_search.models.vocab import Vocabulary


def caption_concepts(bank: ConceptBank, vocabulary: Vocabulary, captions: Sequence[str]) -> list[list[int]]:
    """Per caption, the bank rows (concept indices) of its own words' first pieces that are concepts."""
    row_of = {int(token): row for row, token in enumerate(bank.token_ids.tolist())}
    return [sorted({row_of[i] for i in vocabulary.first_word_pieces(text) if i in row_of}) for text in captions]


def fit_alignment(bank: ConceptBank, dense: np.ndarray, targets: Sequence[Sequence[int]], epochs: int = 20,
                  lr: float = 1e-3, temperature: float = 0.05, batch_size: int = 128, seed: int = 0) -> np.ndarray:
    """(D, D) float32 map trained from the identity: images ``dense`` ((B, D) unit) with their caption's concept
    rows ``targets`` (images without any are left out); cross-entropy of a softmax over every concept at
    ``temperature``, uniform over the caption's words."""
    rows = [i for i, t in enumerate(targets) if t]
    if not rows:
        raise ValueError("No training caption holds a concept word: nothing to align to.")
    images = torch.tensor(np.asarray(dense, np.float32)[rows])
    mean = torch.tensor(bank.image_mean, dtype=torch.float32)
    concepts = torch.tensor(bank.embeddings, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    align = torch.nn.Parameter(torch.eye(images.shape[1]))
    optimiser = torch.optim.Adam([align], lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            logits = F.normalize((images[batch] - mean) @ align.T, dim=-1) @ concepts.T / temperature
            loss = -(_goal([targets[rows[i]] for i in batch.tolist()], len(concepts))
                     * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return align.detach().numpy().astype(np.float32)


def _goal(targets: Sequence[Sequence[int]], concepts: int) -> torch.Tensor:
    """(B, N) target distributions: uniform over each caption's concept rows (built per batch: memory stays
    bounded by the batch, not the training set)."""
    goal = torch.zeros(len(targets), concepts)
    for row, columns in enumerate(targets):
        goal[row, list(columns)] = 1.0 / len(columns)
    return goal


def alignment_loss(bank: ConceptBank, dense: np.ndarray, targets: Sequence[Sequence[int]], align: np.ndarray,
                   temperature: float = 0.05) -> float:
    """The training loss of ``align`` on these images (what ``fit_alignment`` lowers; for checks and reports)."""
    rows = [i for i, t in enumerate(targets) if t]
    logits = centred_images(np.asarray(dense)[rows], bank.image_mean, align) @ bank.embeddings.T / temperature
    logits -= logits.max(axis=1, keepdims=True)
    log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return float(np.mean([-log_softmax[r, list(targets[i])].mean() for r, i in enumerate(rows)]))


def align_model(pairs: Sequence[tuple[str, str]], model: str, out: str | Path, epochs: int = 20, lr: float = 1e-3,
                temperature: float = 0.05, seed: int = 0, batch_size: int = 32) -> tuple[Path, float, float]:
    """Train ``model``'s concept alignment on (image path, caption) ``pairs`` and save it to ``out`` (.npy, for a
    config's ``concept_alignment``); returns the file and the loss before (identity) and after."""
    from stair_search.atomic import atomic_path
    from stair_search.encode import Encoder
    encoder = Encoder(model, batch_size=batch_size)
    bank = encoder.concepts()
    if bank.image_map is not None:
        raise ValueError(f"model {model} already has a concept_alignment; align its base model instead (one "
                         f"without the field), so that the map is trained from the training-free bank.")
    dense = np.concatenate([encoder.encode_images([_open(p) for p, _ in pairs[i : i + batch_size]]).dense
                            for i in range(0, len(pairs), batch_size)])
    targets = caption_concepts(bank, encoder.model.vocabulary, [caption for _, caption in pairs])
    before = alignment_loss(bank, dense, targets, np.eye(dense.shape[1]), temperature)
    align = fit_alignment(bank, dense, targets, epochs=epochs, lr=lr, temperature=temperature, seed=seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        np.save(f, align)
    return out, before, alignment_loss(bank, dense, targets, align, temperature)


def _open(path: str) -> Image.Image:
    """An image as the indexer hands it to the model (``images.model_view``)."""
    with Image.open(path) as image:
        return model_view(image)
