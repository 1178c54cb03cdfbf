"""HTTP retrieval service (FastAPI): search API, documents and thumbnails, health and metrics, web page; and the
same service on a Ray cluster (``server.cluster``).

The public names load their modules on first use: a cluster's shard replicas import ``server.cluster``, which
must not bring the app, the registry and with them torch and the model into a process that only serves a shard.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from server.app import create_app
    from server.registry import IndexRegistry
    from server.settings import Limits, ServerSettings

_HOMES = {"create_app": "server.app", "IndexRegistry": "server.registry", "Limits": "server.settings",
          "ServerSettings": "server.settings"}
__all__ = ["IndexRegistry", "Limits", "ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name]), name)
