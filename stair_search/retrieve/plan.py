"""The query plan: a :class:`SearchRequest` validated and turned into what will run, touching no index and no model.

A plan says which first-stage routes run (sparse, dense, the text route), how their lists are fused, which
rerankers score the top ``depth`` candidates and whether pseudo-relevance feedback moves the dense query, and
why (``Decision``, which every response carries). Planning is a pure function of the request and a few facts of
the index and model (``has_text``, the model's keyword weight and feedback depth), so it can be tested alone and
runs the same wherever the shards are.

``auto`` is a rule, not a model (:func:`decide`): it reads what the query says (an image, a relation, a keyword
list, a description; ``query/parse.py``) and explains itself in one sentence (``Decision.reason``), which every
response carries, so a user can see why a query went where it went.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from stair_search.query.parse import parse_query
from stair_search.query.words import FILLER_WORDS, words
from stair_search.rerank import check_names
from stair_search.retrieve.request import FUSIONS, MODES, SearchRequest

ROUTES_OF = {"sparse": ("sparse",), "dense": ("dense",), "hybrid": ("dense", "sparse")}
KEYWORD_MAX_WORDS = 3  # "red car", "grinning face": a few words and no function words lean sparse
# How far keyword queries lean sparse: the convex weight of the sparse route, for a model that does not set its
# own (StairConfig.keyword_alpha). Tuned for stair-tiny on the emoji val split (test concepts unseen): sparse
# alone lost to every hybrid there (tag nDCG@10 19.4 vs 29.3 at 0.7).
KEYWORD_ALPHA = 0.7
# Why a text query's sparse vector came out empty (the router says which: ``QueryRouter._no_sparse_cause``).
NOT_EMITTED = "none of the query's word-pieces is one the model emits"
NO_WORDS = "the query has no word the sparse route searches by (function words and punctuation only)"
TEXT_ROUTE = "the captions' text route"
RRF_NAME = "fused by rank (RRF)"


def not_indexed(words: list[str], filtered: bool = False) -> str:
    """The cause when the model emits the query's words but no indexed document (``filtered``: that passes the
    filters) carries any of them."""
    quoted = ", ".join(f"'{word}'" for word in words)
    which = "no indexed document that passes the filters" if filtered else "no indexed document"
    return f"{which} carries the query's {'word' if len(words) == 1 else 'words'} {quoted}"


@dataclass(frozen=True)
class Decision:
    mode: str
    rerank: tuple[str, ...]
    reason: str
    fusion: str | None = None  # set when the rule picks the fusion too (else the request's)
    alpha: float | None = None
    note: str | None = None  # what the user should know about this query's result (e.g. an empty sparse route)
    feedback: int = 0  # top fused hits the dense query is moved toward before the final fusion (0: none)
    # What the rule read in the query ("keyword-like query (2 word(s), ...)"): the reason names it, then what ran
    basis: str = field(default="", compare=False)

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
        basis = f"keyword-like query ({len(tokens)} word(s), no function words)"
        return Decision("hybrid", (), f"{basis}: hybrid, sparse weight {keyword_alpha}", fusion="convex",
                        alpha=keyword_alpha, feedback=feedback_docs, basis=basis)
    basis = f"descriptive query ({len(tokens)} words)"
    return Decision("hybrid", (), basis, feedback=feedback_docs, basis=basis)


def without_sparse(decision: Decision, chosen_by_auto: bool, cause: str = NOT_EMITTED,
                   text_route: bool = False) -> Decision:
    """A text query with an empty sparse vector (``cause``: why; its words are none the model emits, or none an
    indexed document carries): ``auto`` goes dense (with ``text_route``: dense and the text route) instead of
    searching a route that cannot match, and its reason names that alone; a requested mode runs as asked, with a
    note."""
    if chosen_by_auto:
        ran = f"dense and {TEXT_ROUTE}, {RRF_NAME}" if text_route else "dense"
        reason = f"{decision.basis}: {ran}" if decision.basis else decision.reason
        return replace(decision, mode="dense", fusion=None, alpha=None, feedback=0, reason=reason,
                       note=f"{cause}, so the sparse route was left out: "
                            f"{f'dense and {TEXT_ROUTE} only' if text_route else 'dense only'}")
    return replace(decision, note=f"{cause}, so the sparse route matches nothing: try mode dense, hybrid or auto")


@dataclass(frozen=True)
class Plan:
    request: SearchRequest
    decision: Decision  # what the response reports: mode, rerankers, reason, auto's fusion / feedback, a note
    routes: tuple[str, ...]  # first-stage routes, in the order they run
    fusion: str
    alpha: float
    depth: int  # candidates per route when fused or reranked, and how many fused candidates are reranked
    text_query: str | None = None  # the text route's query, when it runs

    @property
    def rerank(self) -> tuple[str, ...]:
        return self.decision.rerank

    @property
    def deep(self) -> bool:
        """Whether each route is asked for ``depth`` candidates (its list is fused or reranked)."""
        return len(self.routes) > 1 or bool(self.rerank)

    def fetch(self, wanted: int) -> int:
        """Candidates each route is asked for: ``max(wanted, depth)`` when ``deep``, else ``wanted``."""
        return max(wanted, self.depth) if self.deep else wanted

    @property
    def label(self) -> str:
        """The response's mode: the decided mode, "+text" when the text route joined it."""
        mode = self.decision.mode
        return f"{mode}+text" if self.text_query and mode != "text" else mode

    @property
    def fused_by(self) -> str | None:
        """The response's fusion: None for a single route."""
        return self.fusion if len(self.routes) > 1 else None

    def without_sparse(self, cause: str = NOT_EMITTED) -> Plan:
        """The plan once the text query's sparse vector came out empty (``cause``: why): ``auto`` drops the sparse
        route, a requested mode runs as asked with a note (:func:`without_sparse`)."""
        if self.decision.mode not in ("sparse", "hybrid"):
            return self
        by_auto = self.request.mode == "auto"
        routes = tuple(r for r in self.routes if r != "sparse") if by_auto else self.routes
        decision = without_sparse(self.decision, by_auto, cause, text_route="text" in routes)
        return replace(self, decision=decision, routes=routes)


