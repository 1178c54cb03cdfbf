"""A model's query side on ONNX Runtime and numpy: text and image queries encoded without importing torch.

Why: a search needs a model only to turn its query into vectors, yet loading the model meant importing torch
(~3 s and ~700 MB before any weight), open_clip and transformers, on every CLI search and in every server. The
graphs a query runs (the text tower up to the sparse head's transform; the image side up to its dense and sparse
outputs) are exported once from the torch model (models/query_export.py, with models/runtime.py's exporter, the
one the image trunk already runs on) into a *query bundle* in the data cache; this module loads a bundle and
does the rest in numpy: the tokenizer (the ``tokenizers`` library's own, saved from the model's), the image
preprocessing (torchvision's steps, replayed on PIL), the text head's few word-piece rows, grounding, the query
floor and the top-k cut. A bundle is published only after its outputs matched torch's on probe texts and images
(``stair_search.encode.Encoder`` checks it), and it names the files it was made from, so a changed checkpoint or
package makes it stale (then torch answers and exports again).

Which models: ``STAIR_QUERY_RUNTIME`` (``auto``: the shipped models, whose exports are tested exact; ``onnxruntime``:
any model, where its export checks exact; ``torch``: never). A model with open_clip's own CLIP text tower has no
bundle (its tokenizer is open_clip's Python BPE, which imports torch): it keeps torch.
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from stair_search.models.concepts import query_vector
from stair_search.models.config import StairConfig
from stair_search.models.runtime import onnx_session
from stair_search.vectors import EncodedBatch
from stair_search.vocabulary import Vocabulary

BUNDLE_FORMAT = 2
RUNTIME_ENV = "STAIR_QUERY_RUNTIME"
QUERY_RUNTIMES = ("auto", "onnxruntime", "torch")
# What a query bundle depends on besides its own files: an upgrade of any of these exports it again.
PACKAGES = ("stair-search", "torch", "transformers", "open_clip_torch", "timm", "onnx")
META = "meta.json"
DECLINED = "declined.json"
_INTERPOLATIONS = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                   "bicubic": Image.Resampling.BICUBIC, "box": Image.Resampling.BOX,
                   "hamming": Image.Resampling.HAMMING, "lanczos": Image.Resampling.LANCZOS}


def query_runtime(asked: str | None, spec: str | None, builtin: bool) -> str:
    """"onnxruntime" or "torch" for a model given by ``spec`` (None: a model object, always torch); ``asked`` (None:
    ``$STAIR_QUERY_RUNTIME``, default "auto"); ``builtin``: whether ``spec`` names a model that ships with the
    package (auto's choice)."""
    choice = asked or os.environ.get(RUNTIME_ENV, "").strip() or "auto"
    if choice not in QUERY_RUNTIMES:
        raise ValueError(f"{RUNTIME_ENV}={choice!r}: use one of {QUERY_RUNTIMES} (auto: ONNX Runtime for the shipped "
                         f"models' queries; torch: never).")
    if spec is None or choice == "torch":
        return "torch"
    return "onnxruntime" if choice == "onnxruntime" or builtin else "torch"


def bundle_dir(root: Path, spec: str, pretrained: str | None) -> Path:
    """Where the query bundle of ``spec`` (+ ``pretrained``) lives under ``root``: keyed by the model as named and
    the versions of the packages its graphs came from (a model file's own changes are caught by ``sources``)."""
    path = Path(spec).expanduser()
    named = str(path.resolve()) if path.suffix in (".json", ".pt", ".pth", ".stair") else spec
    versions = {name: _version(name) for name in PACKAGES}
    key = json.dumps({"format": BUNDLE_FORMAT, "spec": named, "pretrained": pretrained, "versions": versions},
                     sort_keys=True)
    return root / hashlib.sha256(key.encode()).hexdigest()[:20]


def query_models_dir() -> Path:
    """Where query bundles are cached: beside the other data stair-search builds once (``$STAIR_DATA``)."""
    from stair_search.paths import data_dir

    return data_dir() / "query-models"


def declined(target: Path) -> bool:
    """Whether the bundle at ``target`` was exported and found not exact since its source files last changed."""
    try:
        record = json.loads(target.with_name(f"{target.name}.{DECLINED}").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return not stale_sources(record.get("sources", []))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def file_stamp(path: Path) -> list[Any]:
    """[path, size, mtime_ns] of a file a bundle was made from (what :func:`stale_sources` compares)."""
    stat = path.stat()
    return [str(path), stat.st_size, stat.st_mtime_ns]


def stale_sources(sources: list[list[Any]]) -> list[str]:
    """The recorded source files that are gone or changed since the bundle was made."""
    stale = []
    for path, size, mtime in sources:
        try:
            now = file_stamp(Path(path))
        except OSError:
            stale.append(path)
            continue
        if now[1:] != [size, mtime]:
            stale.append(path)
    return stale


@dataclass(frozen=True)
class TextOutputs:
    pooled: np.ndarray  # (B, D) the text tower's embedding, not normalised
    head_features: np.ndarray  # (B, L', e) the text head's transform of each token
    mask: np.ndarray  # (B, L') bool: real tokens (not padding)


class QueryModel:
    """A loaded query bundle: tokenizer, text and image graphs (sessions opened on first use), the text head's
    arrays and the model's config and record fields. Thread-safe to call once its sessions exist (ONNX Runtime
    sessions are); ``Encoder`` calls it from one thread at a time anyway."""

    def __init__(self, folder: Path, meta: dict[str, Any], threads: int | None = None):
        self.folder, self.meta, self.threads = folder, meta, threads
        self.config = StairConfig.from_dict(meta["config"])
        self.vocabulary = Vocabulary.load(self.config.vocabulary)
        self._sessions: dict[str, Any] = {}
        self._tokenizer: Any = None
        self._head: dict[str, np.ndarray] | None = None
        self._opening = threading.Lock()  # sessions, tokenizer and head arrays are opened once, on first use

    @classmethod
    def load(cls, folder: Path, threads: int | None = None) -> QueryModel | None:
        """The bundle in ``folder``, or None when there is none, it is of another format or a source file changed."""
        try:
            meta = json.loads((folder / META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if meta.get("format") != BUNDLE_FORMAT or stale_sources(meta.get("sources", [])):
            return None
        return cls(folder, meta, threads)

    # ------------------------------------------------------------------------------------------ the model

    @property
    def has_images(self) -> bool:
        return self.meta.get("image") is not None

    @property
    def record(self) -> dict[str, Any]:
        """The model's record fields (name, spec, pretrained, fingerprint, ...) as measured at export."""
        return self.meta["record"]

    def session(self, side: str) -> Any:
        """The ONNX Runtime session of the "text" or "image" graph, opened on first use."""
        with self._opening:
            if side not in self._sessions:
                self._sessions[side] = onnx_session(self.folder / self.meta[side]["graph"], self.threads)
            return self._sessions[side]

    # ------------------------------------------------------------------------------------------ text

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """(B, context_length) int64 token ids, as open_clip's HFTokenizer gives them (its whitespace cleaning, then
        the Hugging Face tokenizer padded and truncated to the context length)."""
        with self._opening:
            if self._tokenizer is None:
                self._tokenizer = _tokenizer(self.folder / "tokenizer.json", self.meta["text"])
        encoded = self._tokenizer.encode_batch([_clean(text) for text in texts])
        return np.asarray([e.ids for e in encoded], dtype=np.int64)

    def text_outputs(self, token_ids: np.ndarray) -> TextOutputs:
        """The text graph over ``token_ids`` with the columns that are padding in every row dropped (as the torch
        model does: the tower masks padding anyway)."""
        pad = self.meta["text"]["pad_id"]
        used = np.flatnonzero((token_ids != pad).any(axis=0))
        ids = token_ids[:, : int(used.max()) + 1] if len(used) else token_ids
        pooled, features = self.session("text").run(None, {"input_ids": ids})
        return TextOutputs(pooled, features, ids[:, ids.shape[1] - features.shape[1] :] != pad)

    def head(self) -> dict[str, np.ndarray]:
        """The text head's arrays: emit ``token_ids`` (n,), their ``embeddings`` (n, e, memory-mapped), ``bias``
        (n,), and ``position`` (V,): each vocabulary id's row, or -1."""
        with self._opening:
            return self._head or self._open_head()

    def _open_head(self) -> dict[str, np.ndarray]:
        if self._head is None:
            token_ids = np.load(self.folder / "text_token_ids.npy")
            position = np.full(len(self.vocabulary), -1, np.int64)
            position[token_ids] = np.arange(len(token_ids))
            self._head = {"token_ids": token_ids, "position": position,
                          "embeddings": np.load(self.folder / "text_embeddings.npy", mmap_mode="r"),
                          "bias": np.load(self.folder / "text_bias.npy")}
        return self._head

    def text_sparse(self, outputs: TextOutputs, texts: list[str] | None) -> np.ndarray:
        """(B, V) float32 sparse weights, ``StairModel.encode_text``'s: ``log1p(relu(max over real tokens of the
        head's logits))``; with ``texts`` (grounding) only each text's own word-pieces are computed and kept."""
        head = self.head()
        own = self.grounding_mask(texts) if texts is not None else None
        rows = None if own is None else head["position"][np.flatnonzero(own.any(axis=0))]
        rows = rows if rows is None else rows[rows >= 0]
        chosen = slice(None) if rows is None else rows
        logits = outputs.head_features @ np.asarray(head["embeddings"][chosen]).T + head["bias"][chosen]
        logits = np.where(outputs.mask[:, :, None], logits, -np.inf).max(axis=1)
        weights = np.log1p(np.maximum(logits, 0)).astype(np.float32)
        full = np.zeros((len(weights), len(self.vocabulary)), np.float32)
        full[:, head["token_ids"][chosen]] = weights
        return full if own is None else full * own

    def grounding_mask(self, texts: list[str]) -> np.ndarray:
        """(B, V) bool: the word-pieces each text contains (``StairModel.grounding_mask``)."""
        mask = np.zeros((len(texts), len(self.vocabulary)), bool)
        for row, text in enumerate(texts):
            mask[row, self.vocabulary.token_ids(text)] = True
        return mask

    def floor_query(self, sparse: np.ndarray, texts: list[str]) -> np.ndarray:
        """``StairModel.floor_query``: each text's own words raised to at least ``text_floor``."""
        floor = self.config.text_floor
        if floor <= 0:
            return sparse
        own = np.zeros(sparse.shape, bool)
        for row, text in enumerate(texts):
            own[row, self.vocabulary.first_word_pieces(text)] = True
        return np.where(own, np.maximum(sparse, np.float32(floor)), sparse)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        """(B, D) unit float32 text embeddings (``Encoder.embed_texts``)."""
        return unit_rows(self.text_outputs(self.tokenize(texts)).pooled)

    def encode_texts(self, texts: list[str], sparse_source: str) -> EncodedBatch:
        """Dense + sparse query vectors of ``texts`` (``Encoder.encode_texts``): the text head's grounded, floored
        top-k weights for a model with trained heads, the query's own concept words for a training-free one."""
        if sparse_source not in ("heads", "heads+concepts"):
            sparse = [query_vector(self.vocabulary, t) if sparse_source == "concepts" else {} for t in texts]
            return EncodedBatch(dense=self.embed_texts(texts), sparse=sparse)
        outputs = self.text_outputs(self.tokenize(texts))
        grounded = self.config.ground_text
        weights = self.text_sparse(outputs, texts if grounded else None)
        weights = self.floor_query(weights, texts) if grounded else weights
        return EncodedBatch(dense=unit_rows(outputs.pooled),
                            sparse=top_k_dicts(weights, self.vocabulary.tokens, self.config.text_top_k))

    # ------------------------------------------------------------------------------------------ images

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) float32: the model's preprocessing (torchvision's Resize, CenterCrop, RGB, ToTensor and
        Normalize, as recorded at export) replayed on PIL and numpy, bit for bit."""
        out: Any = image
        for step in self.meta["image"]["preprocess"]:
            out = _PREPROCESS[step["op"]](out, step)
        return out

    def image_outputs(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
        """(B, D) dense (not normalised), (B, V) sparse weights, (B, V) kept tokens (or None) and (B, N, D) local
        features on the grid (not normalised) of the image side."""
        dense, sparse, keep, local = self.session("image").run(
            None, {"pixels": np.ascontiguousarray(pixels, np.float32)})
        return dense, sparse, keep if self.meta["image"]["keep"] else None, local

    def local_features(self, local: np.ndarray, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, m, D) float16 unit local features chosen by :func:`select_local` (``num_local`` of them) and their
        (B, m, 2) float16 patch centres, as ``Encoder`` stores them."""
        local = unit_rows(local)
        chosen = select_local(local, dense, self.config.num_local)
        rows, cols = self.meta["image"]["grid"]
        positions = np.stack([(chosen % cols + 0.5) / cols, (chosen // cols + 0.5) / rows], axis=-1)
        picked = np.take_along_axis(local, chosen[..., None], axis=1)
        return picked.astype(np.float16), positions.astype(np.float32).astype(np.float16)


def _clean(text: str) -> str:
    """open_clip's "whitespace" cleaning: ftfy's fix, HTML entities unescaped twice, whitespace runs collapsed."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip()


def _tokenizer(path: Path, text: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    length = int(text["context_length"])
    tokenizer.enable_truncation(max_length=length)
    tokenizer.enable_padding(length=length, pad_id=int(text["pad_id"]), pad_token=text["pad_token"])
    return tokenizer


def _resize(image: Image.Image, step: dict[str, Any]) -> Image.Image:
    """torchvision's ``Resize`` on a PIL image (``_compute_resized_output_size``, then PIL's resize)."""
    size, max_size = step["size"], step.get("max_size")
    width, height = image.size
    if len(size) == 1:
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size[0], int(size[0] * long / short)
        if max_size is not None and new_long > max_size:
            new_short, new_long = int(max_size * new_short / new_long), max_size
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    else:
        new_h, new_w = size
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), _INTERPOLATIONS[step["interpolation"]])


def _center_crop(image: Image.Image, step: dict[str, Any]) -> Image.Image:
    """torchvision's ``CenterCrop`` on a PIL image (zero padding first when the image is smaller)."""
    crop_h, crop_w = step["size"]
    width, height = image.size
    if crop_w > width or crop_h > height:
        left, top = max(0, (crop_w - width) // 2), max(0, (crop_h - height) // 2)
        padded = Image.new(image.mode, (max(width, crop_w), max(height, crop_h)))
        padded.paste(image, (left, top))
        image, (width, height) = padded, padded.size
        if (crop_w, crop_h) == (width, height):
            return image
    top, left = round((height - crop_h) / 2.0), round((width - crop_w) / 2.0)  # torchvision: int(round(...))
    return image.crop((left, top, left + crop_w, top + crop_h))


def _to_array(image: Image.Image, _step: dict[str, Any]) -> np.ndarray:
    """torchvision's ``ToTensor``: (3, H, W) float32 in [0, 1] (uint8 / 255 in float32, as torch divides)."""
    return np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)


def _normalize(pixels: np.ndarray, step: dict[str, Any]) -> np.ndarray:
    mean = np.asarray(step["mean"], np.float32)[:, None, None]
    std = np.asarray(step["std"], np.float32)[:, None, None]
    return (pixels - mean) / std


_PREPROCESS = {"resize": _resize, "center_crop": _center_crop, "rgb": lambda image, _step: image.convert("RGB"),
               "to_tensor": _to_array, "normalize": _normalize}
PREPROCESS_OPS = tuple(_PREPROCESS)


def top_k_dicts(weights: np.ndarray, tokens: list[str], top_k: int,
                keep: np.ndarray | None = None) -> list[dict[str, float]]:
    """``Encoder._to_dicts`` in numpy: each row's ``top_k`` largest weights (plus the ``keep`` ones, whatever their
    rank) as ``{token: weight}``, zeros left out."""
    weights = np.asarray(weights, np.float32)
    cut = weights
    if 0 < top_k < weights.shape[1]:
        top = np.argpartition(-weights, top_k - 1, axis=1)[:, :top_k]
        cut = np.zeros_like(weights)
        np.put_along_axis(cut, top, np.take_along_axis(weights, top, axis=1), axis=1)
    if keep is not None:
        cut = np.where(keep, weights, cut)
    rows: list[dict[str, float]] = [{} for _ in range(len(cut))]
    for row, col in zip(*np.nonzero(cut), strict=True):
        rows[int(row)][tokens[int(col)]] = float(cut[row, col])
    return rows


def select_local(patches: np.ndarray, global_: np.ndarray, m: int, diversity: float = 0.5) -> np.ndarray:
    """``stair_search.encode.select_local`` in numpy: (B, m) indices of patches by maximal marginal relevance
    (similar to the image's embedding, each pick penalised by its similarity to the picks before it)."""
    batch, count, _ = patches.shape
    relevance = np.einsum("bnd,bd->bn", patches, global_)
    redundancy = np.full_like(relevance, -1.0)
    taken = np.zeros(relevance.shape, bool)
    rows, chosen = np.arange(batch), []
    for _ in range(min(m, count)):
        score = np.where(taken, -np.inf, (1 - diversity) * relevance - diversity * redundancy)
        pick = score.argmax(axis=1)
        chosen.append(pick)
        taken[rows, pick] = True
        redundancy = np.maximum(redundancy, np.einsum("bnd,bd->bn", patches, patches[rows, pick]))
    return np.stack(chosen, axis=1)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length as ``torch.nn.functional.normalize`` does (norm clamped at 1e-12), float32."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), np.float32(1e-12))
    return (vectors / norms).astype(np.float32)
