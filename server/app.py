"""The FastAPI app: one :class:`~server.state.ServiceState` and the routers (search, documents, operations, page).

Every error answer is JSON of bounded size: validation errors are one line naming the field (plus a short list),
other errors pass through :meth:`ServiceState.public` (no index folder, no long echo of the request).

Searches run on a small thread pool with a timeout; their encodes are gathered into shared forwards
(server/batching.py: one forward at a time, over every query that queued meanwhile), while Lucene (its
IndexSearcher is shared by Anserini's own multi-threaded batch search) and FAISS (CPU indexes are safe for
concurrent searches) serve threads in parallel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.endpoints import documents, operations, page, search
from server.errors import error_answer
from server.imaging import ImageRejected
from server.limits import BodySizeLimit
from server.metrics import MetricsMiddleware
from server.registry import IndexRegistry
from server.schemas import BatchSearchRequest, ClassifyRequest, SearchRequest
from server.settings import ServerSettings
from server.state import ServiceState
from stair_search import __version__
from stair_search.index import DamagedIndexError, ShardUnavailable

DOCS_ASSETS = "/docs-assets"  # Swagger UI's files, from the fastapi-offline package


def create_app(indexes: IndexRegistry | Mapping[str, str | Path], settings: ServerSettings | None = None,
               model: str | None = None) -> FastAPI:
    """The service over ``indexes`` (a registry, or {name: index directory}); the first index is the default."""
    settings = settings or ServerSettings()
    registry = indexes if isinstance(indexes, IndexRegistry) else IndexRegistry(
        indexes, model=model, batching=settings.encode_batching, batch_wait_s=settings.batch_wait_s,
        query_weights=settings.query_weights)
    state = ServiceState(registry, settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        registry.start_watching(settings.reload_interval_s)
        try:
            yield
        finally:
            registry.stop_watching()
            state.shutdown()

    app = FastAPI(title="stair-search", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Sparse (STAIR word-pieces in Lucene) + dense (CLIP in FAISS) image search.")
    app.state.service = state
    app.state.registry, app.state.metrics, app.state.settings = registry, state.metrics, settings
    app.add_middleware(BodySizeLimit, max_bytes=state.limits.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key"])
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)

    add_error_handlers(app, state)
    for module in (search, documents, operations, page):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")), name="docs-assets")
    app.openapi = lambda: openapi_document(app)  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI from assets this app serves itself: it works with no network (no CDN)."""
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title=f"{app.title} API",
                                   swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
                                   swagger_favicon_url=f"{DOCS_ASSETS}/favicon.png")

    return app


def add_error_handlers(app: FastAPI, state: ServiceState) -> None:
    """Every error the routes raise, as bounded JSON (server/errors.py): no index folder, no long echo of what the
    client sent. Validation errors (query parameters: FastAPI's check; bodies: server/requests.py) are one line
    naming the field; a damaged index file is a 503 naming the file, and the server and its other indexes go on;
    a cluster shard none of whose copies answers is a 503, never a silently smaller answer."""

    async def answer(_: Request, exc: Exception) -> Response:
        if isinstance(exc, StarletteHTTPException) and (exc.status_code in (204, 304) or exc.status_code < 200):
            return Response(status_code=exc.status_code, headers=exc.headers)
        known = error_answer(exc, state.public)
        if known is None:
            raise exc
        status, body, headers = known
        return JSONResponse(body, status_code=status, headers=headers or None)

    for kind in (RequestValidationError, StarletteHTTPException, ImageRejected, DamagedIndexError, ShardUnavailable):
        app.add_exception_handler(kind, answer)


def openapi_document(app: FastAPI) -> dict:
    """FastAPI's document plus the request bodies the routes parse themselves (JSON or multipart, so FastAPI
    does not see them): their schemas, and those of the models they nest, under ``components/schemas``, so
    that every ``$ref`` resolves. Built once per app."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description,
                               routes=app.routes)
        components = document.setdefault("components", {}).setdefault("schemas", {})
        for model in (SearchRequest, ClassifyRequest, BatchSearchRequest):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        app.openapi_schema = document
    return app.openapi_schema
