"""StairModel: an open_clip backbone with a STAIR sparse head on each tower.

The backbone stays a plain open_clip model (any ViT image tower; built-in or Hugging Face text tower), so
real open_clip checkpoints load unchanged. This module only adds what STAIR needs on top: the per-token
features of both towers, the projected patch features (local features for the rerankers) and the heads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from stair_search.models.config import StairConfig
from stair_search.models.heads import SparseHead
from stair_search.models.vocab import Vocabulary


@dataclass
class TowerOutput:
    dense: torch.Tensor  # (B, D) projected embedding, not normalised
    sparse: torch.Tensor  # (B, V) non-negative word-piece weights, before top-k
    local: torch.Tensor | None = None  # (B, N, D) projected patch features (images only)


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
        if visual is None or not hasattr(visual, "proj") or not hasattr(visual, "output_tokens"):
            raise ValueError(f"Model '{config.name}': STAIR needs a ViT image tower (open_clip VisionTransformer).")
        self.clip = clip
        self.config = config
        self.vocabulary = vocabulary
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        embeddings, token_ids = vocabulary.embedding_matrix(), vocabulary.emit_ids(config.emit_tokens)
        self.image_head = SparseHead(visual.ln_post.normalized_shape[0], embeddings, token_ids)
        self.text_head = SparseHead(self._text_token_width(), embeddings, token_ids)
        self.spec = config.name  # how to load this model again; create_model records the path or name it used
        self.pad_id = int(getattr(getattr(tokenizer, "tokenizer", None), "pad_token_id", None) or 0)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.proj.shape[1])

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
        visual = self.clip.visual
        visual.output_tokens = True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = False
        return TowerOutput(dense=pooled, sparse=self.image_head(tokens), local=tokens @ visual.proj)

    def encode_text(self, token_ids: torch.Tensor) -> TowerOutput:
        token_ids = self._trim_padding(token_ids)
        pooled, tokens = self._text_tokens(token_ids)
        # A CLS-pooled tower returns its tokens without the leading CLS position: align on the right.
        mask = token_ids[:, token_ids.shape[1] - tokens.shape[1] :] != self.pad_id
        return TowerOutput(dense=pooled, sparse=self.text_head(tokens, mask))

    def embed_text(self, token_ids: torch.Tensor) -> torch.Tensor:
        """(B, D) dense text embedding only, without the sparse head (most of a text encode): for texts that
        are never searched sparsely, such as the rerankers' prompts and phrases."""
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
