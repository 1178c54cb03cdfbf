"""``POST /search`` and ``POST /classify``: the query endpoints (they run on the search pool, under its cap)."""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Depends, Request

from server.imaging import decode_base64, open_query_image
from server.metrics import Metrics
from server.registry import IndexVersion
from server.requests import body_doc, parse_body
from server.schemas import (
    MAX_K,
    ClassifyRequest,
    ClassifyResult,
    Hit,
    LabelScore,
    MatchedToken,
    SearchRequest,
    SearchResult,
)
from server.state import State, authorized, document_url, thumbnail_url
from stair_search.rerank.s3 import classify as classify_image

FILTER_OVERFETCH = 10  # a filtered search ranks this many times k candidates before filtering
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
    image = open_query_image(image_bytes, limits.max_image_bytes, limits.max_image_pixels) \
        if image_bytes is not None else None
    state.refuse_when_busy("search")
    version = state.checkout(body.index)  # released by the worker, so a timed-out search still finishes cleanly
    return await state.run_limited(functools.partial(run_search, version, body, image, state.metrics), "search")


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
        finally:
            version.release()
        return ClassifyResult(index=version.name, labels=[LabelScore(label=k, score=v) for k, v in scores])

    return await state.run_limited(run, "classify")


def run_search(version: IndexVersion, body: SearchRequest, image: Any, metrics: Metrics) -> SearchResult:
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
    hits = [h for h in response.hits if matches(h.metadata or {}, body.filters)][: body.k]
    took = time.perf_counter() - started
    metrics.search_latency.labels(version.name, body.mode).observe(took)
    tokens = dict(sorted(response.query_tokens.items(), key=lambda kv: -kv[1])[:QUERY_TOKENS_SHOWN])
    return SearchResult(
        index=version.name, version=version.number, mode=response.mode, fusion=response.fusion,
        decision=getattr(response, "decision", None), took_ms=round(took * 1000, 3), query_tokens=tokens,
        hits=[Hit(rank=rank, id=h.id, score=h.score, parts=h.parts, caption=h.caption or "",
                  metadata=h.metadata or {}, thumbnail=thumbnail_url(version.name, h.id),
                  document=document_url(version.name, h.id),
                  matched=[MatchedToken(token=t, query=q, document=d) for t, (q, d) in (h.matched or {}).items()])
              for rank, h in enumerate(hits, start=1)])



def matches(metadata: Mapping[str, Any], filters: Mapping[str, Any]) -> bool:
    for key, wanted in filters.items():
        allowed = wanted if isinstance(wanted, list) else [wanted]
        if metadata.get(key) not in allowed:
            return False
    return True
