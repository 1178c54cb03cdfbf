"""Splits by concept and the caption of an emoji: the rules the training corpus and the evaluation set share.

A concept (an emoji's code, whatever its style) falls in one split by a hash of ``(seed, concept)``, so a test
emoji is unseen in every style and every source that draws it; the evaluation set (eval/datasets/emoji.py) and
the training corpus (data/corpus.py) both read the rule here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)  # train, val, test


def split_of(concept: str, seed: int = 0, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of ``concept``: a hash of ``(seed, concept)`` mapped to [0, 1) and cut at the fractions."""
    digest = hashlib.sha256(f"{seed}:{concept}".encode()).digest()
    point = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in zip(SPLITS, fractions, strict=True):
        edge += fraction
        if point < edge:
            return name
    return SPLITS[-1]  # rounding of fractions that sum to 1


def caption_for(label: str, tags: Sequence[str]) -> str:
    """Training text: the label, then the tags that add something to it, e.g. ``"grinning face, face, grin"``."""
    extra = [tag for tag in dict.fromkeys(tags) if normalise_text(tag) != normalise_text(label)]
    return ", ".join([label, *extra])


def normalise_text(text: str) -> str:
    """Lower-cased, whitespace collapsed: how a tag is compared with a label."""
    return " ".join(text.lower().split())
