"""Training-free sparse vectors for any dual encoder: an image's calibrated similarity to a vocabulary of words.

Why: a real CLIP checkpoint has no trained STAIR heads, and random heads write random words (a red circle that
"matches" ``sympathy`` and ``solo``), so the explanations lie. Its own text tower already places words in the
image space, so a sparse vector can be read off the dense one, with no training:

- **Concepts**: the vocabulary's content words (whole word-pieces, alphabetic, at least 3 letters, no stop
  words; ~20k for the MiniLM vocabulary), each embedded once through the model's text tower and averaged over a
  prompt ensemble (``PROMPTS``), stored in a cache file beside the other data (``paths.concepts_dir``), keyed by
  the model's dense weights (``checkpoint.dense_fingerprint``: models that differ only in their sparse heads share
  one bank); the word embeddings alone are cached by the text tower's weights (``checkpoint.text_fingerprint``),
  so a model with another image side but the same text tower is calibrated in seconds, not re-embedded.
- **Centring** (the modality gap, as in SpLiCE, Bhalla et al. 2024): image embeddings are compared after
  subtracting the mean reference image, concepts after subtracting the mean concept.
- **Alignment** (optional, ``StairConfig.concept_alignment``): a linear map of the centred image embedding, trained
  on image-caption pairs to put each image near its caption's words (``train/alignment.py``, DeViSE-style); the
  identity when there is none, so the bank stays training-free.
- **Calibration**: each concept's centred cosine is standardised over the reference images (mean and standard
  deviation per concept, shrunk toward the global spread), so a word close to *every* image ("image",
  "object") does not win everywhere. An image's vector is its ``top_k`` concepts with a z-score of at least
  ``MIN_Z``, weight ``z / Z_SCALE``: non-negative, sparse, and "matched ``dog`` 0.8" means the image is unusually
  close to the word "dog".
- **Queries** keep their own words that are concepts (a word the vocabulary splits into pieces is none), each
  weighted by rarity: the MiniLM/BERT word-pieces are numbered by corpus frequency from id 1996 on, so
  ``log(rank)`` is a Zipf estimate of a word's inverse document frequency, and a rare word counts more.

The reference images are scikit-image's sample photos (and four crops of each) unless the caller gives its own;
the bank is computed in float64 on CPU from fixed inputs, so two processes write the same vectors. An image's
sparse vector (:meth:`ConceptBank.image_vectors`, what image indexing and indexing embeddings both call) is scored
in float32, a block of images at a time, as one BLAS product with the calibration folded into the concept matrix,
and its top concepts are picked without sorting a whole row (:func:`top_columns`): a 21k-concept bank scores
thousands of images a second, where a float64 product and a full partition per image scored ~100.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import pairwise
from pathlib import Path

import numpy as np
from PIL import Image

from stair_search.vectors import unit
from stair_search.vocabulary import Vocabulary

PROMPTS = ("a photo of a {}.", "{}")
FIRST_RANKED_ID = 1996  # BERT word-pieces from here on are ordered by corpus frequency ("the" = 1996)
MIN_Z = 1.0  # a concept joins an image's vector when it is this many standard deviations above its mean
Z_SCALE = 4.0  # weight = z / Z_SCALE: a strong match (z ~ 4) weighs ~1, like a trained head's
SHRINK = 8.0  # pseudo-count pulling each concept's variance toward the pooled variance (few reference images)
CACHE_FORMAT = 1
SCORE_ROWS = 256  # images scored at once: a (256, N) float32 block, ~21 MB for ~21k concepts
CALIBRATION_ROWS = 2048  # reference images compared at once while calibrating: memory bounded by the block
SAMPLE_STRIDE = 8  # top_columns guesses each row's threshold from every 8th column


@dataclass
class ConceptBank:
    token_ids: np.ndarray  # (N,) vocabulary ids of the concepts
    embeddings: np.ndarray  # (N, D) centred unit concept embeddings
    image_mean: np.ndarray  # (D,) mean unit reference image embedding (subtracted before comparing)
    mean: np.ndarray  # (N,) per-concept mean centred cosine over the reference images
    std: np.ndarray  # (N,) per-concept (shrunk) standard deviation
    vocabulary: Vocabulary
    image_map: np.ndarray | None = None  # (D, D) trained alignment of centred image embeddings (None: identity)

    # ------------------------------------------------------------------------------------------ vectors

    def z_scores(self, dense: np.ndarray) -> np.ndarray:
        """(B, D) unit image embeddings -> (B, N) standardised similarity to each concept."""
        centred = centred_images(dense, self.image_mean, self.image_map)
        return (centred @ self.embeddings.T - self.mean) / self.std

    def image_weights(self, dense: np.ndarray) -> np.ndarray:
        """(B, V) float32 weights over the whole vocabulary: z / Z_SCALE for each concept with z >= MIN_Z, else 0
        (what "heads+concepts" adds to a trained head's weights before its top-k cut)."""
        z = self.z_scores(dense)
        weights = np.zeros((len(z), len(self.vocabulary.tokens)), np.float32)
        weights[:, self.token_ids] = np.where(z >= MIN_Z, z / Z_SCALE, 0.0)
        return weights

    def image_vectors(self, dense: np.ndarray, top_k: int) -> list[dict[str, float]]:
        """The sparse vector of each image: its ``top_k`` concepts with z >= MIN_Z, weight z / Z_SCALE (float32
        scoring, :meth:`top_concepts`)."""
        indptr, columns, z = self.top_concepts(dense, top_k)
        names = self._names[columns].tolist()
        weights = np.round(z.astype(np.float64) / Z_SCALE, 6).tolist()
        bounds = indptr.tolist()
        return [dict(zip(names[a:b], weights[a:b], strict=True)) for a, b in pairwise(bounds)]

    def image_csr(self, dense: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`image_vectors` as CSR over the vocabulary: (B + 1,) int64 indptr, token ids ascending in each
        row, float64 weights (the same rounded weights): what an index stores, without a dict per image."""
        indptr, columns, z = self.top_concepts(dense, top_k)
        tokens = self.token_ids[columns]
        rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
        order = np.lexsort((tokens, rows))
        return indptr, tokens[order], np.round(z[order].astype(np.float64) / Z_SCALE, 6)

    def top_concepts(self, dense: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Each image's up to ``top_k`` concepts with z >= MIN_Z, highest first: (B + 1,) int64 indptr, concept
        columns (into ``token_ids``) and their float32 z-scores. Scored :data:`SCORE_ROWS` images at a time."""
        matrix, image_mean, image_map = self._scoring
        dense = np.asarray(dense, np.float32)
        counts, columns, scores = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.float32)]
        for start in range(0, len(dense), SCORE_ROWS):
            centred = dense[start : start + SCORE_ROWS] - image_mean
            if image_map is not None:
                centred = centred @ image_map.T
            centred = unit(centred)
            lifted = np.empty((len(centred), centred.shape[1] + 1), np.float32)
            lifted[:, :-1], lifted[:, -1] = centred, 1.0  # the last row of ``matrix`` is -mean / std
            row_counts, row_columns, row_scores = top_columns(lifted @ matrix, top_k, MIN_Z)
            counts.append(row_counts)
            columns.append(row_columns)
            scores.append(row_scores)
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
        return indptr, np.concatenate(columns), np.concatenate(scores)

    @cached_property
    def _scoring(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """float32 (D + 1, N) concept matrix with the calibration folded in (column n: embedding / std, then
        -mean / std, so [centred, 1] @ matrix is the z-scores), the image mean and the alignment."""
        std = np.asarray(self.std, np.float64)
        matrix = np.vstack([(np.asarray(self.embeddings, np.float64) / std[:, None]).T, -self.mean / std])
        image_map = None if self.image_map is None else np.asarray(self.image_map, np.float32)
        return np.ascontiguousarray(matrix, np.float32), np.asarray(self.image_mean, np.float32), image_map

    @cached_property
    def _names(self) -> np.ndarray:
        """The concepts' word-pieces (an object array, indexed by concept column)."""
        tokens = self.vocabulary.tokens
        return np.asarray([tokens[int(i)] for i in self.token_ids], dtype=object)

    # ------------------------------------------------------------------------------------------ building

    def aligned(self, image_map: np.ndarray, reference: np.ndarray) -> ConceptBank:
        """The same concepts seen through ``image_map``, calibrated anew on ``reference``: no text is embedded
        again, so an aligned model's bank takes seconds once the training-free one exists."""
        return calibrated(self.token_ids, self.embeddings, self.vocabulary, reference, image_map)

    def save(self, path: Path) -> Path:
        from stair_search.atomic import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            extra = {} if self.image_map is None else {"image_map": self.image_map}
            np.savez(f, format=np.asarray(CACHE_FORMAT), token_ids=self.token_ids, embeddings=self.embeddings,
                     image_mean=self.image_mean, mean=self.mean, std=self.std, **extra)
        return path

    def save_calibration(self, path: Path) -> Path:
        """What calibrates this bank without its concept embeddings (the text tower's, cached apart): the concept
        ids, the image mean and each concept's mean and standard deviation, ~0.4 MB for 21k concepts. An index
        built from embeddings keeps it, so that an append is calibrated as the index was."""
        from stair_search.atomic import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, format=np.asarray(CACHE_FORMAT), token_ids=self.token_ids, image_mean=self.image_mean,
                     mean=self.mean, std=self.std)
        return path

    @classmethod
    def from_calibration(cls, path: Path, token_ids: np.ndarray, concepts: np.ndarray, vocabulary: Vocabulary,
                         image_map: np.ndarray | None) -> ConceptBank | None:
        """The bank of these concepts (:func:`embed_concepts`) under the calibration :meth:`save_calibration`
        wrote, or None when the file is missing, unreadable, of another format or of other concepts."""
        data = _read_cache(path, ("token_ids", "image_mean", "mean", "std"))
        if data is None or not np.array_equal(data["token_ids"], token_ids):
            return None
        return cls(token_ids, concepts, data["image_mean"], data["mean"], data["std"], vocabulary, image_map)

    @classmethod
    def load(cls, path: Path, vocabulary: Vocabulary) -> ConceptBank | None:
        """The cached bank, or None when there is none (or it is of another format: it is rebuilt)."""
        data = _read_cache(path, ("token_ids", "embeddings", "image_mean", "mean", "std"), ("image_map",))
        if data is None:
            return None
        return cls(data["token_ids"], data["embeddings"], data["image_mean"], data["mean"], data["std"], vocabulary,
                   data.get("image_map"))


