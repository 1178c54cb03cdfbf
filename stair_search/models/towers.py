"""Image towers: one small adapter per open_clip / timm image network, one output shape for STAIR.

STAIR needs three things from an image network: a pooled embedding in the joint space, the tokens its sparse
head reads, and local features on the image's spatial grid (SSP and ComCLIP read them with their positions).
ViTs give patch tokens, CNNs give a feature map; each adapter below turns its network's outputs into
:class:`ImageFeatures` without changing the network itself, so real open_clip and timm weights load unchanged.

Every adapter is split in two at a *freeze boundary*: ``stem`` (the part kept frozen in cheap training, whose
outputs a trainer may cache once) and ``tail`` (the rest). ``forward(pixels) == tail(stem(pixels))``.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from stair_search.models.runtime import RUNTIMES, export_onnx, onnx_session

log = logging.getLogger(__name__)


@dataclass
class ImageFeatures:
    pooled: torch.Tensor  # (B, D) embedding in the joint space, not normalised
    head_tokens: torch.Tensor  # (B, L, C) what the sparse head reads
    tokens: torch.Tensor  # (B, N, C) the network's own features on the grid, row-major over ``grid``
    local: torch.Tensor  # (B, N, D) the same positions in the joint space
    grid: tuple[int, int]  # (rows, cols) of the local features
    features: torch.Tensor | None = None  # (B, C) pooled network features before the projection (CNNs)


class ImageTower(nn.Module):
    """Base adapter: subclasses set ``network`` and implement ``stem``, ``tail``, ``token_width``, ``embed_dim``."""

    network: nn.Module

    @property
    def token_width(self) -> int:
        raise NotImplementedError

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def image_size(self) -> tuple[int, int]:
        size = getattr(self.network, "image_size", 224)
        return (size, size) if isinstance(size, int) else tuple(size)

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels

    def tail(self, stem_out: torch.Tensor) -> ImageFeatures:
        raise NotImplementedError

    def forward(self, pixels: torch.Tensor) -> ImageFeatures:
        return self.tail(self.stem(pixels))

    def accelerated(self, example: torch.Tensor,
                    runtimes: Sequence[str] = RUNTIMES) -> Callable[[torch.Tensor], ImageFeatures] | None:
        """A faster ``forward`` for CPU inference over a frozen snapshot of the current weights, run by the first
        of ``runtimes`` that works here, or None when this tower has none (then ``forward`` is used). The snapshot
        never sees later weight changes: build it for inference only (the Encoder does, on its first image batch)."""
        return None

    @property
    def has_stem(self) -> bool:
        """Whether ``stem`` is more than the identity (then training caches its outputs)."""
        return False

    def stem_parameters(self) -> list[nn.Parameter]:
        """Parameters of the frozen side of the boundary (empty when the stem is the identity)."""
        return []

    def projection_parameters(self) -> list[nn.Parameter]:
        """Parameters of the projection into the joint space."""
        raise NotImplementedError

    def trunk_parameters(self) -> list[nn.Parameter]:
        """The network's own parameters after the stem, without its projection (what a pretrained tower
        fine-tunes gently, or keeps frozen)."""
        skip = {id(p) for p in [*self.stem_parameters(), *self.projection_parameters()]}
        return [p for p in self.network.parameters() if id(p) not in skip]


class ViTTower(ImageTower):
    """open_clip ``VisionTransformer``: patch tokens after ``ln_post``; local = tokens @ proj."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.network = visual

    @property
    def token_width(self) -> int:
        return int(self.network.ln_post.normalized_shape[0])

    @property
    def embed_dim(self) -> int:
        return int(self.network.proj.shape[1])

    def projection_parameters(self) -> list[nn.Parameter]:
        return [self.network.proj]

    def tail(self, stem_out: torch.Tensor) -> ImageFeatures:
        visual = self.network
        visual.output_tokens = True
        try:
            pooled, tokens = visual(stem_out)
        finally:
            visual.output_tokens = False
        return ImageFeatures(pooled, tokens, tokens, tokens @ visual.proj, tuple(visual.grid_size))


def _grid_tokens(feature_map: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C), row-major."""
    return feature_map.flatten(2).transpose(1, 2)


class ResNetTower(ImageTower):
    """open_clip ``ModifiedResNet`` (CLIP RN50 & co.): the last feature map is the grid. Local features go
    through the attention pool's value and output projections position by position (the pool's attention
    averages exactly these vectors), so they live in the joint space like the pooled embedding."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        self.network = visual

    @property
    def token_width(self) -> int:
        return int(self.network.attnpool.v_proj.in_features)

    @property
    def embed_dim(self) -> int:
        return int(self.network.attnpool.c_proj.out_features)

    def projection_parameters(self) -> list[nn.Parameter]:
        return list(self.network.attnpool.parameters())

    def tail(self, stem_out: torch.Tensor) -> ImageFeatures:
        net = self.network
        x = net.layer4(net.layer3(net.layer2(net.layer1(net.stem(stem_out)))))
        pooled = net.attnpool(x)
        tokens = _grid_tokens(x)
        pool = net.attnpool
        local = pool.c_proj(pool.v_proj(tokens + pool.positional_embedding[1:].to(tokens.dtype)))
        return ImageFeatures(pooled, tokens, tokens, local, (x.shape[2], x.shape[3]), features=x.mean(dim=(2, 3)))


