"""Fusion of ranked lists from several routes (sparse, dense), each keeping its per-route score parts.

- RRF (Cormack et al., 2009): score = sum over routes of 1 / (k + rank), rank from 1. Needs no score
  calibration, so it is the default for mixing Lucene impact scores with cosine similarities.
- Convex: min-max normalise each route's scores over its list, then alpha * first + (1 - alpha) * second.
  A document absent from a route's list gets 0 for that route. A route may give its floor, the score every
  document outside its list is known to have (a sparse list shorter than asked for holds every match, so the
  rest score 0): the list is normalised from that floor, not from its own last score, so its weakest match
  still counts for more than no match (stair-lite-4's keyword tag nDCG@10 on the emoji val split: +2.1 / +1.7
  / -0.1 for Google / Twitter / both; on test +0.1 to +0.2: docs/models.md).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

RRF_K = 60


@dataclass
class Fused:
    key: Hashable
    score: float
    parts: dict[str, float] = field(default_factory=dict)  # route -> that route's raw score


def rrf(lists: Mapping[str, Sequence[tuple[Hashable, float]]], k: int = RRF_K) -> list[Fused]:
    """``lists``: route -> [(key, score)] best first. Returns fused hits best first (ties: first seen)."""
    fused: dict[Hashable, Fused] = {}
    for route, ranked in lists.items():
        for rank, (key, score) in enumerate(ranked, start=1):
            hit = fused.setdefault(key, Fused(key, 0.0))
            hit.score += 1.0 / (k + rank)
            hit.parts[route] = score
    return sorted(fused.values(), key=lambda h: -h.score)


def convex(lists: Mapping[str, Sequence[tuple[Hashable, float]]], alpha: float = 0.5,
           floors: Mapping[str, float] | None = None) -> list[Fused]:
    """Weighted sum of min-max normalised scores; ``alpha`` weighs the first route, 1 - alpha the second.
    ``floors``: route -> the score of every document outside its list, normalised from instead of its minimum."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if len(lists) > 2:
        raise ValueError(f"convex fusion mixes two routes, got {list(lists)}")
    weights = dict(zip(lists, (alpha, 1.0 - alpha), strict=False))
    fused: dict[Hashable, Fused] = {}
    for route, ranked in lists.items():
        scores = [s for _, s in ranked]
        lo, hi = (min(scores), max(scores)) if scores else (0.0, 0.0)
        lo = min(lo, (floors or {}).get(route, lo))
        for key, score in ranked:
            norm = (score - lo) / (hi - lo) if hi > lo else 1.0
            hit = fused.setdefault(key, Fused(key, 0.0))
            hit.score += weights[route] * norm
            hit.parts[route] = score
    return sorted(fused.values(), key=lambda h: -h.score)
