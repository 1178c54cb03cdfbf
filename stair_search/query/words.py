"""The one word splitter and the two stop-word lists, each named for what it is for.

- ``FUNCTION_WORDS``: grammar words (articles, prepositions, conjunctions, auxiliaries). A query's own word is
  raised to the model's ``text_floor`` unless it is one of these, and the ImageNet prior's class words leave
  them out: a sparse match on "of" or "with" says nothing true about an image.
- ``FILLER_WORDS``: what a query is never *about*: determiners, copulas and the "photo of" / "picture of" frame.
  The parser drops them from entities, the router's keyword rule treats a query holding one as a sentence, and
  ComCLIP's phrases leave them out. Prepositions are not filler: "left of", "on", "with" carry the relations.
"""

from __future__ import annotations

import re

FUNCTION_WORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "from", "has", "have", "in", "into", "is", "it",
    "its", "of", "on", "or", "over", "the", "their", "this", "to", "under", "was", "with", "without",
))
FILLER_WORDS = frozenset((
    "a", "an", "the", "some", "this", "that", "these", "those", "is", "are", "was", "be", "there", "its", "it",
    "of", "to", "for", "at", "by", "from", "as", "photo", "picture", "image",
))
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|,")


def tokens(text: str) -> list[str]:
    """Lower-cased words (a word may hold an apostrophe: "don't") and commas, which separate entities."""
    return _TOKEN.findall(text.lower())


def words(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped."""
    return [t for t in tokens(text) if t != ","]


def is_content_piece(token: str) -> bool:
    """Whether a word-piece is worth showing as a matched word: it holds a letter or digit (punctuation does
    not) and is not a grammar word (``FUNCTION_WORDS``). A true match either way; only what is shown differs."""
    bare = token.removeprefix("##").removesuffix("</w>")
    return any(c.isalnum() for c in bare) and bare.lower() not in FUNCTION_WORDS