class TimmTower(ImageTower):
    """open_clip ``TimmModel`` (ConvNeXt CLIPs, and any timm CNN used as a CLIP tower).

    The trunk's feature map is the grid; local features are the trunk's own head norm (if any) and open_clip's
    projection applied per position, the pooled embedding is the network's own forward. The sparse head reads
    the globally pooled feature plus a 2x2 pooled grid: five positions instead of 49 keep a vocabulary-wide head
    cheap on CPU. For timm EfficientNets the stem can end before the last ``unfrozen_blocks`` stages, so that
    training caches the stem's outputs once and fine-tunes only the top of the trunk.
    """

    def __init__(self, visual: nn.Module, unfrozen_blocks: int = 0):
        super().__init__()
        self.network = visual
        blocks = getattr(visual.trunk, "blocks", None)
        if unfrozen_blocks and not (isinstance(blocks, nn.Sequential) and hasattr(visual.trunk, "conv_head")):
            raise ValueError(f"unfrozen_blocks={unfrozen_blocks} needs a timm EfficientNet-style trunk "
                             f"(blocks + conv_head); {type(visual.trunk).__name__} has none: use 0.")
        self.split = len(blocks) - unfrozen_blocks if unfrozen_blocks else None

    @property
    def token_width(self) -> int:
        return int(self.network.trunk.num_features)

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.network.head, "proj", None)
        if proj is None:
            raise ValueError("STAIR needs a timm tower with a linear projection (timm_proj 'linear').")
        return int(proj.out_features)

    def projection_parameters(self) -> list[nn.Parameter]:
        return list(self.network.head.parameters())

    @property
    def has_stem(self) -> bool:
        return self.split is not None

    def stem(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.split is None:
            return pixels
        trunk = self.network.trunk
        return trunk.blocks[: self.split](trunk.bn1(trunk.conv_stem(pixels)))

    def stem_parameters(self) -> list[nn.Parameter]:
        if self.split is None:
            return []
        trunk = self.network.trunk
        modules = [trunk.conv_stem, trunk.bn1, *trunk.blocks[: self.split]]
        return [p for module in modules for p in module.parameters()]

    def feature_map(self, stem_out: torch.Tensor) -> torch.Tensor:
        trunk = self.network.trunk
        if self.split is None:
            return trunk.forward_features(stem_out)
        return trunk.bn2(trunk.conv_head(trunk.blocks[self.split :](stem_out)))

    def accelerated(self, example: torch.Tensor,
                    runtimes: Sequence[str] = RUNTIMES) -> Callable[[torch.Tensor], ImageFeatures] | None:
        """An inference copy of the trunk (pixels -> feature map) on CPU, every batch norm folded into the
        convolution before it, run by the first of ``runtimes`` that works here: "onnxruntime" (models/runtime.py)
        or "torch" (channels-last weights, oneDNN's fast path for depthwise convolutions, in micro-batches; see
        :func:`torch_trunk`). Outputs equal the eager trunk's to ~1e-4 (tested); the heads, prior and gate stay."""
        if example.device.type != "cpu":
            return None
        trunk = fold_batch_norms(copy.deepcopy(self.network.trunk).eval())
        run = None
        for runtime in runtimes:
            if runtime not in RUNTIMES:
                raise ValueError(f"Unknown trunk runtime {runtime!r}: use one of {RUNTIMES}.")
            run = onnx_trunk(trunk, example) if runtime == "onnxruntime" else torch_trunk(trunk)
            if run is not None:
                break
        if run is None:
            return None
        return lambda pixels: self.from_feature_map(run(pixels))

    def tail(self, stem_out: torch.Tensor) -> ImageFeatures:
        return self.from_feature_map(self.feature_map(stem_out))

    def from_feature_map(self, fmap: torch.Tensor, exportable: bool = False) -> ImageFeatures:
        """Everything after the trunk's last feature map: pooled features, grid tokens and their projections.
        ``exportable``: pool the 2x2 grid with :func:`grid_pool` (ONNX has no adaptive pooling over uneven bins,
        such as 7 -> 2) instead of torch's own kernel; the same bins, summed in another order (~1e-7)."""
        trunk, head = self.network.trunk, self.network.head
        pooled_features = trunk.forward_head(fmap, pre_logits=True)
        norm = getattr(getattr(trunk, "head", None), "norm", None)
        grid_map = norm(fmap) if isinstance(norm, nn.Module) else fmap
        tokens = _grid_tokens(grid_map)
        quadrants = grid_pool(grid_map, 2) if exportable else _grid_tokens(F.adaptive_avg_pool2d(grid_map, 2))
        head_tokens = torch.cat([pooled_features[:, None], quadrants], dim=1)
        return ImageFeatures(head(pooled_features), head_tokens, tokens, head(tokens), (fmap.shape[2], fmap.shape[3]),
                             features=pooled_features)


def grid_pool(fmap: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, size * size, C): ``adaptive_avg_pool2d``'s bins (start ``floor(i * H / size)``, end
    ``ceil((i + 1) * H / size)``), row-major, as slices and means that the ONNX exporter can write."""
    height, width = int(fmap.shape[2]), int(fmap.shape[3])
    rows = [(i * height // size, -(-(i + 1) * height // size)) for i in range(size)]
    cols = [(j * width // size, -(-(j + 1) * width // size)) for j in range(size)]
    return torch.stack([fmap[:, :, r0:r1, c0:c1].mean(dim=(2, 3)) for r0, r1 in rows for c0, c1 in cols], dim=1)


# torch's CPU trunk in batches of 4: at 224 px the largest activation of 4 images (EfficientNet-Lite0's first
# expansion, 96 x 112 x 112 floats each) stays under glibc's 32 MB mmap ceiling, so its memory is reused instead of
# being mapped and faulted in again at every layer; measured 115 images/s against 68 for whole batches of 32.
TRUNK_MICRO_BATCH = 4


def torch_trunk(trunk: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A folded eval-mode timm trunk's ``forward_features`` in channels-last layout and micro-batches."""
    trunk = trunk.to(memory_format=torch.channels_last)

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat([trunk.forward_features(part.contiguous(memory_format=torch.channels_last))
                          for part in pixels.split(TRUNK_MICRO_BATCH)]).contiguous()

    return run


