"""The STAIR objective's pieces, each a small pure function (easy to check against its formula)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a (B, B) image x text score matrix whose diagonal holds the pairs."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def flops(weights: torch.Tensor) -> torch.Tensor:
    """FLOPS regulariser, sum_v (mean over the batch of |w_v|)^2: the expected cost of a posting-list
    intersection, so it pushes down frequently used tokens hardest (Paria et al., 2020)."""
    return weights.abs().mean(dim=0).pow(2).sum()


def flops_weight(step: int, warmup_steps: int, weight: float) -> float:
    """Quadratic ramp ``weight * min(1, step / warmup)^2``: sparsity pressure only once the scores mean
    something (a strong FLOPS term from step 0 collapses every vector to zero)."""
    if warmup_steps <= 0:
        return weight
    return weight * min(1.0, step / warmup_steps) ** 2
