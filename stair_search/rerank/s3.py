"""S^3: Synonymous Semantic Space (arXiv 2412.04925): a concept is a space of synonyms, not one point.

Why: one label embedding ("dog") is a noisy point; a few synonyms ("domestic dog", "canis familiaris") span a
region that describes the concept more robustly. WordNet also returns unrelated senses ("dog" -> "frump"); the
Vietoris–Rips step removes them.

- Synonym set of a concept: the label, its WordNet synonyms (Debian ``wordnet-base`` read with nltk, see
  :mod:`stair_search.query.wordnet`), then any given tags (the data set's CLDR tags). Without WordNet files S^3
  refuses (``WordNetMissing``, naming the fix) instead of silently scoring the label alone. An optional
  ``synonyms`` callable (e.g. an LLM, or ``lambda _: []`` for the label alone) replaces WordNet.
- Embed them; Vietoris–Rips graph at radius ε (an edge when two embeddings are closer than ε, Euclidean on unit
  vectors); keep the largest connected component (0-dimensional persistence at ε; ties: the one holding the
  label). Default ε: the median pairwise distance of the set, so a synonym far from all others drops out.
- Point-to-local-centre score: centre = mean of the ``k`` component embeddings nearest the image; score =
  cos(image, centre).

Uses: (a) zero-shot classification (:func:`classify`, ``stair-search classify``); (b) reranking, the query's own
space being the query plus variants with one content word replaced by a synonym, mixed with the raw
similarity by ``weight``; (c) query expansion on the sparse route (``query.expand.expand_sparse``, with this
reranker's ``expansion`` weight).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from stair_search.query import wordnet
from stair_search.query.expand import SynonymSource
from stair_search.query.parse import content_words
from stair_search.query.words import words
from stair_search.rerank.base import RerankInput
from stair_search.vectors import unit


def pairwise_distances(points: np.ndarray) -> np.ndarray:
    """(n, n) Euclidean distances."""
    points = np.asarray(points, dtype=np.float64)
    squared = (points * points).sum(axis=1)
    return np.sqrt(np.clip(squared[:, None] + squared[None, :] - 2.0 * points @ points.T, 0.0, None))


def default_epsilon(points: np.ndarray) -> float:
    """The median distance between distinct points (0 for a single point)."""
    distances = pairwise_distances(points)
    upper = distances[np.triu_indices(len(points), k=1)]
    return float(np.median(upper)) if upper.size else 0.0


def rips_component(points: np.ndarray, epsilon: float | None = None) -> np.ndarray:
    """Sorted indices of the largest connected component of the Vietoris–Rips graph of ``points`` at ``epsilon``
    (edge when distance <= epsilon); ties go to the component holding the lowest index (the label)."""
    points = np.asarray(points, dtype=np.float64)
    if len(points) == 0:
        raise ValueError("a synonym space needs at least one point")
    epsilon = default_epsilon(points) if epsilon is None else epsilon
    adjacency = csr_matrix(pairwise_distances(points) <= epsilon)
    _, labels = connected_components(adjacency, directed=False)
    sizes = np.bincount(labels)
    best = max(range(len(sizes)), key=lambda c: (sizes[c], -int(np.argmax(labels == c))))
    return np.flatnonzero(labels == best)


def local_centre_scores(x: np.ndarray, space: np.ndarray, k: int = 3) -> np.ndarray:
    """(N,) cos(x_i, mean of the k points of ``space`` (n, D) nearest x_i) for points x (N, D)."""
    x, space = np.atleast_2d(np.asarray(x, dtype=np.float64)), np.asarray(space, dtype=np.float64)
    k = max(1, min(k, len(space)))
    distances = np.linalg.norm(x[:, None, :] - space[None, :, :], axis=-1)  # (N, n)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    centres = space[nearest].mean(axis=1)
    return np.sum(unit(x) * unit(centres), axis=-1)


def concept_synonyms(label: str, tags: Sequence[str] = (), limit: int = 8,
                     source: SynonymSource | None = None) -> list[str]:
    """[label, up to ``limit`` synonyms (``source`` or WordNet), tags], without repeats."""
    found = list(source(label) if source else wordnet.synonyms(label, limit=limit))[:limit]
    return list(dict.fromkeys([label, *found, *tags]))


def query_variants(text: str, limit: int = 4, per_word: int = 3, source: SynonymSource | None = None) -> list[str]:
    """The query, then up to ``limit`` copies with one content word replaced by one of its synonyms.

    Round-robin over the words (each word's first synonym, then each word's second, ...), so a short ``limit``
    still covers every word instead of spending itself on the first one. Each variant is one more text to
    embed per query, so ``limit`` is the S^3 reranker's latency knob.
    """
    lists = [(word, list(source(word) if source else wordnet.synonyms(word, limit=per_word))[:per_word])
             for word in content_words(text)]
    variants = [text]
    for rank in range(per_word):
        for word, synonyms in lists:
            if rank < len(synonyms):
                variants.append(" ".join(synonyms[rank] if w == word else w for w in words(text)))
    return list(dict.fromkeys(variants))[: limit + 1]


def classify(encoder, image, labels: Sequence[str], tags: Mapping[str, Sequence[str]] | None = None,
             epsilon: float | None = None, k: int = 3, template: str = "{}", limit: int = 8,
             source: SynonymSource | None = None) -> list[tuple[str, float]]:
    """Zero-shot classification of one PIL image: (label, point-to-local-centre score), best first.

    One text-encoder call embeds every label's synonyms (formatted with ``template``, e.g. "a photo of {}").
    """
    labels = [label.strip() for label in labels if label.strip()]
    if not labels:
        raise ValueError("classify needs at least one label, e.g. --labels cat,dog")
    if "{}" not in template:
        raise ValueError(f"template must contain '{{}}' where the label goes, got {template!r}")
    sets = [concept_synonyms(label, (tags or {}).get(label, ()), limit, source) for label in labels]
    texts = [template.format(s) for synonyms in sets for s in synonyms]
    embedded = encoder.embed_texts(texts)
    image_vector = encoder.encode_images([image]).dense
    scores, start = [], 0
    for synonyms in sets:
        space = embedded[start : start + len(synonyms)]
        start += len(synonyms)
        kept = space[rips_component(space, epsilon)]
        scores.append(float(local_centre_scores(image_vector, kept, k)[0]))
    return sorted(zip(labels, scores, strict=True), key=lambda pair: -pair[1])


@dataclass
class S3:
    """Knobs: ``weight`` (0 = raw similarity only, 1 = S^3 only), ``k`` (local centre size), ``epsilon`` (None =
    median distance), ``limit`` (variants per query), ``expansion`` (sparse synonym weight; 0 = no expansion),
    ``source`` (synonym callable replacing WordNet)."""

    weight: float = 0.5
    k: int = 3
    epsilon: float | None = None
    limit: int = 4
    expansion: float = 0.3
    source: SynonymSource | None = None
    name: str = "s3"

    def phrases(self, text: str | None) -> list[str]:
        """The query's synonym variants, without the query itself: its embedding is already ``inputs.query``."""
        return query_variants(text, self.limit, source=self.source)[1:] if text else []

    def score(self, inputs: RerankInput) -> np.ndarray:
        if not inputs.text:
            return inputs.raw
        space = np.concatenate([inputs.query[None], inputs.embed(self.phrases(inputs.text))])
        kept = space[rips_component(space, self.epsilon)]
        return (1.0 - self.weight) * inputs.raw + self.weight * local_centre_scores(inputs.vectors, kept, self.k)
