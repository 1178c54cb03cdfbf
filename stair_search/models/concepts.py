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
everything is computed in float64 on CPU from fixed inputs, so two processes write the same vectors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
        """The sparse vector of each image: its ``top_k`` concepts with z >= MIN_Z, weight z / Z_SCALE."""
        z = self.z_scores(dense)
        k = min(top_k, z.shape[1])
        top = np.argpartition(-z, k - 1, axis=1)[:, :k]
        tokens = self.vocabulary.tokens
        out = []
        for row, columns in zip(z, top, strict=True):
            chosen = sorted((c for c in columns.tolist() if row[c] >= MIN_Z), key=lambda c: -row[c])
            out.append({tokens[int(self.token_ids[c])]: round(float(row[c]) / Z_SCALE, 6) for c in chosen})
        return out

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
    sims = centred_images(reference, image_mean, image_map) @ concepts.T  # (M, N)
    mean, var = sims.mean(axis=0), sims.var(axis=0)
    pooled = float(var.mean())
    std = np.sqrt((len(sims) * var + SHRINK * pooled) / (len(sims) + SHRINK))
    return ConceptBank(token_ids, concepts, image_mean, mean, np.maximum(std, 1e-6), vocabulary, image_map)


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
