"""``POST /search`` and ``POST /classify``: the query endpoints (they run on the search pool, under its cap)."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError

from server.errors import error_answer
from server.imaging import decode_base64, fetch_image_url, open_query_image
from server.metrics import Metrics
from server.registry import IndexVersion
from server.requests import as_request_error, body_doc, parse_body
from server.schemas import (
    BatchError,
    BatchRequests,
    BatchSearchResult,
    ClassifyRequest,
    ClassifyResult,
    Hit,
    LabelScore,
    MatchedToken,
    SearchRequest,
    SearchResult,
)
from server.state import ServiceState, State, authorized, document_url, no_document, thumbnail_url
from stair_search.index import DamagedIndexError
from stair_search.query.filters import FilterError
from stair_search.query.wordnet import WordNetMissing
from stair_search.query.words import is_content_piece
from stair_search.rerank.s3 import classify as classify_image

QUERY_TOKENS_SHOWN = 32

router = APIRouter(tags=["search"], dependencies=[Depends(authorized)])


@router.post("/search", response_model=SearchResult, openapi_extra={"requestBody": body_doc("SearchRequest")})
async def search(state: State, request: Request) -> SearchResult:
    """Text, image or both. JSON (image as base64) or multipart/form-data (an `image` file plus the other
    fields as form fields or as one JSON `request` field)."""
    limits = state.limits
    body, image_bytes = await parse_body(request, SearchRequest, limits.max_image_bytes)
    if body.image:
        image_bytes = decode_base64(body.image, limits.max_image_bytes)
    elif body.image_url is not None:
        settings = state.settings
        image_bytes = await asyncio.to_thread(fetch_image_url, body.image_url, settings.image_url_hosts,
                                              limits.max_image_bytes, settings.image_url_timeout_s)
    image = open_query_image(image_bytes, limits.max_image_bytes, limits.max_image_pixels) \
        if image_bytes is not None else None
    state.refuse_when_busy("search")
    version = state.checkout(body.index)  # released by the worker, so a timed-out search still finishes cleanly
    return await state.run_limited(functools.partial(run_search, version, body, image, state.metrics), "search")


@router.post("/search/batch", response_model=BatchSearchResult,
             openapi_extra={"requestBody": body_doc("BatchSearchRequest", multipart=False)})
async def search_batch(state: State, request: Request) -> BatchSearchResult:
    """Up to 32 searches (each a /search JSON body) in one request, answered in order, on one worker. A search
    that fails (a field the schema refuses, an unknown index or filter field, a bad image) gets its own error in
    its place, with the status and detail it would have had alone; the others get their hits."""
    body, _ = await parse_body(request, BatchRequests, state.limits.max_image_bytes, multipart=False)
    prepared = [_prepared(state, raw) for raw in body.requests]
    state.refuse_when_busy("search")
    leased: list[Leased | BatchError] = []
    try:
        for item in prepared:
            leased.append(item if isinstance(item, BatchError) else _leased(state, *item))
    except BaseException:
        _release(leased)
        raise

    def run() -> BatchSearchResult:
        results: list[SearchResult | BatchError] = []
        try:
            while leased:
                item = leased.pop(0)
                if isinstance(item, BatchError):
                    results.append(item)
                    continue
                try:
                    results.append(run_search(*item, state.metrics))  # releases its version
                except Exception as exc:  # batch_error re-raises what is not the client's
                    results.append(batch_error(exc, state))
        finally:
            _release(leased)  # a search failing with a bug: the leases of those after it
        return BatchSearchResult(results=results)

    return await state.run_limited(run, "search")


Leased = tuple[IndexVersion, SearchRequest, Any]  # a batch's search, ready: its index version, body and image


def _prepared(state: ServiceState, raw: Any) -> tuple[SearchRequest, Any] | BatchError:
    """One raw search of a batch -> its validated body and decoded image, or its error."""
    limits = state.limits
    try:
        try:
            search = SearchRequest.model_validate_json(json.dumps(raw))  # JSON mode, as /search validates
        except ValidationError as exc:
            raise as_request_error(exc) from None
        if search.image_url is not None:
            raise HTTPException(422, "a batch takes images as base64 'image' only; send image_url queries to /search")
        image = open_query_image(decode_base64(search.image, limits.max_image_bytes), limits.max_image_bytes,
                                 limits.max_image_pixels) if search.image else None
    except Exception as exc:  # batch_error re-raises what is not the client's
        return batch_error(exc, state)
    return search, image


def _leased(state: ServiceState, search: SearchRequest, image: Any) -> Leased | BatchError:
    try:
        return state.checkout(search.index), search, image
    except HTTPException as exc:  # no such index, or not loaded
        return batch_error(exc, state)


def _release(items: list[Leased | BatchError]) -> None:
    for item in items:
        if not isinstance(item, BatchError):
            item[0].release()


def batch_error(exc: Exception, state: ServiceState) -> BatchError:
    """A batch's failed search as its place in the answer (server/errors.py); an error that is a bug re-raised."""
    known = error_answer(exc, state.public)
    if known is None:
        raise exc
    status, body, _ = known
    return BatchError(status=status, **body)