def plan_query(request: SearchRequest, *, has_text: bool, default_depth: int, keyword_alpha: float,
               feedback_docs: int) -> Plan:
    """The plan of a text and/or image query (``request.kind == "encoded"``); ``has_text``: whether the index has a
    text route; ``keyword_alpha`` / ``feedback_docs``: the model's (``StairConfig``), for ``auto``."""
    text, mode = request.text, request.mode
    _check_common(request)
    if request.feedback is not None and request.feedback < 0:
        raise ValueError(f"feedback must be 0 or more top hits, got {request.feedback}")
    if mode == "text" and not text:
        raise ValueError("mode 'text' needs a text query")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got '{mode}'")
    if request.depth is not None and request.depth < 1:
        raise ValueError(f"depth must be a positive number of candidates, got {request.depth}")
    names = check_names(request.rerank)
    fusion, alpha = request.fusion, request.alpha
    if mode == "auto":
        decision = decide(text, request.image, keyword_alpha, feedback_docs)
        names = list(dict.fromkeys([*names, *decision.rerank]))
        decision = replace(decision, rerank=tuple(names))
        fusion, alpha = decision.fusion or fusion, decision.alpha if decision.alpha is not None else alpha
    else:
        decision = Decision(mode, tuple(names), "requested")
    if request.feedback is not None:
        if request.feedback and "dense" not in ROUTES_OF.get(decision.mode, ()):
            raise ValueError(f"feedback refines the dense query: use mode dense, hybrid or auto, not "
                             f"'{decision.mode}'")
        decision = replace(decision, feedback=request.feedback)
    # The text route: asked for, or added by auto to a text query when the index has text to search.
    wanted = decision.mode == "text" or (mode == "auto" and request.use_text)
    text_query = text if text and wanted and has_text else None
    routes = (ROUTES_OF[decision.mode] if decision.mode != "text" else ()) + (("text",) if text_query else ())
    if text_query and len(routes) > 1:
        fusion = "rrf"  # BM25 scores share no scale with the other routes': fuse by rank
        if decision.fusion not in (None, "rrf"):  # auto's own weighting does not apply: the reason says what runs
            ran = f"{decision.mode} and {TEXT_ROUTE}, {RRF_NAME}"
            decision = replace(decision, fusion="rrf", alpha=None,
                               reason=f"{decision.basis}: {ran}" if decision.basis else f"{decision.reason}; {ran}")
    return Plan(request, decision, routes, fusion, alpha, request.depth or default_depth, text_query)


def plan_vectors(request: SearchRequest, given: tuple[str, ...], default_depth: int) -> Plan:
    """The plan of a vector query (given vectors, or a stored document's): ``given`` names the routes whose
    vectors it has; ``auto`` uses every one of them."""
    _check_common(request)
    if not given:
        raise ValueError("give a dense vector, a non-empty sparse query, or both")
    mode = request.mode
    if mode == "auto":
        mode = "hybrid" if len(given) == 2 else given[0]
    if mode not in ROUTES_OF or any(r not in given for r in ROUTES_OF[mode]):
        raise ValueError(f"mode '{mode}' needs {' and '.join(ROUTES_OF.get(mode, ('a known mode',)))}; "
                         f"this query gives {' and '.join(given)}")
    return Plan(request, Decision(mode, (), "vectors"), ROUTES_OF[mode], request.fusion, request.alpha,
                default_depth)


def _check_common(request: SearchRequest) -> None:
    if request.offset < 0:
        raise ValueError(f"offset must be 0 or more, got {request.offset}")
    if request.fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got '{request.fusion}'")
