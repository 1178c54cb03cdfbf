"""The FastAPI app: one :class:`~server.state.ServiceState` and the routers (search, documents, operations, page).

Searches run on a small thread pool with a timeout; the encoder runs one call at a time (LockedEncoder),
while Lucene (its IndexSearcher is shared by Anserini's own multi-threaded batch search) and FAISS (CPU
indexes are safe for concurrent searches) serve threads in parallel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from server.imaging import ImageRejected
from server.limits import BodySizeLimit
from server.metrics import MetricsMiddleware
from server.registry import IndexRegistry
from server.routes import documents, operations, page, search
from server.schemas import ClassifyRequest, SearchRequest
from server.settings import ServerSettings
from server.state import ServiceState


def create_app(indexes: IndexRegistry | Mapping[str, str | Path], settings: ServerSettings | None = None,
               model: str | None = None) -> FastAPI:
    """The service over ``indexes`` (a registry, or {name: index directory}); the first index is the default."""
    settings = settings or ServerSettings()
    registry = indexes if isinstance(indexes, IndexRegistry) else IndexRegistry(indexes, model=model)
    state = ServiceState(registry, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        registry.start_watching(settings.reload_interval_s)
        try:
            yield
        finally:
            registry.stop_watching()
            state.shutdown()

    app = FastAPI(title="stair-search", version="0.1.0", lifespan=lifespan,
                  description="Sparse (STAIR word-pieces in Lucene) + dense (CLIP in FAISS) image search.")
    app.state.service = state
    app.state.registry, app.state.metrics, app.state.settings = registry, state.metrics, settings
    app.add_middleware(BodySizeLimit, max_bytes=state.limits.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key"])
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)

    @app.exception_handler(ImageRejected)
    async def image_rejected(_: Request, exc: ImageRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    for module in (search, documents, operations, page):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]
    return app


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document plus the request bodies the routes parse themselves (JSON or multipart, so FastAPI
    does not see them): their schemas, and those of the models they nest, under ``components/schemas``, so
    that every ``$ref`` resolves. Built once per app."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for model in (SearchRequest, ClassifyRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        app.openapi_schema = document
    return app.openapi_schema
