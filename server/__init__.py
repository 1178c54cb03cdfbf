"""HTTP retrieval service (FastAPI): search API, documents and thumbnails, health and metrics, web page."""

from server.app import create_app
from server.registry import IndexRegistry
from server.settings import Limits, ServerSettings

__all__ = ["IndexRegistry", "Limits", "ServerSettings", "create_app"]