@router.post("/classify", response_model=ClassifyResult, openapi_extra={"requestBody": body_doc("ClassifyRequest")})
async def classify(state: State, request: Request) -> ClassifyResult:
    """Zero-shot classification of an image over the given labels (S^3)."""
    limits = state.limits
    body, image_bytes = await parse_body(request, ClassifyRequest, limits.max_image_bytes)
    data = decode_base64(body.image, limits.max_image_bytes) if body.image else image_bytes
    image = open_query_image(data or b"", limits.max_image_bytes, limits.max_image_pixels)
    state.refuse_when_busy("classify")
    version = state.checkout(body.index)

    def run() -> ClassifyResult:
        try:
            scores = classify_image(version.router.encoder, image, body.labels)
        except WordNetMissing as exc:
            raise HTTPException(501, str(exc)) from None
        finally:
            version.release()
        return ClassifyResult(index=version.name, labels=[LabelScore(label=k, score=v) for k, v in scores])

    return await state.run_limited(run, "classify")


def run_search(version: IndexVersion, body: SearchRequest, image: Any, metrics: Metrics) -> SearchResult:
    """Runs on a worker thread, holding a lease on ``version`` that it releases when done."""
    started = time.perf_counter()
    try:
        response = version.router.search(body.to_request(image))
    except FilterError as exc:
        raise HTTPException(422, f"filters: {exc}") from None
    except WordNetMissing as exc:  # S^3 asked for on a server without WordNet files
        raise HTTPException(501, str(exc)) from None
    except KeyError:  # more like this: no such document (named here by the index's served name, not its folder)
        if body.like is None:
            raise
        raise HTTPException(404, no_document(body.like, version.name)) from None
    except DamagedIndexError:  # the index's files, not the request: 503 (server/app.py)
        raise
    except ValueError as exc:  # a vector query that does not fit the index
        raise HTTPException(422, str(exc)) from None
    finally:
        version.release()
    hits = response.hits
    took = time.perf_counter() - started
    metrics.search_latency.labels(version.name, body.mode).observe(took)
    tokens = dict(sorted(response.query_tokens.items(), key=lambda kv: -kv[1])[:QUERY_TOKENS_SHOWN])
    return SearchResult(
        index=version.name, version=version.number, mode=response.mode, fusion=response.fusion,
        decision=getattr(response, "decision", None), took_ms=round(took * 1000, 3), query_tokens=tokens,
        hits=[Hit(rank=h.rank, id=h.id, score=h.score, parts=h.parts, caption=h.caption or "",
                  metadata=h.metadata or {}, source=h.source, thumbnail=thumbnail_url(version.name, h.id, h.source),
                  document=document_url(version.name, h.id),
                  matched=[MatchedToken(token=t, query=q, document=d, word=is_content_piece(t),
                                        of=h.matched_words.get(t)) for t, (q, d) in (h.matched or {}).items()],
                  text_matched=h.text_matched or {})
              for h in hits],
        missing_shards=response.missing_shards)

