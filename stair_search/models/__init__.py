"""Model factory, STAIR heads and checkpoints (the word-piece vocabulary they emit over is
``stair_search.vocabulary``).

The names below are looked up on first use (PEP 562), not imported with the package: ``stair_search.models.config``
and the torch-free query runtime (``models/query_runtime.py``) must be importable without torch, and importing any
submodule runs this file first.
"""

from __future__ import annotations

import importlib
from typing import Any

from stair_search import DEFAULT_MODEL

_HOMES = {"load_checkpoint": "checkpoint", "model_fingerprint": "checkpoint", "save_checkpoint": "checkpoint",
          "StairConfig": "config", "builtin_configs": "config", "builtin_models": "factory",
          "create_model": "factory", "StairModel": "stair", "TowerOutput": "stair"}

__all__ = ["DEFAULT_MODEL", *sorted(_HOMES)]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'stair_search.models' has no attribute '{name}'")
    return getattr(importlib.import_module(f"stair_search.models.{home}"), name)
