"""BSAP: Balanced Similarity with Auxiliary Prompts (arXiv 2402.18400).

Why: CLIP similarities are biased per image: some images score high against any text, so they crowd the top
of every ranking. BSAP scores each candidate image against the query *and* a few auxiliary prompts, and asks
how much of that image's probability mass goes to the query:

    balanced_i = softmax_j( s(i, t_j) · logit_scale )[query],   t_0 = query, t_1..A = auxiliary prompts
    score_i    = λ · balanced_i + (1 − λ) · s(i, query)

An image that is similar to everything gets a low balanced score. The paper publishes neither the prompts, the
normaliser nor λ; we read it as a softmax per image at CLIP's own temperature (the model's logit scale), with a
small default set of generic prompts (``DEFAULT_PROMPTS``), optionally extended with the other queries of a
batch (``extra_prompts``), and λ = 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stair_search.rerank.base import RerankInput

DEFAULT_PROMPTS = (
    "a photo", "an image", "a picture of something", "a drawing", "an icon", "a close-up photo of an object",
    "a blurry photo", "a photo of a scene",
)


def balanced_similarity(similarities: np.ndarray, logit_scale: float) -> np.ndarray:
    """(N,) softmax over each row of ``similarities`` (N, 1 + A) at ``logit_scale``, taken at column 0."""
    logits = np.asarray(similarities, dtype=np.float64) * logit_scale
    logits -= logits.max(axis=1, keepdims=True)  # stable: exp of at most 0
    weights = np.exp(logits)
    return weights[:, 0] / weights.sum(axis=1)


def bsap_scores(query_sims: np.ndarray, aux_sims: np.ndarray, logit_scale: float, weight: float = 0.5) -> np.ndarray:
    """λ · balanced + (1 − λ) · raw, for query similarities (N,) and auxiliary-prompt similarities (N, A)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"BSAP weight λ must be in [0, 1], got {weight}")
    query_sims = np.asarray(query_sims, dtype=np.float64)
    balanced = balanced_similarity(np.column_stack([query_sims, aux_sims]), logit_scale)
    return weight * balanced + (1.0 - weight) * query_sims


@dataclass
class BSAP:
    """Knobs: ``weight`` λ (0 = plain CLIP, 1 = balanced only), ``prompts`` (the auxiliary set), ``extra_prompts``
    (e.g. the other queries of a batch), ``logit_scale`` (None = the model's own)."""

    weight: float = 0.5
    prompts: Sequence[str] = DEFAULT_PROMPTS
    extra_prompts: Sequence[str] = ()
    logit_scale: float | None = None
    name: str = "bsap"

    def phrases(self, text: str | None) -> list[str]:
        return [p for p in dict.fromkeys([*self.prompts, *self.extra_prompts]) if p != text]

    def score(self, inputs: RerankInput) -> np.ndarray:
        aux = inputs.embed(self.phrases(inputs.text))
        scale = inputs.logit_scale if self.logit_scale is None else self.logit_scale
        return bsap_scores(inputs.raw, inputs.vectors @ aux.T, scale, self.weight)
