"""StairModel: an open_clip backbone with a STAIR sparse head on each tower.

The backbone stays a plain open_clip model (a ViT, ModifiedResNet or timm image tower; built-in or Hugging Face
text tower), so real open_clip checkpoints load unchanged. This module only adds what STAIR needs on top: the
per-token features of both towers (read through an image-tower adapter, models/towers.py), the local features on
the image grid (for the rerankers), the heads, and optionally the image network's ImageNet prior (models/prior.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stair_search.models.config import StairConfig
from stair_search.models.heads import SparseHead
from stair_search.models.prior import ImageNetPrior
from stair_search.models.towers import ImageFeatures, TimmTower, image_tower
from stair_search.models.trust import TrustGate
from stair_search.vocabulary import Vocabulary


@dataclass
class TowerOutput:
    dense: torch.Tensor  # (B, D) projected embedding, not normalised
    sparse: torch.Tensor  # (B, V) non-negative word-piece weights, before top-k
    local: torch.Tensor | None = None  # (B, N, D) projected patch features (images only)
    grid: tuple[int, int] | None = None  # (rows, cols) of ``local`` on the image (images only)
    # (B, V) bool: tokens kept past the top-k cut (the ImageNet prior's class words: a classifier trained on real
    # photos is surer of them than a head trained on drawings)
    keep: torch.Tensor | None = None


PRIOR_KEEP = 0.1  # a class word weighing at least this much (about p >= 0.1) stays past the image top-k cut


# "heads+concepts": the heads' image vectors plus StairConfig.concept_weight x the training-free ones; queries
# from the text head, as with "heads".
SPARSE_SOURCES = ("heads", "heads+concepts", "concepts", "none")


def resolve_sparse(source: str | None, trained: bool) -> str:
    """StairConfig.sparse, or its default: a model's own heads when they were trained, else concepts."""
    if source is None:
        return "heads" if trained else "concepts"
    if source not in SPARSE_SOURCES:
        raise ValueError(f"Unknown sparse source '{source}' in the model config; known: {SPARSE_SOURCES}.")
    return source


