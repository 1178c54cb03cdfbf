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


def distill(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of the row-wise and column-wise softmaxes of two (B, B) image x text score
    matrices, averaged: the student's in-batch ranking pulled towards the teacher's, both directions (D2S)."""
    rows = F.kl_div(F.log_softmax(student, dim=1), F.log_softmax(teacher, dim=1), log_target=True,
                    reduction="batchmean")
    cols = F.kl_div(F.log_softmax(student.T, dim=1), F.log_softmax(teacher.T, dim=1), log_target=True,
                    reduction="batchmean")
    return (rows + cols) / 2


def word_prediction(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Balanced binary cross-entropy of (B, n) pre-activation logits against (B, n) 0/1 targets (each image's
    caption words): mean over the targets of ``softplus(-l)`` plus mean over the rest of ``softplus(l)``. It has
    a gradient for every word, so a word whose logit starts below zero (no weight, hence no contrastive gradient)
    still learns to rise, and the rest learn to stay below zero: the head's ReLU threshold becomes the decision."""
    positive = targets > 0
    if not positive.any():
        return logits.new_zeros(())
    return F.softplus(-logits[positive]).mean() + F.softplus(logits[~positive]).mean()
