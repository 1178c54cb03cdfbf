"""Benchmark data sets: real emoji images with human-written text, and synthetic compositional scenes."""

from stair_search.eval.datasets.emoji import EmojiDataset, build_emoji_dataset
from stair_search.eval.datasets.synthetic import CompositionalExample, make_compositional, write_compositional

__all__ = ["CompositionalExample", "EmojiDataset", "build_emoji_dataset", "make_compositional", "write_compositional"]
