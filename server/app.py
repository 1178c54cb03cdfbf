"""The FastAPI app: search, classify, documents, thumbnails, health, metrics and the web page.

Searches run on a small thread pool with a timeout; the encoder runs one call at a time (LockedEncoder),
while Lucene (its IndexSearcher is shared by Anserini's own multi-threaded batch search) and FAISS (CPU
indexes are safe for concurrent searches) serve threads in parallel.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from server.imaging import (
    ImageRejected,
    decode_base64,
    open_query_image,
    source_state,
    stored_image,
    thumbnail_png,
)
from server.limits import BodySizeLimit, require_api_key
from server.metrics import Metrics, MetricsMiddleware
from server.registry import IndexRegistry, IndexVersion
from server.schemas import (
    MAX_K,
    ClassifyRequest,
    ClassifyResult,
    Document,
    Hit,
    IndexInfo,
    LabelScore,
    MatchedToken,
    SearchRequest,
    SearchResult,
    ServiceInfo,
)
from server.settings import ServerSettings
from stair_search.index.reader import STORED_FIELDS
from stair_search.rerank import RERANKERS
from stair_search.rerank.s3 import classify as classify_image
from stair_search.retrieve.router import MODES

log = logging.getLogger("stair_search.server")
STATIC = Path(__file__).with_name("static")
FILTER_OVERFETCH = 10  # a filtered search ranks this many times k candidates before filtering
QUERY_TOKENS_SHOWN = 32
T = TypeVar("T", bound=BaseModel)

_UPLOAD_BODY = {"content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/{name}"}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "string", "format": "binary"},
        "request": {"type": "string", "description": "the other fields as a JSON object"}}}},
}, "required": True}


def create_app(indexes: IndexRegistry | Mapping[str, str | Path], settings: ServerSettings | None = None,
               model: str | None = None) -> FastAPI:
    """The service over ``indexes`` (a registry, or {name: index directory}); the first index is the default."""
    settings = settings or ServerSettings()
    registry = indexes if isinstance(indexes, IndexRegistry) else IndexRegistry(indexes, model=model)
    limits, metrics = settings.limits, Metrics()
    pool = ThreadPoolExecutor(max_workers=settings.search_threads, thread_name_prefix="search")
    in_flight = asyncio.Semaphore(limits.max_in_flight)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        registry.start_watching(settings.reload_interval_s)
        try:
            yield
        finally:
            registry.stop_watching()
            pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="stair-search", version="0.1.0", lifespan=lifespan,
                  description="Sparse (STAIR word-pieces in Lucene) + dense (CLIP in FAISS) image search.")
    app.state.registry, app.state.metrics, app.state.settings = registry, metrics, settings
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    auth = [Depends(require_api_key(settings.api_key))]

    @app.exception_handler(ImageRejected)
    async def image_rejected(_: Request, exc: ImageRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def refuse_when_busy(what: str) -> None:
        """503 instead of an ever-growing queue when clients send more than the server can run."""
        if in_flight.locked():
            raise HTTPException(503, f"the server is busy ({limits.max_in_flight} {what}es in flight); retry shortly",
                                headers={"Retry-After": "1"})

    async def run_limited(function: Callable[[], Any], what: str) -> Any:
        """Run blocking work on the search pool; 504 past the timeout (the work itself finishes in the
        background and releases what it holds)."""
        async with in_flight:
            future = asyncio.get_running_loop().run_in_executor(pool, function)
            try:
                return await asyncio.wait_for(future, limits.search_timeout_s)
            except TimeoutError as exc:
                raise HTTPException(504, f"{what} took longer than {limits.search_timeout_s} s") from exc

    def checkout(name: str | None) -> IndexVersion:
        """The current version of ``name`` with one lease taken; the worker that uses it releases it."""
        try:
            with registry.lease(name) as version:
                version.acquire()
            return version
        except KeyError as exc:
            raise HTTPException(404, str(exc.args[0])) from exc

    # ------------------------------------------------------------------------------------------------ search

    @app.post("/search", response_model=SearchResult, dependencies=auth, tags=["search"],
              openapi_extra={"requestBody": _body_doc("SearchRequest")})
    async def search(request: Request) -> SearchResult:
        """Text, image or both. JSON (image as base64) or multipart/form-data (an `image` file plus the other
        fields as form fields or as one JSON `request` field)."""
        body, image_bytes = await _parse_body(request, SearchRequest, limits.max_image_bytes)
        if body.image:
            image_bytes = decode_base64(body.image, limits.max_image_bytes)
        image = open_query_image(image_bytes, limits.max_image_bytes, limits.max_image_pixels) \
            if image_bytes is not None else None
        refuse_when_busy("search")
        version = checkout(body.index)  # released by the worker, so a timed-out search still finishes cleanly
        return await run_limited(functools.partial(_search, version, body, image, metrics), "search")

    @app.post("/classify", response_model=ClassifyResult, dependencies=auth, tags=["search"],
              openapi_extra={"requestBody": _body_doc("ClassifyRequest")})
    async def classify(request: Request) -> ClassifyResult:
        """Zero-shot classification of an image over the given labels (S^3)."""
        body, image_bytes = await _parse_body(request, ClassifyRequest, limits.max_image_bytes)
        data = decode_base64(body.image, limits.max_image_bytes) if body.image else image_bytes
        image = open_query_image(data or b"", limits.max_image_bytes, limits.max_image_pixels)
        refuse_when_busy("classify")
        version = checkout(body.index)

        def run() -> ClassifyResult:
            try:
                scores = classify_image(version.router.encoder, image, body.labels)
            finally:
                version.release()
            return ClassifyResult(index=version.name, labels=[LabelScore(label=k, score=v) for k, v in scores])

        return await run_limited(run, "classify")

    # --------------------------------------------------------------------------------------------- documents

    @app.get("/documents/{doc_id:path}", response_model=Document, dependencies=auth, tags=["documents"])
    def document(doc_id: str, index: str | None = None) -> Document:
        """Stored fields of one document of the index (looked up by id only)."""
        version = checkout(index)
        try:
            row = _find(version, doc_id)
        finally:
            version.release()
        return Document(id=row["id"], index=version.name, caption=row.get("caption") or "",
                        metadata=row.get("metadata") or {}, width=row["width"], height=row["height"],
                        thumbnail=_thumbnail_url(version.name, row["id"]))

    @app.get("/thumbnails/{doc_id:path}", dependencies=auth, tags=["documents"],
             responses={200: {"content": {"image/png": {}}}})
    def thumbnail(doc_id: str, index: str | None = None,
                  size: int = Query(settings.thumbnail_size, ge=16, le=512)) -> Response:
        """A PNG thumbnail made from the image the index stored for this id; no client path is ever opened."""
        version = checkout(index)
        try:
            row = _find(version, doc_id)
            source = row["source"]
            data = _cached_thumbnail(version.name, version.number, row["id"], source, source_state(source), size,
                                     limits.max_source_pixels)
        finally:
            version.release()
        return Response(data, media_type="image/png",
                        headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})

    # ------------------------------------------------------------------------------------------- operations

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> JSONResponse:
        """Every index has an open version (a failed reload is reported, the old version still serves)."""
        versions = {name: registry.current(name) for name in registry.names}
        ready = all(not v.closed for v in versions.values())
        payload = {"ready": ready, "indexes": {n: {"version": v.number, "documents": len(v.index)}
                                               for n, v in versions.items()},
                   "reload_errors": dict(registry.errors)}
        return JSONResponse(payload, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    def metrics_endpoint() -> Response:
        """Prometheus text format."""
        for name in registry.names:
            version = registry.current(name)
            metrics.documents.labels(name).set(len(version.index))
            metrics.version.labels(name).set(version.number)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/info", response_model=ServiceInfo, dependencies=auth, tags=["operations"])
    def info() -> ServiceInfo:
        """Indexes served and the options this server supports (what the web page offers)."""
        described = []
        for name in registry.names:
            v = registry.current(name)
            m = v.index.manifest
            described.append(IndexInfo(name=name, documents=len(v.index), shards=len(m.shards), model=m.model["name"],
                                       version=v.number, opened=v.opened, created=m.created))
        return ServiceInfo(indexes=described, modes=list(MODES), rerankers=list(RERANKERS),
                           classify=True, max_image_bytes=limits.max_image_bytes,
                           auth=settings.api_key is not None)

    # -------------------------------------------------------------------------------------------- web page

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# ---------------------------------------------------------------------------------------------------- helpers


def _body_doc(name: str) -> dict:
    doc = {"required": True, "content": {k: dict(v) for k, v in _UPLOAD_BODY["content"].items()}}
    doc["content"]["application/json"] = {"schema": {"$ref": f"#/components/schemas/{name}"}}
    return doc


async def _parse_body(request: Request, model: type[T], max_image_bytes: int) -> tuple[T, bytes | None]:
    """JSON body, or multipart with an ``image`` file and the other fields -> (validated model, image bytes).

    Validation problems become 422 with pydantic's messages (malformed JSON included), never a 500. The
    offending input is not echoed back: it may be megabytes of base64, or NaN, inf or undecodable bytes that
    JSON cannot carry; the location and message name the field.
    """
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            return await _parse_multipart(request, model, max_image_bytes)
        if content_type and not content_type.startswith("application/json"):
            raise HTTPException(415, f"send application/json or multipart/form-data, not '{content_type}'")
        raw = await request.body()
        if not raw.strip():
            raise HTTPException(422, 'the request body is empty: send a JSON object, e.g. {"query": "a red circle"}')
        return model.model_validate_json(raw), None
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in errors]) from exc


async def _parse_multipart(request: Request, model: type[T], max_image_bytes: int) -> tuple[T, bytes | None]:
    import json

    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as exc:  # the multipart parser raises several types for broken bodies
        raise HTTPException(422, f"malformed multipart body: {exc}") from exc
    fields: dict[str, Any] = {}
    upload = None
    for key, value in form.multi_items():
        if isinstance(value, UploadFile):
            if key != "image":
                raise HTTPException(422, f"unexpected file field '{key}'; upload the query image as 'image'")
            upload = value
        elif key == "request":
            try:
                fields.update(json.loads(value))
            except (ValueError, TypeError) as exc:
                raise HTTPException(422, f"form field 'request' is not a JSON object: {exc}") from exc
        elif key in ("rerank", "labels"):
            fields.setdefault(key, []).extend(v for v in value.split(",") if v.strip())
        elif key == "filters":
            try:
                fields[key] = json.loads(value)
            except ValueError as exc:
                raise HTTPException(422, f"form field 'filters' is not JSON: {exc}") from exc
        else:
            fields[key] = value
    data = None
    if upload is not None:
        data = await upload.read(max_image_bytes + 1)
        if len(data) > max_image_bytes:
            raise ImageRejected(413, f"'image' is more than the limit of {max_image_bytes} bytes")
    return model.model_validate(fields, context={"uploaded_image": data is not None}), data


def _search(version: IndexVersion, body: SearchRequest, image: Any, metrics: Metrics) -> SearchResult:
    """Runs on a worker thread, holding a lease on ``version`` that it releases when done."""
    started = time.perf_counter()
    try:
        k = min(MAX_K * FILTER_OVERFETCH, body.k * FILTER_OVERFETCH) if body.filters else body.k
        options: dict[str, Any] = {"text": body.query, "image": image, "mode": body.mode, "k": k,
                                   "fusion": body.fusion, "alpha": body.alpha, "explain": body.explain}
        if body.rerank:
            options["rerank"] = list(body.rerank)
        response = version.router.search(**options)
    finally:
        version.release()
    hits = [h for h in response.hits if _matches(h.metadata or {}, body.filters)][: body.k]
    took = time.perf_counter() - started
    metrics.search_latency.labels(version.name, body.mode).observe(took)
    tokens = dict(sorted(response.query_tokens.items(), key=lambda kv: -kv[1])[:QUERY_TOKENS_SHOWN])
    return SearchResult(
        index=version.name, version=version.number, mode=response.mode, fusion=response.fusion,
        decision=getattr(response, "decision", None), took_ms=round(took * 1000, 3), query_tokens=tokens,
        hits=[Hit(rank=rank, id=h.id, score=h.score, parts=h.parts, caption=h.caption or "",
                  metadata=h.metadata or {}, thumbnail=_thumbnail_url(version.name, h.id),
                  document=_document_url(version.name, h.id),
                  matched=[MatchedToken(token=t, query=q, document=d) for t, (q, d) in (h.matched or {}).items()])
              for rank, h in enumerate(hits, start=1)])


def _matches(metadata: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    for key, wanted in filters.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if metadata.get(key) not in allowed:
            return False
    return True


def _find(version: IndexVersion, doc_id: str) -> dict:
    """Stored fields of ``doc_id`` through the index's public read API (so deleted documents stay hidden)."""
    index = version.index
    found = index.find(doc_id)
    if found is not None:
        return index.documents([found], STORED_FIELDS)[0]
    raise HTTPException(404, f"no document with id '{doc_id[:200]}' in index '{version.name}'")


@functools.lru_cache(maxsize=2048)
def _cached_thumbnail(index: str, version: int, doc_id: str, source: str, state: tuple | None, size: int,
                      max_pixels: int) -> bytes:
    """PNG thumbnail, cached per index version and per state of the source file (``state`` is only a key)."""
    try:
        return thumbnail_png(stored_image(source, max_pixels), size)
    except (FileNotFoundError, KeyError, OSError) as exc:
        raise HTTPException(404, f"no thumbnail for '{doc_id[:200]}': {exc}") from exc


def _thumbnail_url(index: str, doc_id: str) -> str:
    return f"/thumbnails/{quote(doc_id, safe='')}?index={quote(index, safe='')}"


def _document_url(index: str, doc_id: str) -> str:
    return f"/documents/{quote(doc_id, safe='')}?index={quote(index, safe='')}"
