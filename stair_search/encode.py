"""Encoder: images and texts -> dense vectors, sparse {token: weight} vectors and local features.

Everything a search needs from the model passes through here, batched under ``torch.inference_mode``,
on CUDA when present and on CPU otherwise. For a fixed checkpoint the output is deterministic, and a
batch gives the same vectors as its items encoded one by one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import cached_property

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from stair_search.images import model_view
from stair_search.index import ModelRecord
from stair_search.models import DEFAULT_MODEL, StairModel, TowerOutput, create_model, model_fingerprint
from stair_search.models.concepts import (
    ConceptBank,
    calibrated,
    embed_concepts,
    load_concept_texts,
    query_vector,
    save_concept_texts,
    texts_cache_name,
)
from stair_search.models.factory import load_alignment
from stair_search.models.heads import top_k_sparse
from stair_search.models.runtime import RUNTIMES
from stair_search.vectors import EncodedBatch

log = logging.getLogger(__name__)


class Encoder:
    """Wraps a StairModel with batching, preprocessing and conversion to numpy / token dicts."""

    def __init__(self, model: StairModel | str = DEFAULT_MODEL, batch_size: int = 32,
                 device: str | None = None, pretrained: str | None = None, accelerate: bool = True,
                 concept_reference: Sequence[Image.Image] | None = None, runtimes: Sequence[str] = RUNTIMES):
        """``accelerate``: encode images through the tower's faster inference copy where it has one (a CNN on
        CPU: batch norm folded, channels-last), a snapshot taken at the first image batch; the model's weights
        must not change after that (an Encoder is for inference; training builds a new one to validate).
        ``runtimes``: what may run that copy, the first that works here (models/runtime.py).
        ``concept_reference``: the images that calibrate training-free sparse vectors (``sparse_source``
        "concepts", models/concepts.py; default scikit-image's sample photos)."""
        self.model = model if isinstance(model, StairModel) else create_model(model, pretrained, device)
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device
        self._fast_tower: Callable | bool | None = None if accelerate else False  # False: none (or not wanted)
        self.runtimes = tuple(runtimes)
        self.concept_reference = list(concept_reference) if concept_reference is not None else None
        self._concepts: ConceptBank | None = None

    def __getstate__(self) -> dict:
        """Pickled (to Ray, to worker processes) without the accelerated copy: it is rebuilt where it runs, for
        that process's device."""
        state = dict(self.__dict__)
        if state.get("_fast_tower"):
            state["_fast_tower"] = None
        return state

    @property
    def sparse_source(self) -> str:
        """Where this encoder's sparse vectors come from: "heads", "heads+concepts", "concepts" (training-free) or
        "none" (models/stair.py SPARSE_SOURCES)."""
        return self.model.sparse_source

    def concepts(self, aligned: bool = True) -> ConceptBank:
        """The model's concept bank (training-free sparse vectors, seen through its concept alignment when it has
        one and ``aligned``; ``aligned=False``: the training-free bank, what an alignment is trained from), from
        its cache file or built once (minutes for a large text tower on CPU) and cached."""
        if not aligned:
            return self._bank(None)
        if self._concepts is None:
            self._concepts = self._bank(self.concept_alignment())
        return self._concepts

    def _bank(self, alignment: np.ndarray | None, reference: np.ndarray | None = None) -> ConceptBank:
        """The bank through ``alignment`` (None: the training-free one), cached; ``reference``: the calibration
        images' dense vectors when the caller already has them (encoded once for both banks)."""
        from stair_search.models.checkpoint import dense_fingerprint
        from stair_search.models.concepts import cache_name, reference_images
        from stair_search.paths import concepts_dir

        path = concepts_dir() / cache_name(dense_fingerprint(self.model), self.concept_reference, alignment)
        bank = ConceptBank.load(path, self.model.vocabulary)
        if bank is None:
            if reference is None:
                reference = self.encode_dense(self.concept_reference or reference_images())
            if alignment is None:
                bank = calibrated(*self._concept_texts(), self.model.vocabulary, reference, None)
            else:  # the training-free bank's concepts, calibrated through the alignment
                bank = self._bank(None, reference).aligned(alignment, reference)
            bank.save(path)
        return bank

    def _concept_texts(self) -> tuple[np.ndarray, np.ndarray]:
        """The concept words' ids and embeddings through this model's text tower: cached by the text tower's
        fingerprint, so models with another image side (a dense alignment, other weights) embed them only once."""
        from stair_search.models.checkpoint import text_fingerprint
        from stair_search.paths import concepts_dir

        path = concepts_dir() / texts_cache_name(text_fingerprint(self.model))
        cached = load_concept_texts(path)
        if cached is not None:
            return cached
        log.info("embedding the concept words of %s (once; cached in %s)", self.name, path)
        ids, concepts = embed_concepts(self.model.vocabulary, lambda texts: self.embed_texts(texts, 256))
        save_concept_texts(path, ids, concepts)
        return ids, concepts

    def concept_alignment(self) -> np.ndarray | None:
        """The model's trained (D, D) concept alignment (``StairConfig.concept_alignment``), or None."""
        location = self.model.config.concept_alignment
        if not location:
            return None
        return load_alignment(location, "concept_alignment", self.name).astype(np.float64)

    @torch.inference_mode()
    def encode_dense(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) unit dense vectors of ``images`` alone (no sparse vectors, no local features: what calibration
        and alignment read)."""
        pixels = torch.stack([self.preprocess(im) for im in images])
        return np.concatenate([F.normalize(self.model.encode_image(pixels[i : i + self.batch_size].to(self.device))
                                           .dense.float(), dim=-1).cpu().numpy()
                               for i in range(0, len(pixels), self.batch_size)])

    @property
    def accelerated(self) -> bool:
        """Whether image batches go through the tower's accelerated copy (known after the first batch)."""
        return bool(self._fast_tower)

    @cached_property
    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    @property
    def name(self) -> str:
        return self.model.config.name

    @property
    def record(self) -> ModelRecord:
        """What an index records and checks of this encoder's model (the storage layer takes nothing else)."""
        model = self.model
        return ModelRecord(name=model.config.name, spec=model.spec, pretrained=model.config.pretrained,
                           fingerprint=self.fingerprint, vocabulary_location=model.config.vocabulary,
                           vocabulary=model.vocabulary, embed_dim=model.embed_dim, num_local=model.config.num_local,
                           sparse_source=self.sparse_source)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image -> the (3, H, W) tensor the model takes; safe to run in worker processes."""
        return self.model.preprocess(model_view(image))

    def encode_images(self, images: Sequence[Image.Image]) -> EncodedBatch:
        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))

    def encode_pixels(self, pixels: torch.Tensor) -> EncodedBatch:
        """Pre-processed (B, 3, H, W) pixels -> EncodedBatch."""
        parts = [self._encode_pixel_batch(pixels[i : i + self.batch_size])
                 for i in range(0, len(pixels), self.batch_size)]
        return _concat(parts)

    def encode_stem(self, stem_out: torch.Tensor) -> EncodedBatch:
        """Outputs of the tower's frozen stem (what training caches) -> EncodedBatch, as ``encode_pixels``."""
        parts = [self._encode_stem_batch(stem_out[i : i + self.batch_size])
                 for i in range(0, len(stem_out), self.batch_size)]
        return _concat(parts)

    def encode_texts(self, texts: Sequence[str]) -> EncodedBatch:
        parts = [self._encode_text_batch(list(texts[i : i + self.batch_size]))
                 for i in range(0, len(texts), self.batch_size)]
        return _concat(parts)

    def warm(self) -> None:
        """Make now what the first image batch would otherwise wait for, so that a server's first image query
        does not: the image side's accelerated copy (for a CNN on CPU, an ONNX export: ~1.5 s) and, when image
        words come from concepts, the concept bank (read from its cache, or built once: about a minute)."""
        self._accelerate(torch.zeros(2, 3, *self.model.tower.image_size, device=self.device))
        if self.sparse_source in ("heads+concepts", "concepts"):
            self.concepts()

    def _accelerate(self, example: torch.Tensor) -> None:
        if self._fast_tower is None and not self.model.training:
            with torch.inference_mode(False):
                self._fast_tower = self.model.tower.accelerated(example[:2].clone(), self.runtimes) or False

    @torch.inference_mode()
    def _encode_pixel_batch(self, pixels: torch.Tensor) -> EncodedBatch:
        pixels = pixels.to(self.device)
        self._accelerate(pixels)
        if self._fast_tower and not self.model.training and pixels.device.type == "cpu":
            return self._image_batch(self.model.image_output(self._fast_tower(pixels)))
        return self._image_batch(self.model.encode_image(pixels))

    @torch.inference_mode()
    def _encode_stem_batch(self, stem_out: torch.Tensor) -> EncodedBatch:
        return self._image_batch(self.model.encode_image_stem(stem_out.to(self.device).float()))

    def _image_batch(self, out: TowerOutput) -> EncodedBatch:
        dense = F.normalize(out.dense.float(), dim=-1)
        local = F.normalize(out.local.float(), dim=-1)
        chosen = select_local(local, dense, self.model.config.num_local)
        positions = _patch_centres(out.grid, chosen)
        vectors = dense.cpu().numpy()
        return EncodedBatch(
            dense=vectors,
            sparse=self._image_sparse(out, vectors),
            local=torch.gather(local, 1, chosen[..., None].expand(-1, -1, local.shape[-1])).half().cpu().numpy(),
            local_positions=positions.half().cpu().numpy(),
        )

    def _image_sparse(self, out: TowerOutput, dense: np.ndarray) -> list[dict[str, float]]:
        if self.sparse_source == "concepts":
            return self.concepts().image_vectors(dense, self.model.config.image_top_k)
        if self.sparse_source == "none":
            return [{} for _ in range(len(dense))]
        weights = out.sparse
        if self.sparse_source == "heads+concepts":
            concepts = torch.from_numpy(self.concepts().image_weights(dense)).to(weights.device)
            weights = weights.float() + self.model.config.concept_weight * concepts
        return self._to_dicts(weights, self.model.config.image_top_k, out.keep)

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(B, D) unit float32 dense embeddings only, for texts that are never searched sparsely (the rerankers'
        prompts, entities and synonyms). Skipping the sparse head (a vocabulary-wide logit row per token, most
        of a text encode) makes this several times cheaper than ``encode_texts``; the vectors are the same."""
        if not texts:
            return np.zeros((0, self.model.embed_dim), np.float32)
        step = batch_size or self.batch_size
        return np.concatenate([self._embed_text_batch(list(texts[i : i + step])) for i in range(0, len(texts), step)])

    @torch.inference_mode()
    def _embed_text_batch(self, texts: list[str]) -> np.ndarray:
        pooled = self.model.embed_text(self.model.tokenizer(texts).to(self.device))
        return F.normalize(pooled.float(), dim=-1).cpu().numpy()

    @torch.inference_mode()
    def _encode_text_batch(self, texts: list[str]) -> EncodedBatch:
        if self.sparse_source not in ("heads", "heads+concepts"):  # the text tower's embedding; the query's own words
            sparse = [query_vector(self.model.vocabulary, t) if self.sparse_source == "concepts" else {}
                      for t in texts]
            return EncodedBatch(dense=self._embed_text_batch(texts), sparse=sparse)
        grounded = self.model.config.ground_text
        out = self.model.encode_text(self.model.tokenizer(texts).to(self.device), ground=texts if grounded else None)
        sparse = self.model.floor_query(out.sparse, texts) if grounded else out.sparse
        return EncodedBatch(dense=F.normalize(out.dense.float(), dim=-1).cpu().numpy(),
                            sparse=self._to_dicts(sparse, self.model.config.text_top_k))

    def _to_dicts(self, weights: torch.Tensor, top_k: int, keep: torch.Tensor | None = None) -> list[dict[str, float]]:
        """Top-k weights per row (plus the ``keep`` ones, whatever their rank) as token dicts."""
        cut = top_k_sparse(weights.float(), top_k)
        weights = (cut if keep is None else torch.where(keep, weights.float(), cut)).cpu()
        tokens = self.model.vocabulary.tokens
        rows: list[dict[str, float]] = [{} for _ in range(weights.shape[0])]
        for row, col in weights.nonzero().tolist():
            rows[row][tokens[col]] = float(weights[row, col])
        return rows


def select_local(patches: torch.Tensor, global_: torch.Tensor, m: int, diversity: float = 0.5) -> torch.Tensor:
    """Indices (B, m) of patches chosen by maximal marginal relevance.

    Relevance = similarity to the image's global embedding; each pick is penalised by its similarity to
    the patches already picked, so the few stored features cover several objects instead of m near-copies
    of the most salient one (the compositional reranker needs subject and object both present).
    """
    batch, count, _ = patches.shape
    m = min(m, count)
    relevance = torch.einsum("bnd,bd->bn", patches, global_)
    redundancy = torch.full_like(relevance, -1.0)
    taken = torch.zeros_like(relevance, dtype=torch.bool)
    chosen = []
    for _ in range(m):
        score = (1 - diversity) * relevance - diversity * redundancy
        pick = score.masked_fill(taken, float("-inf")).argmax(dim=1)
        chosen.append(pick)
        taken[torch.arange(batch), pick] = True
        picked = patches[torch.arange(batch), pick]
        redundancy = torch.maximum(redundancy, torch.einsum("bnd,bd->bn", patches, picked))
    return torch.stack(chosen, dim=1)


def _patch_centres(grid_size: tuple[int, int], indices: torch.Tensor) -> torch.Tensor:
    rows, cols = grid_size
    y = (indices // cols).float().add(0.5).div(rows)
    x = (indices % cols).float().add(0.5).div(cols)
    return torch.stack([x, y], dim=-1)


def _concat(parts: list[EncodedBatch]) -> EncodedBatch:
    def stack(name: str) -> np.ndarray | None:
        arrays = [getattr(p, name) for p in parts]
        return None if not arrays or arrays[0] is None else np.concatenate(arrays)

    if not parts:
        raise ValueError("Nothing to encode: the input list is empty.")
    return EncodedBatch(dense=stack("dense"), sparse=[s for p in parts for s in p.sparse],
                        local=stack("local"), local_positions=stack("local_positions"))