class StairModel(nn.Module):
    def __init__(
        self,
        clip: nn.Module,
        config: StairConfig,
        vocabulary: Vocabulary,
        preprocess: Callable,
        tokenizer: Callable,
    ):
        super().__init__()
        visual = getattr(clip, "visual", None)
        if visual is None:
            raise ValueError(f"Model '{config.name}': STAIR needs an open_clip model with an image tower.")
        self.clip = clip
        self.config = config
        self.vocabulary = vocabulary
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        embeddings = torch.from_numpy(vocabulary.embedding_matrix())
        token_ids = torch.from_numpy(vocabulary.emit_ids(config.emit_tokens))
        # Not a registered submodule: the adapter only reads the network that ``clip.visual`` already owns.
        object.__setattr__(self, "tower", image_tower(visual, config.unfrozen_blocks))
        self.image_head = SparseHead(self.tower.token_width, embeddings, token_ids)
        self.text_head = SparseHead(self._text_token_width(), embeddings, token_ids)
        self.image_prior = self._build_prior(config)
        self.trust = self._build_trust(config)
        # StairConfig.dense_alignment's (D, D) map, set by the factory (a file, never in a checkpoint).
        self.register_buffer("dense_map", None, persistent=False)
        self.spec = config.name  # how to load this model again; create_model records the path or name it used
        # Where its sparse vectors come from (StairConfig.sparse); load_checkpoint says "heads" for trained ones.
        self.sparse_source = resolve_sparse(config.sparse, trained=False)
        self.pad_id = int(getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None) or 0)

    def _build_prior(self, config: StairConfig) -> ImageNetPrior | None:
        if config.image_prior is None:
            return None
        if config.image_prior != "imagenet":
            raise ValueError(f"Unknown image_prior '{config.image_prior}'; known: 'imagenet' or none.")
        if not isinstance(self.tower, TimmTower):
            raise ValueError("image_prior 'imagenet' needs a timm CNN image tower (its pooled ImageNet features).")
        return ImageNetPrior(self.tower.token_width, self.embed_dim)

    def _build_trust(self, config: StairConfig) -> TrustGate | None:
        if not config.trust_components:
            return None
        if self.image_prior is None:
            raise ValueError("trust_components needs image_prior 'imagenet': the gate hands an unfamiliar image "
                             "over to the prior, so a model without one has nothing to hand it to.")
        return TrustGate(self.tower.token_width, config.trust_components)

    def train(self, mode: bool = True) -> StairModel:
        """As ``nn.Module.train``, but batch-norm statistics stay those the image network was trained with
        (small fine-tuning batches of icons would otherwise overwrite ImageNet's)."""
        super().train(mode)
        for module in self.clip.visual.modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)):
                module.eval()
        return self

    @property
    def embed_dim(self) -> int:
        return self.tower.embed_dim

    @property
    def image_size(self) -> tuple[int, int]:
        return self.tower.image_size

    @property
    def logit_scale(self) -> float:
        return float(self.clip.logit_scale.exp())

    def _text_token_width(self) -> int:
        text = getattr(self.clip, "text", None)
        if text is None:  # open_clip CLIP: the text transformer lives on the model itself
            return int(self.clip.ln_final.normalized_shape[0])
        if hasattr(text, "transformer") and hasattr(text.transformer, "config"):  # Hugging Face tower
            return int(text.transformer.config.hidden_size)
        return int(text.ln_final.normalized_shape[0])

    def encode_image(self, pixels: torch.Tensor) -> TowerOutput:
        return self.encode_image_stem(self.tower.stem(pixels))

    def encode_image_stem(self, stem_out: torch.Tensor, local: bool = True) -> TowerOutput:
        """The image side from the output of the tower's frozen stem (what cheap training caches);
        ``local=False`` skips the prior's per-position part of the local features (training never reads it)."""
        return self.image_output(self.tower.tail(stem_out), local)

    def image_output(self, features: ImageFeatures, with_local: bool = True, exportable: bool = False) -> TowerOutput:
        """Dense, sparse and local outputs from the tower's features (what an accelerated tower hands back);
        ``exportable``: in ops the ONNX exporter writes exactly (models/query_export.py)."""
        dense, local = self.image_dense(features, with_local)
        sparse, keep = self.image_sparse(self.image_head(features.head_tokens), features.features, exportable)
        return TowerOutput(dense=dense, sparse=sparse, local=local, grid=features.grid, keep=keep)

    def image_dense(self, features: ImageFeatures, with_local: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) dense and (B, N, D) local features of the image side (the local ones without the prior's
        per-position term unless ``with_local``)."""
        dense, local = features.pooled, features.local
        if self.trust is not None:  # the learned parts, scaled down on images unlike the training data
            weight = self.trust(features.features)
            dense, local = weight * dense, weight.unsqueeze(2) * local
        if self.image_prior is not None:
            dense = dense + self.image_prior.dense(features.features)
            if with_local:
                local = local + self.image_prior.dense(features.tokens)
        if self.dense_map is not None:
            dense, local = dense @ self.dense_map.T, local @ self.dense_map.T
        return dense, local

    def align_dense(self, matrix: torch.Tensor) -> None:
        """Apply the (D, D) ``matrix`` to every image dense vector and local feature from now on."""
        width = self.tower.embed_dim
        if tuple(matrix.shape) != (width, width):
            raise ValueError(f"dense_alignment of model {self.config.name} has shape {tuple(matrix.shape)}; it "
                             f"must be ({width}, {width}): train it on this model (`stair-search align --target "
                             f"dense`).")
        self.dense_map = matrix.float()

    def image_sparse(self, head_weights: torch.Tensor, features: torch.Tensor | None = None,
                     exportable: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, V) sparse weights of the image side from its head's (B, V) output and the pooled network features the
        trust gate and the prior read, and (B, V) the tokens kept past the top-k cut (or None): the part of
        :meth:`image_output` that heads-only training runs on cached tower features."""
        sparse = head_weights
        if self.trust is not None:
            sparse = self.trust(features) * sparse
        if self.image_prior is None:
            return sparse, None
        prior = self.image_prior.sparse(features, sparse.shape[1], exportable)
        return sparse + prior, prior >= PRIOR_KEEP

    def floor_query(self, sparse: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Grounded query weights with each word of the text (stop words aside) raised to at least ``text_floor``
        on its first word-piece: the whole word itself, or the piece a longer word starts with ("orangutan" ->
        ``or``), which is the one an image vector can hold (the heads emit whole-word pieces only)."""
        floor = self.config.text_floor
        if floor <= 0:
            return sparse
        own = torch.zeros_like(sparse, dtype=torch.bool)
        for row, text in enumerate(texts):
            own[row, self.vocabulary.first_word_pieces(text)] = True
        return torch.where(own, sparse.clamp(min=floor), sparse)

    def encode_text(self, token_ids: torch.Tensor, ground: list[str] | None = None) -> TowerOutput:
        """Dense + sparse text vectors; with ``ground`` (the texts themselves) each sparse vector is masked to
        its own word-pieces (STAIR's grounding), and only those columns of the head are computed."""
        token_ids = self._trim_padding(token_ids)
        pooled, tokens = self._text_tokens(token_ids)
        # A CLS-pooled tower returns its tokens without the leading CLS position: align on the right.
        mask = token_ids[:, token_ids.shape[1] - tokens.shape[1] :] != self.pad_id
        if ground is None:
            return TowerOutput(dense=pooled, sparse=self.text_head(tokens, mask))
        own = self.grounding_mask(ground)
        sparse = self.text_head(tokens, mask, only=own.any(dim=0).nonzero().flatten()) * own
        return TowerOutput(dense=pooled, sparse=sparse)

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) dense text embedding only, without the sparse head (most of a text encode): for texts that
        are never searched sparsely, such as the rerankers' prompts and phrases, and concept words."""
        if _causal_clip_text(self.clip):
            return _short_clip_text(self.clip, token_ids)
        pooled = self.clip.encode_text(self._trim_padding(token_ids))
        return pooled[0] if isinstance(pooled, tuple) else pooled  # a tower left returning its tokens too

    def _trim_padding(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Drop the columns that are padding in every row. A Hugging Face tower masks padding anyway, so the
        output is the same, but a batch of short queries costs ~4x less than at the full context length.
        (open_clip's own towers pool at a fixed position and keep their input as given.)"""
        if not hasattr(getattr(self.clip, "text", None), "transformer"):
            return token_ids
        used = (token_ids != self.pad_id).any(dim=0).nonzero()
        return token_ids[:, : int(used.max()) + 1] if len(used) else token_ids

    def grounding_mask(self, texts: list[str]) -> torch.Tensor:
        """(B, V) bool: the word-pieces each text contains (STAIR's stage-1 mask, and ``ground_text``)."""
        mask = torch.zeros((len(texts), len(self.vocabulary)), dtype=torch.bool)
        for row, text in enumerate(texts):
            mask[row, self.vocabulary.token_ids(text)] = True
        return mask.to(self.image_head.bias.device)

    def text_tokens(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D) pooled text embedding (not normalised) and (B, L', C) the tower's per-token features, the ones the
        text head reads (what a query export traces: models/query_export.py)."""
        return self._text_tokens(token_ids)

    def _text_tokens(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        text = getattr(self.clip, "text", None)
        if text is not None:  # CustomTextCLIP: the tower is a module that can return its tokens
            text.output_tokens = True
            try:
                return text(token_ids)
            finally:
                text.output_tokens = False
        # CLIP keeps its text transformer inline in encode_text: capture ln_final's per-token output.
        captured: list[torch.Tensor] = []
        hook = self.clip.ln_final.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            pooled = self.clip.encode_text(token_ids)
        finally:
            hook.remove()
        return pooled, captured[-1]


def _causal_clip_text(clip: nn.Module) -> bool:
    """An open_clip CLIP text tower with a causal mask, pooled at the end-of-text token (every OpenAI / LAION
    CLIP): its pooled output depends only on the tokens up to that one."""
    return (hasattr(clip, "token_embedding") and getattr(clip, "attn_mask", None) is not None
            and getattr(clip, "text_pool_type", None) == "argmax" and hasattr(clip, "transformer"))


def _short_clip_text(clip: nn.Module, token_ids: torch.Tensor) -> torch.Tensor:
    """open_clip's ``CLIP.encode_text`` over the used columns only: with a causal mask the end-of-text token sees
    nothing after it, so cutting the padding (77 -> ~8 positions for a concept word) changes no output (tested)
    and makes short texts cheaper (7.8x for 256 ViT-B-32 prompts on this CPU). The steps are open_clip's own, on a
    shorter sequence."""
    length = int((token_ids != 0).any(dim=0).nonzero().max()) + 1 if bool((token_ids != 0).any()) else 1
    text = token_ids[:, :length]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(text).to(cast) + clip.positional_embedding[:length].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:length, :length]))
    x = x[torch.arange(x.shape[0], device=x.device), text.argmax(dim=-1)]
    projection = clip.text_projection
    if projection is None:
        return x
    return projection(x) if isinstance(projection, nn.Linear) else x @ projection
