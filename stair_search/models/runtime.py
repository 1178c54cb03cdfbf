"""ONNX Runtime on CPU: the one way stair-search exports a torch module to an ONNX graph and runs it.

Why: on CPU, torch runs a depthwise-separable CNN (EfficientNet-Lite0, the default model's tower) as one
convolution call after another, each writing a full activation to memory; ONNX Runtime fuses each convolution
with its activation and plans its memory once. Measured on this project's 2-core machine at batch 32, 224 px:
the batch-norm-folded, channels-last torch trunk ran 68 images/s (115 in micro-batches of 4), ONNX Runtime 160-190,
outputs equal to ~3e-5 (tested). For indexing, the trunk is exported once per :class:`~stair_search.encode.Encoder`,
in memory (~1.4 s), with torch's TorchScript exporter: the newer ``dynamo`` exporter took ~9 s and needs
onnxscript. When onnxruntime is not installed or the export fails, ``models.towers.onnx_trunk`` returns None and
the caller keeps torch.

Queries use the same exporter and session settings (models/query_export.py writes the graphs once into the data
cache, models/query_runtime.py runs them), so this module imports torch only inside the functions that export:
loading and running a saved graph needs onnxruntime and numpy alone.
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

# What may run an inference copy of a CNN trunk on CPU, fastest first (models/towers.py tries them in order).
RUNTIMES = ("onnxruntime", "torch")
# Intra-op threads of a query session when the caller names none (``serve --encode-threads`` sets it).
THREADS_ENV = "STAIR_ENCODE_THREADS"


def export_onnx(module: nn.Module, inputs: tuple[torch.Tensor, ...], input_names: Sequence[str],
                output_names: Sequence[str], dynamic_axes: Mapping[str, Mapping[int, str]]) -> bytes:
    """``module`` (eval mode, CPU) traced on ``inputs`` as an ONNX graph, with torch's TorchScript exporter (the
    same module and inputs give the same bytes). Raises whatever the exporter raises."""
    import torch

    buffer = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated in favour of the slower dynamo one
        warnings.simplefilter("ignore")
        torch.onnx.export(module, inputs, buffer, input_names=list(input_names), output_names=list(output_names),
                          dynamic_axes={k: dict(v) for k, v in dynamic_axes.items()}, dynamo=False)
    return buffer.getvalue()


def default_threads() -> int | None:
    """``$STAIR_ENCODE_THREADS`` when set (a positive number), else None (ONNX Runtime's own default)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r} is not a positive number of threads: unset it or give e.g. 1.")
    return int(value)


def onnx_session(graph: bytes | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session over ``graph`` (the bytes, or a saved .onnx file). ``threads``: intra-op threads
    (None: :func:`default_threads`, else ONNX Runtime's default); they sleep between calls instead of spinning, so
    decode workers, search threads and other processes keep the cores."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    chosen = threads or default_threads()
    if chosen:
        options.intra_op_num_threads = chosen
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    source = str(graph) if isinstance(graph, Path) else graph
    return onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