def embed_concepts(vocabulary: Vocabulary,
                   embed_texts: Callable[[list[str]], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) vocabulary ids of the concept words and (N, D) their centred unit embeddings, averaged over
    ``PROMPTS``: the part of a bank that depends on the text tower alone (the slow part: one text per word and
    prompt)."""
    ids = concept_ids(vocabulary)
    names = [vocabulary.tokens[i] for i in ids]
    texts = [prompt.format(name) for prompt in PROMPTS for name in names]
    embedded = unit(np.asarray(embed_texts(texts), np.float64).reshape(len(PROMPTS), len(names), -1).mean(axis=0))
    return np.asarray(ids, np.int64), unit(embedded - embedded.mean(axis=0))


def save_concept_texts(path: Path, token_ids: np.ndarray, concepts: np.ndarray) -> Path:
    """Cache what :func:`embed_concepts` returned (shared by every model with the same text tower)."""
    from stair_search.atomic import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, format=np.asarray(CACHE_FORMAT), token_ids=token_ids, embeddings=concepts)
    return path


def load_concept_texts(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached concept ids and embeddings, or None when there are none (or of another format)."""
    data = _read_cache(path, ("token_ids", "embeddings"))
    return None if data is None else (data["token_ids"], data["embeddings"])


def _read_cache(path: Path, names: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray] | None:
    """The arrays ``names`` (and those of ``optional`` it holds) of a cache file of this ``CACHE_FORMAT``, or None
    when it is missing, unreadable, incomplete or of another format (the caller rebuilds it)."""
    try:
        with np.load(path) as data:
            if int(data["format"]) != CACHE_FORMAT:
                return None
            return {name: data[name] for name in (*names, *(o for o in optional if o in data.files))}
    except (FileNotFoundError, KeyError, ValueError, OSError):
        return None


def texts_cache_name(text_fingerprint: str) -> str:
    """The cache file of the concept embeddings of a text tower (``checkpoint.text_fingerprint``)."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{PROMPTS}".encode()).hexdigest()[:12]
    return f"texts-{text_fingerprint[:16]}-{digest}.npz"


def calibrated(token_ids: np.ndarray, concepts: np.ndarray, vocabulary: Vocabulary, reference: np.ndarray,
               image_map: np.ndarray | None) -> ConceptBank:
    """A bank of these centred unit ``concepts``, each standardised over the ``reference`` images ((M, D) unit)."""
    reference = np.asarray(reference, np.float64)
    image_mean = unit(reference).mean(axis=0)
    mean, var = _moments(centred_images(reference, image_mean, image_map), concepts)
    pooled = float(var.mean())
    std = np.sqrt((len(reference) * var + SHRINK * pooled) / (len(reference) + SHRINK))
    return ConceptBank(token_ids, concepts, image_mean, mean, np.maximum(std, 1e-6), vocabulary, image_map)


def _moments(images: np.ndarray, concepts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-concept mean and variance of the (M, N) similarities ``images @ concepts.T``. Up to
    :data:`CALIBRATION_ROWS` images (the reference photos): float64, numpy's two-pass mean and variance, as the
    cached banks were made. More (a collection's 10,000-embedding sample): a block of images at a time in float32,
    summed in float64 (a 1.7 GB float64 matrix and 10 s of a core otherwise; the moments agree to ~1e-7)."""
    if len(images) <= CALIBRATION_ROWS:
        sims = images @ concepts.T
        return sims.mean(axis=0), sims.var(axis=0)
    total, squares = np.zeros(len(concepts)), np.zeros(len(concepts))
    single = np.ascontiguousarray(concepts.T, np.float32)
    for start in range(0, len(images), CALIBRATION_ROWS):
        sims = np.asarray(images[start : start + CALIBRATION_ROWS], np.float32) @ single
        total += sims.sum(axis=0, dtype=np.float64)
        squares += (sims * sims).sum(axis=0, dtype=np.float64)
    mean = total / len(images)
    return mean, np.maximum(squares / len(images) - mean * mean, 0.0)


def top_columns(scores: np.ndarray, top_k: int, floor: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's up to ``top_k`` columns with a score >= ``floor``, highest first (ties: lower column first):
    (B,) counts, the columns and their scores, row after row.

    Why not ``argpartition`` of every row: selecting 64 of 21k columns that way cost twice the product that
    scored them. Instead each row's threshold is guessed from every :data:`SAMPLE_STRIDE`-th column (a score that
    about 2 * top_k columns reach), only the columns at or above it are gathered and sorted, and a row where fewer
    than ``top_k`` reach a guessed threshold above ``floor`` is partitioned in full: the result is exact."""
    rows, width = scores.shape
    k = min(top_k, width)
    if rows == 0 or k == 0:
        return np.zeros(rows, np.int64), np.zeros(0, np.int64), np.zeros(0, scores.dtype)
    sample = scores[:, ::SAMPLE_STRIDE]
    rank = min(sample.shape[1], 2 * -(-k // SAMPLE_STRIDE) + 2)
    guessed = np.partition(sample, sample.shape[1] - rank, axis=1)[:, sample.shape[1] - rank]
    threshold = np.maximum(guessed, floor).astype(scores.dtype)
    chosen = scores >= threshold[:, None]
    short = np.flatnonzero((np.count_nonzero(chosen, axis=1) < k) & (threshold > floor))
    if len(short):  # the guess was too high for these rows: their exact k-th score
        exact = np.partition(scores[short], width - k, axis=1)[:, width - k]
        chosen[short] = scores[short] >= np.maximum(exact, floor).astype(scores.dtype)[:, None]
    flat = np.flatnonzero(chosen)  # row by row, columns ascending (much faster than a 2-d nonzero)
    row_of, columns = np.divmod(flat, width)
    values = scores.reshape(-1)[flat] if scores.flags.c_contiguous else scores[row_of, columns]
    if len(values):  # by row, then score descending; a stable sort keeps ties in column order
        spread = float(values.max()) - float(values.min()) + 1.0
        order = np.argsort(row_of * spread - values.astype(np.float64), kind="stable")
        row_of, columns, values = row_of[order], columns[order], values[order]
    found = np.bincount(row_of, minlength=rows)
    rank_in_row = np.arange(len(row_of)) - np.repeat(np.cumsum(found) - found, found)
    keep = rank_in_row < k
    return np.minimum(found, k), columns[keep].astype(np.int64), values[keep]


def centred_images(dense: np.ndarray, image_mean: np.ndarray, image_map: np.ndarray | None) -> np.ndarray:
    """Unit (dense - image_mean), mapped by ``image_map`` first when there is one (float64)."""
    centred = np.asarray(dense, np.float64) - image_mean
    return unit(centred if image_map is None else centred @ np.asarray(image_map, np.float64).T)


def query_vector(vocabulary: Vocabulary, text: str) -> dict[str, float]:
    """A query's own words that are concepts (one whole word-piece each: "tabby", split into ``tab ##by``, is
    none, so it cannot match a wrong word), weighted by rarity in (0, 1]. No model runs."""
    vector: dict[str, float] = {}
    for ids in vocabulary.own_word_ids(text):
        if len(ids) == 1 and bool(vocabulary.concept_words[ids[0]]):
            vector[vocabulary.tokens[ids[0]]] = rarity(ids[0], len(vocabulary))
    return vector


def concept_ids(vocabulary: Vocabulary) -> list[int]:
    """Vocabulary ids of the concept words (``Vocabulary.concept_words``)."""
    return np.flatnonzero(vocabulary.concept_words).tolist()


def rarity(token_id: int, vocabulary_size: int) -> float:
    """Zipf IDF estimate from the frequency-ordered ids: log(1 + rank) / log(1 + max rank), in (0, 1]."""
    rank = max(1, token_id - FIRST_RANKED_ID + 1)
    return round(float(np.log1p(rank) / np.log1p(max(2, vocabulary_size - FIRST_RANKED_ID))), 6)


def reference_images() -> list[Image.Image]:
    """The default calibration set: scikit-image's sample images (RGB, at least 64 px) and four crops of each."""
    from stair_search.data.photos import sample_dir
    from stair_search.images import to_rgb

    out = []
    for path in sorted(sample_dir().iterdir()):
        if path.suffix.lower() not in (".png", ".jpg", ".jpeg"):
            continue
        with Image.open(path) as image:
            if min(image.size) < 64:
                continue
            rgb = to_rgb(image)
        width, height = rgb.size
        out.append(rgb)
        out.extend(rgb.crop(box) for box in ((0, 0, width // 2, height), (width // 2, 0, width, height),
                                             (0, 0, width, height // 2), (0, height // 2, width, height)))
    return out


def cache_name(fingerprint: str, reference: Sequence[Image.Image] | None, image_map: np.ndarray | None = None) -> str:
    """The cache file of a model (its dense fingerprint, checkpoint.dense_fingerprint: models that differ only in
    their sparse heads share it) with a reference set (None: the default one) and an alignment (None: none)."""
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{PROMPTS}:{SHRINK}".encode())
    for image in reference or ():
        digest.update(image.tobytes())
    if image_map is not None:
        digest.update(np.ascontiguousarray(image_map, np.float64).tobytes())
    return f"{fingerprint[:16]}-{'default' if reference is None else 'custom'}-{digest.hexdigest()[:12]}.npz"
