"""STAIR sparse heads: token/patch features -> one non-negative weight per word-piece.

Each head is an MLM-style token predictor, ``w = log(1 + ReLU(max_j (E . T(h_j) + b)))`` (max-pooled over the
sequence; log1p and ReLU are monotone, so pooling the logits first is exact and cheaper). ``E`` is the frozen
word-piece embedding matrix of the vocabulary (tied, never stored in a checkpoint), so a head owns only a
small transform ``T`` and a vocabulary bias: ~0.2 M parameters instead of ~12 M for an untied projection.

A head may be limited to a subset of the vocabulary (``StairConfig.emit_tokens``): logits are computed for
those rows of ``E`` only, which makes the head's cost proportional to the words a model was trained to
emit (~4k for the emoji model instead of 30k) while vectors stay indexed by the full vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

# Bound on the (rows x sequence x vocabulary) logits tensor materialised at once: about 128 MB of fp32.
_LOGIT_BUDGET = 32 * 1024 * 1024


class SparseHead(nn.Module):
    def __init__(self, in_dim: int, vocab_embeddings: torch.Tensor, token_ids: torch.Tensor, bias_init: float = -2.0):
        """``token_ids``: the vocabulary ids this head may give weight to (sorted, 1-D)."""
        super().__init__()
        vocab_size, embed_dim = vocab_embeddings.shape
        self.vocab_size = vocab_size
        self.transform = nn.Sequential(nn.Linear(in_dim, embed_dim), nn.GELU(), nn.LayerNorm(embed_dim))
        # A negative start keeps an untrained head sparse: only strongly predicted tokens pass the ReLU.
        self.bias = nn.Parameter(torch.full((vocab_size,), bias_init))
        self.register_buffer("token_ids", token_ids.long(), persistent=False)
        self.register_buffer("emit_embeddings", vocab_embeddings[token_ids].contiguous(), persistent=False)
        position = torch.full((vocab_size,), -1, dtype=torch.long)
        position[token_ids.long()] = torch.arange(len(token_ids))
        self.register_buffer("emit_position", position, persistent=False)

    def logits(self, features: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Per-position logits over the head's tokens (or the emit ``rows`` given), (B, L, d) -> (B, L, n)."""
        if rows is None:
            return self.transform(features) @ self.emit_embeddings.T + self.bias[self.token_ids]
        return self.transform(features) @ self.emit_embeddings[rows].T + self.bias[self.token_ids[rows]]

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                only: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, d) features and (B, L) bool mask of real positions -> (B, V) non-negative weights.

        ``only`` (vocabulary ids) computes just those columns and leaves the rest 0: a grounded query needs
        its own few word-pieces, not a 30k-wide logit row per token."""
        rows = None
        if only is not None:
            rows = self.emit_position[only]
            rows = rows[rows >= 0]
        return self.expand(self.pooled(features, mask, rows), rows)

    def expand(self, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) weights over the head's tokens (or the emit ``rows`` given) -> (B, V) over the vocabulary."""
        full = weights.new_zeros((weights.shape[0], self.vocab_size))
        return full.index_copy(1, self.token_ids if rows is None else self.token_ids[rows], weights)

    def pooled(self, features: torch.Tensor, mask: torch.Tensor | None = None,
               rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) weights over the head's own tokens (the compact form training works in)."""
        return weights_of(self.pooled_logits(features, mask, rows))

    def pooled_logits(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                      rows: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n) max-pooled logits before the activation: what a word-prediction loss reads, since it has a
        gradient for every token, where the weights have none for a token below zero."""
        batch, length, _ = features.shape
        width = len(self.token_ids) if rows is None else len(rows)
        step = max(1, _LOGIT_BUDGET // max(1, length * width))
        pooled = []
        for start in range(0, batch, step):
            logits = self.logits(features[start : start + step], rows)
            if mask is not None:
                logits = logits.masked_fill(~mask[start : start + step, :, None], float("-inf"))
            pooled.append(logits.amax(dim=1))
        return torch.cat(pooled)


def weights_of(logits: torch.Tensor) -> torch.Tensor:
    """The head's activation, ``log(1 + ReLU(logit))``: non-negative, and sparse where logits are below zero."""
    return torch.log1p(torch.relu(logits))


def top_k_sparse(weights: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest weights per row (k <= 0 keeps every non-zero weight)."""
    if k <= 0 or k >= weights.shape[-1]:
        return weights
    values, indices = weights.topk(k, dim=-1)
    return torch.zeros_like(weights).scatter_(-1, indices, values)
