"""The ``auto`` routing decision: which routes, fusion and rerankers a query gets, from the query alone.

A rule, not a model: it reads what the query says (an image, a relation, a keyword list, a description) and
explains itself in one sentence (``Decision.reason``), which every response carries, so a user can see why a
query went where it went.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from PIL import Image

from stair_search.query.parse import parse_query
from stair_search.query.words import FILLER_WORDS, words

KEYWORD_MAX_WORDS = 3  # "red car", "grinning face": a few words and no function words lean sparse
# How far keyword queries lean sparse: the convex weight of the sparse route, for a model that does not set its
# own (StairConfig.keyword_alpha). Tuned for stair-tiny on the emoji val split (test concepts unseen): sparse
# alone lost to every hybrid there (tag nDCG@10 19.4 vs 29.3 at 0.7).
KEYWORD_ALPHA = 0.7
NO_SPARSE_TOKENS = ("none of the query's word-pieces is one the model emits, so the sparse route matches "
                    "nothing")


@dataclass(frozen=True)
class Decision:
    mode: str
    rerank: tuple[str, ...]
    reason: str
    fusion: str | None = None  # set when the rule picks the fusion too (else the request's)
    alpha: float | None = None
    note: str | None = None  # what the user should know about this query's result (e.g. an empty sparse route)
    feedback: int = 0  # top fused hits the dense query is moved toward before the final fusion (0: none)

    def to_dict(self) -> dict[str, Any]:
        chosen = {"fusion": self.fusion, "alpha": self.alpha} if self.fusion else {}
        return {"mode": self.mode, "rerank": list(self.rerank), "reason": self.reason} | chosen | (
            {"note": self.note} if self.note else {}) | ({"feedback": self.feedback} if self.feedback else {})


def decide(text: str | None, image: Image.Image | None, keyword_alpha: float = KEYWORD_ALPHA,
           feedback_docs: int = 0) -> Decision:
    """The ``auto`` routing rule, from the query alone.

    - an image (with or without text) -> dense: appearance lives in the dense space;
    - a relational phrase ("a red circle left of a blue square", "a man holding a cup") -> hybrid + ComCLIP,
      the reranker that reads who is where;
    - a short keyword-like query (at most 3 words, no function words) -> hybrid leaning sparse (convex,
      alpha = ``keyword_alpha``, the model's ``StairConfig.keyword_alpha``, tuned on the val split): exact word
      matches are what the user typed and the sparse route says which
      matched, while the dense route rescues the images whose words the sparse head missed;
    - anything longer (descriptive) -> hybrid.

    Keyword-like and descriptive queries also get pseudo-relevance feedback from their ``feedback_docs`` top
    fused hits (the model's ``StairConfig.feedback_docs``, tuned on the val split; 0: none); a relational phrase
    does not (its reranker reads the query's own parts, and no val set measured feedback there).
    """
    if image is not None:
        return Decision("dense", (), "image query: compared by appearance in the dense space")
    if not text or not text.strip():
        raise ValueError("A query needs a text, an image, or both.")
    parsed = parse_query(text)
    if parsed.relations:
        subject, predicate, obj = parsed.triples()[0]
        return Decision("hybrid", ("comclip",),
                        f"relational phrase ({subject!r} {predicate} {obj!r}): hybrid + compositional reranker")
    tokens = words(text)
    if len(tokens) <= KEYWORD_MAX_WORDS and not FILLER_WORDS.intersection(tokens):
        return Decision("hybrid", (), f"keyword-like query ({len(tokens)} word(s), no function words): "
                        f"hybrid, sparse weight {keyword_alpha}", fusion="convex", alpha=keyword_alpha,
                        feedback=feedback_docs)
    return Decision("hybrid", (), f"descriptive query ({len(tokens)} words)", feedback=feedback_docs)


def without_sparse(decision: Decision, chosen_by_auto: bool) -> Decision:
    """A text query with an empty sparse vector (its words are none the model learnt to emit): ``auto`` goes
    dense instead of searching a route that cannot match; a requested mode runs as asked, with a note."""
    if chosen_by_auto:
        return replace(decision, mode="dense", fusion=None, alpha=None, feedback=0,
                       note=f"{NO_SPARSE_TOKENS}: dense only")
    return replace(decision, note=f"{NO_SPARSE_TOKENS}: try mode dense, hybrid or auto")
