"""Encoder: images and texts -> dense vectors, sparse {token: weight} vectors and local features.

Everything a search needs from the model passes through here, batched under ``torch.inference_mode``,
on CUDA when present and on CPU otherwise. For a fixed checkpoint the output is deterministic, and a
batch gives the same vectors as its items encoded one by one.

Queries need no torch where the model has a query bundle (models/query_runtime.py): an Encoder named by a model
spec opens the bundle instead of the model, and ``encode_texts`` / ``embed_texts`` / ``encode_images`` run on
ONNX Runtime; the torch model is built only when something needs it (indexing's ``encode_pixels``, training, a
concept bank to build). Where the bundle is missing, the first query builds the model, exports the bundle once
(:meth:`Encoder.prepare_queries`: checked against torch first) and uses it from then on. So this module imports
torch only inside the functions that run it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from stair_search import DEFAULT_MODEL
from stair_search.images import model_view
from stair_search.index import ModelRecord
from stair_search.models.concepts import (
    ConceptBank,
    calibrated,
    embed_concepts,
    load_concept_texts,
    query_vector,
    save_concept_texts,
    texts_cache_name,
)
from stair_search.models.config import StairConfig, builtin_names
from stair_search.models.query_runtime import QueryModel, query_runtime, top_k_dicts, unit_rows
from stair_search.models.runtime import RUNTIMES
from stair_search.vectors import EncodedBatch
from stair_search.vocabulary import Vocabulary

if TYPE_CHECKING:
    import torch

    from stair_search.models.stair import StairModel, TowerOutput

log = logging.getLogger(__name__)


class Encoder:
    """Wraps a StairModel with batching, preprocessing and conversion to numpy / token dicts."""

    def __init__(self, model: StairModel | str | Path = DEFAULT_MODEL, batch_size: int = 32,
                 device: str | None = None, pretrained: str | None = None, accelerate: bool = True,
                 concept_reference: Sequence[Image.Image] | None = None, runtimes: Sequence[str] = RUNTIMES,
                 queries: str | None = None):
        """``accelerate``: encode images through the tower's faster inference copy where it has one (a CNN on
        CPU: batch norm folded, channels-last), a snapshot taken at the first image batch; the model's weights
        must not change after that (an Encoder is for inference; training builds a new one to validate).
        ``runtimes``: what may run that copy, the first that works here (models/runtime.py).
        ``concept_reference``: the images that calibrate training-free sparse vectors (``sparse_source``
        "concepts", models/concepts.py; default scikit-image's sample photos).
        ``queries``: what runs text and image queries: "auto" (ONNX Runtime for the shipped models), "onnxruntime"
        (any model, where its export is exact), "torch"; None: ``$STAIR_QUERY_RUNTIME``, else "auto". A model
        object (not a spec), ``accelerate=False`` or a ``device`` other than the CPU always means torch."""
        self.spec = str(model) if isinstance(model, str | Path) else None
        self.pretrained, self._device = pretrained, device
        self._model: StairModel | None = None if self.spec else model
        self.batch_size = batch_size
        self._fast_tower: Callable | bool | None = None if accelerate else False  # False: none (or not wanted)
        self.runtimes = tuple(runtimes)
        self.concept_reference = list(concept_reference) if concept_reference is not None else None
        self._concepts: ConceptBank | None = None
        self._lock = threading.RLock()
        named = self.spec if accelerate and device in (None, "cpu") else None
        self.query_runtime = query_runtime(queries, named, self.spec in builtin_names())
        self._queries: QueryModel | None = self._open_queries()
        self._declined = False  # the export was tried here and is not exact: queries keep torch
        if self._queries is None:
            _ = self.model  # build it now: a wrong spec fails here, as it always has

    def __getstate__(self) -> dict:
        """Pickled (to Ray, to worker processes) without the accelerated copy, the ONNX sessions or the lock: they
        are rebuilt where they run, for that process's device."""
        state = dict(self.__dict__)
        if state.get("_fast_tower"):
            state["_fast_tower"] = None
        state["_queries"], state["_lock"] = None, None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------------------------------ the model

    @property
    def model(self) -> StairModel:
        """The torch model, built on first use when the Encoder was opened from a query bundle."""
        if self._model is None:
            with self._lock:
                if self._model is None:
                    self._model = _build(self.spec, self.pretrained, self._device)
        return self._model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def config(self) -> StairConfig:
        """The model's config (from the query bundle when there is one: no torch)."""
        return self._queries.config if self._queries is not None else self.model.config

    @property
    def vocabulary(self) -> Vocabulary:
        return self._queries.vocabulary if self._queries is not None else self.model.vocabulary

    @property
    def sparse_source(self) -> str:
        """Where this encoder's sparse vectors come from: "heads", "heads+concepts", "concepts" (training-free) or
        "none" (models/stair.py SPARSE_SOURCES)."""
        return self._queries.record["sparse_source"] if self._queries is not None else self.model.sparse_source

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature (what BSAP reads)."""
        if self._queries is not None:
            return float(self._queries.meta["logit_scale"])
        import torch

        with torch.no_grad():
            return float(self.model.logit_scale)

    @cached_property
    def fingerprint(self) -> str:
        if self._queries is not None:
            return self._queries.record["fingerprint"]
        from stair_search.models.checkpoint import model_fingerprint

        return model_fingerprint(self.model)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def record(self) -> ModelRecord:
        """What an index records and checks of this encoder's model (the storage layer takes nothing else)."""
        if self._queries is not None:
            fields = self._queries.record
            return ModelRecord(name=fields["name"], spec=fields["spec"], pretrained=fields["pretrained"],
                               fingerprint=fields["fingerprint"], vocabulary_location=fields["vocabulary_location"],
                               vocabulary=self._queries.vocabulary, embed_dim=fields["embed_dim"],
                               num_local=fields["num_local"], sparse_source=fields["sparse_source"])
        model = self.model
        return ModelRecord(name=model.config.name, spec=model.spec, pretrained=model.config.pretrained,
                           fingerprint=self.fingerprint, vocabulary_location=model.config.vocabulary,
                           vocabulary=model.vocabulary, embed_dim=model.embed_dim, num_local=model.config.num_local,
                           sparse_source=self.sparse_source)

    # ------------------------------------------------------------------------------------------ query bundles

    def _bundle_dir(self) -> Path:
        from stair_search.models.query_runtime import bundle_dir, query_models_dir

        return bundle_dir(query_models_dir(), self.spec, self.pretrained)

    def _open_queries(self) -> QueryModel | None:
        if self.query_runtime != "onnxruntime":
            return None
        return QueryModel.load(self._bundle_dir())

    def query_model(self) -> QueryModel | None:
        """The query bundle these queries run on, exported now when it is missing (None: torch answers)."""
        if self._queries is None and self.query_runtime == "onnxruntime" and not self._declined:
            with self._lock:
                if self._queries is None and not self._declined:
                    self._queries = self.prepare_queries()
                    self._declined = self._queries is None
        return self._queries

    def prepare_queries(self) -> QueryModel | None:
        """Export the model's query bundle into the data cache once, check it against torch on probe texts and
        images, and publish it (or record that it is not exact, so later runs keep torch without trying again).
        The bundle, or None where this model has none."""
        from stair_search.models.query_runtime import declined

        target = self._bundle_dir()
        if declined(target):
            return None
        return self._export(target)

    def _export(self, target: Path) -> QueryModel | None:
        from stair_search.models import query_export as export

        model = self.model
        why = export.exportable(model)
        if why is not None or model.training:
            log.info("queries of %s run on torch: %s", self.name, why or "the model is training")
            return None
        log.warning("exporting %s's query side to ONNX Runtime once (cached in %s)", self.name, target)
        staged = export.staging(target)
        try:
            export.traced(model, lambda: export.write_bundle(model, self.spec, self.pretrained, staged))
            differences = self._compare(QueryModel.load(staged))
        except OSError as error:  # a full disk, a read-only cache: this run keeps torch, the next one tries again
            log.warning("%s's query bundle could not be written (%s); queries keep torch", self.name, error)
            export.discard(staged)
            return None
        except Exception as error:  # the model does not export: keep torch, and do not try again
            log.warning("%s's query side did not export to ONNX (%s); queries keep torch", self.name, error)
            export.decline(staged, target, {"error": f"{type(error).__name__}: {error}"},
                           export.model_sources(model, self.spec, self.pretrained))
            return None
        if not differences["exact"]:
            log.warning("%s's ONNX query side differs from torch (%s); queries keep torch", self.name, differences)
            export.decline(staged, target, differences, export.model_sources(model, self.spec, self.pretrained))
            return None
        export.publish(staged, target, differences)
        return QueryModel.load(target)

    def _compare(self, queries: QueryModel | None) -> dict[str, Any]:
        """How far the staged bundle's outputs are from torch's on the probe texts and images (models/query_export.py
        PROBE_TEXTS, scikit-image's photos): the bundle is used only when ``exact``."""
        from stair_search.models.query_export import compare

        if queries is None:
            return {"exact": False, "error": "the staged bundle does not load"}
        return compare(self, queries)

    # ------------------------------------------------------------------------------------------ concepts

    def concepts(self, aligned: bool = True) -> ConceptBank:
        """The model's concept bank (training-free sparse vectors, seen through its concept alignment when it has
        one and ``aligned``; ``aligned=False``: the training-free bank, what an alignment is trained from), from
        its cache file or built once (minutes for a large text tower on CPU) and cached."""
        if not aligned:
            return self._bank(None)
        if self._concepts is None:
            alignment = self.concept_alignment()
            if not self._bank_path(alignment).is_file():  # one line, so a slow first run is not a mystery
                log.warning("building %s's concept bank once (its vocabulary's words through the text tower, and "
                            "their calibration: a minute or more on a CPU, ~190 MB in %s); later runs read it",
                            self.name, self._bank_path(alignment).parent)
            self._concepts = self._bank(alignment)
        return self._concepts

    def _dense_fingerprint(self) -> str:
        if self._queries is not None:
            return self._queries.meta["dense_fingerprint"]
        from stair_search.models.checkpoint import dense_fingerprint

        return dense_fingerprint(self.model)

    def _bank(self, alignment: np.ndarray | None, reference: np.ndarray | None = None) -> ConceptBank:
        """The bank through ``alignment`` (None: the training-free one), cached; ``reference``: the calibration
        images' dense vectors when the caller already has them (encoded once for both banks)."""
        from stair_search.models.concepts import reference_images

        path = self._bank_path(alignment)
        bank = ConceptBank.load(path, self.vocabulary)
        if bank is None:
            if reference is None:
                reference = self.encode_dense(self.concept_reference or reference_images())
            if alignment is None:
                bank = calibrated(*self._concept_texts(), self.model.vocabulary, reference, None)
            else:  # the training-free bank's concepts, calibrated through the alignment
                bank = self._bank(None, reference).aligned(alignment, reference)
            bank.save(path)
        return bank

    def _bank_path(self, alignment: np.ndarray | None) -> Path:
        from stair_search.models.concepts import cache_name
        from stair_search.paths import concepts_dir

        return concepts_dir() / cache_name(self._dense_fingerprint(), self.concept_reference, alignment)

    def _concept_texts(self) -> tuple[np.ndarray, np.ndarray]:
        """The concept words' ids and embeddings through this model's text tower (torch, whatever runs queries: the
        cache is the same bytes for every process): cached by the text tower's fingerprint, so models with another
        image side (a dense alignment, other weights) embed them only once."""
        from stair_search.models.checkpoint import text_fingerprint
        from stair_search.paths import concepts_dir

        path = concepts_dir() / texts_cache_name(text_fingerprint(self.model))
        cached = load_concept_texts(path)
        if cached is not None:
            return cached
        log.info("embedding the concept words of %s (once; cached in %s)", self.name, path)
        ids, concepts = embed_concepts(self.model.vocabulary, lambda texts: self.embed_texts_torch(texts, 256))
        save_concept_texts(path, ids, concepts)
        return ids, concepts

    def concept_alignment(self) -> np.ndarray | None:
        """The model's trained (D, D) concept alignment (``StairConfig.concept_alignment``), or None."""
        location = self.config.concept_alignment
        if not location:
            return None
        from stair_search.models.config import load_alignment

        return load_alignment(location, "concept_alignment", self.name).astype(np.float64)

    # ------------------------------------------------------------------------------------------ images

    def encode_dense(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, D) unit dense vectors of ``images`` alone, through torch (no sparse vectors, no local features: what
        calibration and alignment read)."""
        import torch
        import torch.nn.functional as F

        with torch.inference_mode():
            pixels = torch.stack([self.preprocess(im) for im in images])
            return np.concatenate([F.normalize(self.model.encode_image(pixels[i : i + self.batch_size]
                                                                        .to(self.device)).dense.float(),
                                               dim=-1).cpu().numpy()
                                   for i in range(0, len(pixels), self.batch_size)])

    @property
    def accelerated(self) -> bool:
        """Whether image batches go through the tower's accelerated copy (known after the first batch)."""
        return bool(self._fast_tower)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One image -> the (3, H, W) tensor the model takes; safe to run in worker processes."""
        return self.model.preprocess(model_view(image))

    def encode_images(self, images: Sequence[Image.Image]) -> EncodedBatch:
        """Dense + sparse vectors and local features of ``images`` (on a query bundle when there is one: no torch;
        indexing encodes pixels, through torch)."""
        queries = self.query_model()
        if queries is not None and queries.has_images:
            return _concat([self._bundle_images(queries, list(images[i : i + self.batch_size]))
                            for i in range(0, len(images), self.batch_size)])
        import torch

        return self.encode_pixels(torch.stack([self.preprocess(im) for im in images]))

    def _bundle_images(self, queries: QueryModel, images: list[Image.Image]) -> EncodedBatch:
        pixels = np.stack([queries.pixels(model_view(image)) for image in images])
        raw, heads, keep, local = queries.image_outputs(pixels)
        dense = unit_rows(raw)
        chosen, positions = queries.local_features(local, dense)
        return EncodedBatch(dense=dense, sparse=self._bundle_sparse(heads, keep, dense), local=chosen,
                            local_positions=positions)

    def _bundle_sparse(self, heads: np.ndarray, keep: np.ndarray | None, dense: np.ndarray) -> list[dict[str, float]]:
        """``_image_sparse`` on numpy: the heads' weights (plus the concept bank's), top-k and kept tokens."""
        source, config = self.sparse_source, self.config
        if source == "concepts":
            return self.concepts().image_vectors(dense, config.image_top_k)
        if source == "none":
            return [{} for _ in range(len(dense))]
        if source == "heads+concepts":
            heads = heads.astype(np.float32) + config.concept_weight * self.concepts().image_weights(dense)
        return top_k_dicts(heads, self.vocabulary.tokens, config.image_top_k, keep)

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

    def warm(self) -> None:
        """Make now what the first query would otherwise wait for, so that a server's first query does not. On a
        query bundle: the bundle (opened, or exported once) and its text session; its image session and the
        concept bank open with the first image query (~0.4 s), so a server that answers text queries never holds
        them (~140 MB for the default model). On torch: the image side's accelerated copy (for a CNN on CPU, an
        ONNX export: ~1.5 s) and, when image words come from concepts, the concept bank (read from its cache, or
        built once: about a minute)."""
        queries = self.query_model()
        concepts = self.sparse_source in ("heads+concepts", "concepts")
        if queries is not None:
            queries.session("text")
            if concepts and not self._bank_path(self.concept_alignment()).is_file():
                self.concepts()  # built once (about a minute), now rather than in the first image query
            if queries.has_images:
                return
        import torch

        self._accelerate(torch.zeros(2, 3, *self.model.tower.image_size, device=self.device))
        if concepts:
            self.concepts()

    def _accelerate(self, example: torch.Tensor) -> None:
        if self._fast_tower is None and not self.model.training:
            import torch

            with torch.inference_mode(False):
                self._fast_tower = self.model.tower.accelerated(example[:2].clone(), self.runtimes) or False

    def _encode_pixel_batch(self, pixels: torch.Tensor) -> EncodedBatch:
        with _inference():
            pixels = pixels.to(self.device)
            self._accelerate(pixels)
            if self._fast_tower and not self.model.training and pixels.device.type == "cpu":
                return self._image_batch(self.model.image_output(self._fast_tower(pixels)))
            return self._image_batch(self.model.encode_image(pixels))

    def _encode_stem_batch(self, stem_out: torch.Tensor) -> EncodedBatch:
        with _inference():
            return self._image_batch(self.model.encode_image_stem(stem_out.to(self.device).float()))

    def _image_batch(self, out: TowerOutput) -> EncodedBatch:
        import torch
        import torch.nn.functional as F

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
        import torch

        weights = out.sparse
        if self.sparse_source == "heads+concepts":
            concepts = torch.from_numpy(self.concepts().image_weights(dense)).to(weights.device)
            weights = weights.float() + self.model.config.concept_weight * concepts
        return self._to_dicts(weights, self.model.config.image_top_k, out.keep)

    # ------------------------------------------------------------------------------------------ texts

    def encode_texts(self, texts: Sequence[str]) -> EncodedBatch:
        queries = self.query_model()
        encode = (lambda part: queries.encode_texts(part, self.sparse_source)) if queries is not None \
            else self.encode_texts_torch
        return _concat([encode(list(texts[i : i + self.batch_size])) for i in range(0, len(texts), self.batch_size)])

    def embed_texts(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """(B, D) unit float32 dense embeddings only, for texts that are never searched sparsely (the rerankers'
        prompts, entities and synonyms). Skipping the sparse head (a vocabulary-wide logit row per token, most
        of a text encode) makes this several times cheaper than ``encode_texts``; the vectors are the same."""
        queries = self.query_model()
        if queries is None:
            return self.embed_texts_torch(texts, batch_size)
        if not texts:
            return np.zeros((0, int(queries.record["embed_dim"])), np.float32)
        step = batch_size or self.batch_size
        return np.concatenate([queries.embed_texts(list(texts[i : i + step])) for i in range(0, len(texts), step)])

    def embed_texts_torch(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """``embed_texts`` through the torch model, whatever runs queries (concept words; a bundle's check)."""
        if not texts:
            return np.zeros((0, self.model.embed_dim), np.float32)
        step = batch_size or self.batch_size
        return np.concatenate([self._embed_text_batch(list(texts[i : i + step])) for i in range(0, len(texts), step)])

    def _embed_text_batch(self, texts: list[str]) -> np.ndarray:
        import torch.nn.functional as F

        with _inference():
            pooled = self.model.embed_text(self.model.tokenizer(texts).to(self.device))
            return F.normalize(pooled.float(), dim=-1).cpu().numpy()

    def encode_texts_torch(self, texts: list[str]) -> EncodedBatch:
        """``encode_texts`` of one batch through the torch model, whatever runs queries (a bundle's check)."""
        import torch.nn.functional as F

        if self.sparse_source not in ("heads", "heads+concepts"):  # the text tower's embedding; the query's own words
            sparse = [query_vector(self.model.vocabulary, t) if self.sparse_source == "concepts" else {}
                      for t in texts]
            return EncodedBatch(dense=self._embed_text_batch(texts), sparse=sparse)
        grounded = self.model.config.ground_text
        with _inference():
            out = self.model.encode_text(self.model.tokenizer(texts).to(self.device),
                                         ground=texts if grounded else None)
            sparse = self.model.floor_query(out.sparse, texts) if grounded else out.sparse
            return EncodedBatch(dense=F.normalize(out.dense.float(), dim=-1).cpu().numpy(),
                                sparse=self._to_dicts(sparse, self.model.config.text_top_k))

    def _to_dicts(self, weights: torch.Tensor, top_k: int, keep: torch.Tensor | None = None) -> list[dict[str, float]]:
        """Top-k weights per row (plus the ``keep`` ones, whatever their rank) as token dicts."""
        import torch

        from stair_search.models.heads import top_k_sparse

        cut = top_k_sparse(weights.float(), top_k)
        weights = (cut if keep is None else torch.where(keep, weights.float(), cut)).cpu()
        tokens = self.model.vocabulary.tokens
        rows: list[dict[str, float]] = [{} for _ in range(weights.shape[0])]
        for row, col in weights.nonzero().tolist():
            rows[row][tokens[col]] = float(weights[row, col])
        return rows


def _build(spec: str, pretrained: str | None, device: str | None) -> StairModel:
    """The torch model of ``spec``; with ``$STAIR_ENCODE_THREADS`` set (``serve --encode-threads``), torch's
    intra-op threads follow it, as ONNX Runtime's sessions do."""
    from stair_search.models.factory import create_model
    from stair_search.models.runtime import default_threads

    threads = default_threads()
    if threads:
        import torch

        torch.set_num_threads(threads)
    return create_model(spec, pretrained, device)


@contextmanager
def _inference() -> Iterator[None]:
    """``torch.inference_mode()``, with torch imported only when a torch path runs."""
    import torch

    with torch.inference_mode():
        yield


def select_local(patches: torch.Tensor, global_: torch.Tensor, m: int, diversity: float = 0.5) -> torch.Tensor:
    """Indices (B, m) of patches chosen by maximal marginal relevance.

    Relevance = similarity to the image's global embedding; each pick is penalised by its similarity to
    the patches already picked, so the few stored features cover several objects instead of m near-copies
    of the most salient one (the compositional reranker needs subject and object both present).
    """
    import torch

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
    import torch

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