class TrunkFeatures(nn.Module):
    """A timm trunk's feature map as the module's output (what the exporter traces)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(pixels)


def onnx_trunk(trunk: nn.Module, example: torch.Tensor,
               threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``trunk.forward_features`` (an eval-mode timm CNN) as an ONNX Runtime session on CPU (models/runtime.py), or
    None where onnxruntime is missing or the trunk does not export. ``example``: a (B, 3, H, W) CPU batch; the batch
    and the image size stay dynamic. ``threads``: the session's intra-op threads (default torch's current count)."""
    try:
        import onnxruntime  # noqa: F401 - only whether it is installed
    except ImportError:
        return None
    try:
        graph = export_onnx(TrunkFeatures(trunk), (example,), ["pixels"], ["features"],
                            {"pixels": {0: "batch", 2: "height", 3: "width"}})
    except Exception as error:  # an optional speed-up: any export failure means "keep torch"
        log.warning("the image trunk did not export to ONNX (%s); encoding with torch instead", error)
        return None
    session = onnx_session(graph, threads or torch.get_num_threads())

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"pixels": pixels.float().contiguous().numpy()})[0])

    return run


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """Fold each eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` (siblings in order) into it, in place;
    a norm with a fused activation (timm's ``BatchNormAct2d``) leaves its activation behind. Inference only."""
    children = list(module.named_children())
    for (prev_name, prev), (name, child) in itertools.pairwise(children):
        if isinstance(prev, nn.Conv2d) and isinstance(child, nn.BatchNorm2d) and not child.training:
            setattr(module, prev_name, torch.nn.utils.fusion.fuse_conv_bn_eval(prev, child))
            rest = [m for m in (getattr(child, "drop", None), getattr(child, "act", None)) if isinstance(m, nn.Module)]
            setattr(module, name, nn.Sequential(*rest))
    for _, child in module.named_children():
        fold_batch_norms(child)
    return module


def image_tower(visual: nn.Module, unfrozen_blocks: int = 0) -> ImageTower:
    """The adapter for an open_clip image tower, or a clear error naming what is supported."""
    kind = type(visual).__name__
    if unfrozen_blocks and kind != "TimmModel":
        raise ValueError(f"unfrozen_blocks={unfrozen_blocks} needs a timm EfficientNet-style trunk; {kind} has "
                         f"none: use 0.")
    if kind == "VisionTransformer":
        return ViTTower(visual)
    if kind == "ModifiedResNet":
        return ResNetTower(visual)
    if kind == "TimmModel":
        return TimmTower(visual, unfrozen_blocks)
    raise ValueError(f"No STAIR adapter for the image tower {kind}: supported are open_clip VisionTransformer, "
                     f"ModifiedResNet and TimmModel (timm CNNs such as ConvNeXt or EfficientNet).")
