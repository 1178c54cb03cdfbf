"""ONNX Runtime for a CNN trunk on CPU: the image side's fastest path where torch is slowest.

Why: on CPU, torch runs a depthwise-separable CNN (EfficientNet-Lite0, the default model's tower) as one
convolution call after another, each writing a full activation to memory; ONNX Runtime fuses each convolution
with its activation and plans its memory once. Measured on this project's 2-core machine at batch 32, 224 px:
the batch-norm-folded, channels-last torch trunk ran 68 images/s (115 in micro-batches of 4), ONNX Runtime 160-190,
outputs equal to ~3e-5 (tested). The trunk is exported once per :class:`~stair_search.encode.Encoder`, in memory
(~1.4 s), with torch's TorchScript exporter: the newer ``dynamo`` exporter took ~9 s and needs onnxscript.
When onnxruntime is not installed or the export fails, :func:`onnx_trunk` returns None and the caller keeps torch.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable

import torch
from torch import nn

log = logging.getLogger(__name__)

# What may run an inference copy of a CNN trunk on CPU, fastest first (models/towers.py tries them in order).
RUNTIMES = ("onnxruntime", "torch")


class _Features(nn.Module):
    """The trunk's feature map as the module's output (what the exporter traces)."""

    def __init__(self, trunk: nn.Module):
        super().__init__()
        self.trunk = trunk

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(pixels)


def onnx_trunk(trunk: nn.Module, example: torch.Tensor,
               threads: int | None = None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``trunk.forward_features`` (an eval-mode timm CNN) as an ONNX Runtime session on CPU, or None where
    onnxruntime is missing or the trunk does not export. ``example``: a (B, 3, H, W) CPU batch; the batch and the
    image size stay dynamic. ``threads``: the session's intra-op threads (default torch's current count); they
    sleep between calls instead of spinning, so decode workers and other processes keep the cores."""
    try:
        import onnxruntime
    except ImportError:
        return None
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated in favour of the slower dynamo one
            warnings.simplefilter("ignore")
            torch.onnx.export(_Features(trunk), (example,), buffer, input_names=["pixels"], output_names=["features"],
                              dynamic_axes={"pixels": {0: "batch", 2: "height", 3: "width"}}, dynamo=False)
    except Exception as error:  # an optional speed-up: any export failure means "keep torch"
        log.warning("the image trunk did not export to ONNX (%s); encoding with torch instead", error)
        return None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def run(pixels: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {"pixels": pixels.float().contiguous().numpy()})[0])

    return run
