"""Sparse query expansion: WordNet synonyms that are single word-pieces join a sparse query at a lower weight.

Why on the sparse route only: the dense route already places synonyms near each other, while a sparse query
matches only the exact word-pieces it holds; a user typing "automobile" should also match images that carry
``car``. Added tokens are returned with the word they came from, so an explanation can say so.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from stair_search.query import wordnet
from stair_search.query.parse import content_words

SynonymSource = Callable[[str], Sequence[str]]  # word -> synonyms (WordNet by default; any callable, e.g. an LLM)


def expand_sparse(query: Mapping[str, float], text: str, vocabulary, expansion: float = 0.3, per_word: int = 3,
                  source: SynonymSource | None = None) -> tuple[dict[str, float], dict[str, str]]:
    """The sparse query plus synonym tokens with down-weighted impacts, and {added token: the word it came from}.

    A synonym joins only when it is a single emittable word-piece (a multi-piece word would add generic
    sub-word pieces); its weight = ``expansion`` x the query's weight for the original word (or the query's
    largest weight when the word itself is not one of its tokens). Existing tokens are never changed.
    """
    expanded, added = dict(query), {}
    top = max(query.values(), default=1.0)
    for word in content_words(text):
        base = query.get(word, top)
        for synonym in list(source(word) if source else wordnet.synonyms(word, limit=per_word))[:per_word]:
            ids = vocabulary.token_ids(synonym)
            if len(ids) != 1 or not bool(vocabulary.emittable[ids[0]]):
                continue
            token = vocabulary.tokens[ids[0]]
            if token not in expanded:
                expanded[token], added[token] = expansion * base, word
    return expanded, added
