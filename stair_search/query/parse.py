"""A small, offline, rule-based parser of search queries into entities and subject–predicate–object relations.

Why rules and not a model: ComCLIP needs only "which noun phrases, with which attributes, in which relation"
for short search queries ("a red circle left of a blue square", "a man holding a cup"), and a fixed list of
relation phrases covers what image search queries use. No network, no model, microseconds per query.

How: the text is lower-cased and split into words; relation phrases (longest first: "to the left of" before
"left of" before "of"-less words) split it into segments; each segment's last content word is the entity's
noun and its earlier content words are its attributes (colours, sizes, any adjective); two entities around a
relation phrase give a triple. "and" or a comma separates entities without a relation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from stair_search.query.words import FILLER_WORDS, tokens

# phrase as written -> canonical predicate
PREDICATES: dict[str, str] = {
    "to the left of": "left of", "on the left of": "left of", "left of": "left of",
    "to the right of": "right of", "on the right of": "right of", "right of": "right of",
    "on top of": "on", "in front of": "in front of", "next to": "next to", "close to": "near",
    "above": "above", "over": "above", "below": "below", "beneath": "below", "under": "under",
    "underneath": "under", "beside": "next to", "near": "near", "behind": "behind", "inside": "in",
    "on": "on", "in": "in", "with": "with", "holding": "holding", "riding": "riding", "wearing": "wearing",
    "eating": "eating", "carrying": "carrying", "playing with": "playing with", "sitting on": "on",
    "standing on": "on", "lying on": "on",
}
SPATIAL = ("left of", "right of", "above", "below", "under", "on")
SEPARATORS = {"and", ","}
COLOURS = {"red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown", "grey",
           "gray", "gold", "silver"}
SIZES = {"big", "small", "large", "tiny", "little", "huge", "tall", "short", "long"}
_PHRASES = sorted(((tuple(p.split()), c) for p, c in PREDICATES.items()), key=lambda pc: -len(pc[0]))


@dataclass(frozen=True)
class Entity:
    noun: str
    attributes: tuple[str, ...] = ()

    @property
    def phrase(self) -> str:
        return " ".join([*self.attributes, self.noun])


@dataclass(frozen=True)
class Relation:
    subject: int  # index into ParsedQuery.entities
    predicate: str  # canonical form, e.g. "left of"
    object: int


@dataclass
class ParsedQuery:
    text: str
    entities: list[Entity] = field(default_factory=list)
    relations: list[Relation] = field(default_factory=list)

    def relation_phrase(self, relation: Relation) -> str:
        """"red circle left of blue square": the key text of a relation (subject, predicate, object)."""
        subject, obj = self.entities[relation.subject], self.entities[relation.object]
        return f"{subject.phrase} {relation.predicate} {obj.phrase}"

    def triples(self) -> list[tuple[str, str, str]]:
        return [(self.entities[r.subject].phrase, r.predicate, self.entities[r.object].phrase)
                for r in self.relations]


def content_words(text: str) -> list[str]:
    """Words that are neither stop words nor relation phrases nor separators: what a query is about."""
    relation_words = {w for phrase, _ in _PHRASES for w in phrase}
    return [w for w in tokens(text) if w not in FILLER_WORDS and w not in SEPARATORS and w not in relation_words]


def parse_query(text: str) -> ParsedQuery:
    """Entities (noun + attributes) and relations of ``text``; see the module doc for the rules."""
    parsed = ParsedQuery(text)
    segment: list[str] = []
    pending: str | None = None  # a predicate waiting for its object
    subject: int | None = None
    found, i = tokens(text), 0
    while i <= len(found):
        match = _match_predicate(found, i) if i < len(found) else None
        boundary = i == len(found) or match is not None or found[i] in SEPARATORS
        if not boundary:
            segment.append(found[i])
            i += 1
            continue
        entity = _entity(segment)
        segment = []
        if entity is not None:
            parsed.entities.append(entity)
            index = len(parsed.entities) - 1
            if pending is not None and subject is not None:
                parsed.relations.append(Relation(subject, pending, index))
            subject = index
        if match is not None:
            pending = match[1]
            i += match[0]
        else:
            pending = None
            if i < len(found):
                subject = None  # "and" / "," ends the relation chain
            i += 1
    return parsed


def _match_predicate(tokens: list[str], i: int) -> tuple[int, str] | None:
    for phrase, canonical in _PHRASES:
        if tuple(tokens[i : i + len(phrase)]) == phrase:
            return len(phrase), canonical
    return None


def _entity(segment: list[str]) -> Entity | None:
    content = [w for w in segment if w not in FILLER_WORDS]
    if not content:
        return None
    return Entity(noun=content[-1], attributes=tuple(content[:-1]))
