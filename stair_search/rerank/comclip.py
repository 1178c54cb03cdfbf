"""ComCLIP: compositional image–text matching, training-free (NAACL 2024), on stored local features.

Why: a global CLIP embedding is close to a bag of words, so "a red circle left of a blue square" and "a blue
circle left of a red square" score alike. ComCLIP scores the image again after adding the embeddings of the
sub-images that match each part of the query, weighted by how well they match it.

- Parse the query into entities (noun + attributes) and subject–predicate–object relations
  (:mod:`stair_search.query.parse`: offline rules, no LLM).
- Entity sub-image (training-free stand-in for the authors' detector boxes): the mean of the candidate's
  ``patches_per_entity`` stored local features most similar to the entity phrase. Predicate sub-image: the
  union of its subject's and object's patches; its key text is the whole relation phrase ("red circle left of
  blue square"), a sharper key than the bare verb the authors used. A key text that is the whole query (up to
  stop words) is the query's own embedding: one text fewer to embed per query.
- s_k = cos(key text, sub-image vector); w_k = s_k / Σ_j s_j as in the authors' code (negative similarities are
  clamped to 0, all-zero gives equal weights), or a softmax at ``temperature`` (``weighting="softmax"``).
- v = normalise(v_global + Σ_k w_k v_k); score = cos(full query embedding, v).
- Optional (``spatial_weight`` > 0): the stored patch positions check left of / right of / above / below /
  on / under: agreement = tanh(``spatial_gain`` · signed offset between the subject's and object's patch
  centroids), averaged over the spatial relations and added with that weight. Off by default: measured in
  ``benchmarks/rerank_quality.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stair_search.query.parse import ParsedQuery, parse_query
from stair_search.query.words import FILLER_WORDS, words
from stair_search.rerank.base import RerankInput
from stair_search.vectors import unit

WEIGHTINGS = ("normalise", "softmax")
# predicate -> (axis, sign): the subject's centroid minus the object's, along x (0) or y (1, downwards), times
# sign, is positive when the relation holds.
SPATIAL_AXES = {"left of": (0, -1.0), "right of": (0, 1.0), "above": (1, -1.0), "on": (1, -1.0),
                "below": (1, 1.0), "under": (1, 1.0)}


def component_weights(similarities: np.ndarray, weighting: str = "normalise", temperature: float = 100.0
                      ) -> np.ndarray:
    """(N, K) weights per candidate from sub-image–text similarities (N, K); each row sums to 1."""
    sims = np.asarray(similarities, dtype=np.float64)
    if weighting == "softmax":
        logits = sims * temperature
        weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return weights / weights.sum(axis=-1, keepdims=True)
    if weighting != "normalise":
        raise ValueError(f"ComCLIP weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    positive = np.clip(sims, 0.0, None)
    total = positive.sum(axis=-1, keepdims=True)
    uniform = np.full_like(positive, 1.0 / max(positive.shape[-1], 1))
    return np.where(total > 0, positive / np.where(total > 0, total, 1.0), uniform)


def compose(global_vectors: np.ndarray, components: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(N, D) normalise(v_global + Σ_k w_k v_k) for globals (N, D), components (N, K, D), weights (N, K)."""
    return unit(global_vectors + np.einsum("nk,nkd->nd", weights, components))


def entity_subimages(local: np.ndarray, phrases: np.ndarray, top: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate (local (N, m, D)) and entity phrase (E, D): the chosen patch indices (N, E, top) and
    the sub-image vectors (N, E, D) = unit mean of those patches."""
    sims = np.einsum("nmd,ed->nem", local, phrases)
    top = min(top, local.shape[1])
    chosen = np.argsort(-sims, axis=-1, kind="stable")[..., :top]
    patches = np.take_along_axis(local[:, None], chosen[..., None], axis=2)  # (N, E, top, D)
    return chosen, unit(patches.mean(axis=2))


def spatial_agreement(positions: np.ndarray, chosen: np.ndarray, parsed: ParsedQuery, gain: float = 10.0
                      ) -> np.ndarray:
    """(N,) mean over spatial relations of tanh(gain · signed centroid offset); 0 when there is none."""
    centroids = np.take_along_axis(positions[:, None], chosen[..., None], axis=2).mean(axis=2)  # (N, E, 2)
    agreements = []
    for relation in parsed.relations:
        if relation.predicate not in SPATIAL_AXES:
            continue
        axis, sign = SPATIAL_AXES[relation.predicate]
        offset = centroids[:, relation.subject, axis] - centroids[:, relation.object, axis]
        agreements.append(np.tanh(gain * sign * offset))
    return np.mean(agreements, axis=0) if agreements else np.zeros(len(positions))


@dataclass
class ComCLIP:
    """Knobs: ``weighting`` ("normalise" as the authors' code, or "softmax" at ``temperature``),
    ``patches_per_entity``, ``spatial_weight`` (0 = off) and ``spatial_gain``."""

    weighting: str = "normalise"
    temperature: float = 100.0
    patches_per_entity: int = 2
    spatial_weight: float = 0.0
    spatial_gain: float = 10.0
    name: str = "comclip"

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"ComCLIP weighting must be one of {WEIGHTINGS}, got {self.weighting!r}")

    def phrases(self, text: str | None) -> list[str]:
        """Entity and relation key texts to embed. A key that is the whole query (a one-word query's entity, or
        "red circle left of blue square" for "a red circle left of a blue square") uses the query's own embedding
        instead: one text fewer to embed per query."""
        if not text:
            return []
        parsed = parse_query(text)
        keys = [e.phrase for e in parsed.entities] + [parsed.relation_phrase(r) for r in parsed.relations]
        return list(dict.fromkeys(k for k in keys if _content(k) != _content(text)))

    def score(self, inputs: RerankInput) -> np.ndarray:
        parsed = parse_query(inputs.text or "")
        if not parsed.entities:
            return inputs.raw
        whole = _content(inputs.text or "")

        def key_vectors(phrases: list[str]) -> np.ndarray:
            return np.stack([inputs.query if _content(p) == whole else inputs.embed([p])[0] for p in phrases])

        entity_text = key_vectors([e.phrase for e in parsed.entities])
        chosen, entity_vectors = entity_subimages(inputs.local, entity_text, self.patches_per_entity)
        keys, vectors = [entity_text], [entity_vectors]
        if parsed.relations:
            keys.append(key_vectors([parsed.relation_phrase(r) for r in parsed.relations]))
            vectors.append(unit(np.stack([entity_vectors[:, r.subject] + entity_vectors[:, r.object]
                                          for r in parsed.relations], axis=1)))
        key_text, components = np.concatenate(keys), np.concatenate(vectors, axis=1)
        sims = np.einsum("nkd,kd->nk", components, key_text)
        weights = component_weights(sims, self.weighting, self.temperature)
        score = compose(inputs.vectors, components, weights) @ inputs.query
        if self.spatial_weight:
            score = score + self.spatial_weight * spatial_agreement(inputs.positions, chosen, parsed,
                                                                    self.spatial_gain)
        return score


def _content(text: str) -> str:
    """A text's words without stop words: "a red circle to the left of a square" -> "red circle left square"."""
    return " ".join(w for w in words(text) if w not in FILLER_WORDS)
