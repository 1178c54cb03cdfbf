"""Operations: ``/healthz`` (the process answers), ``/readyz`` (every index has an open version), ``/metrics``
(Prometheus) and ``/info`` (what this server serves and supports: what the web page offers).

``/healthz``, ``/readyz`` and ``/metrics`` need no key (probes), so they name indexes by their served names
only: a reload error is shown without the index's folder (the server log has the full text)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Response
from fastapi.responses import JSONResponse

from server.schemas import IndexInfo, ServiceInfo
from server.state import State, authorized
from stair_search.rerank import RERANKERS
from stair_search.retrieve import MODES

router = APIRouter(tags=["operations"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: State) -> JSONResponse:
    """Every index has an open version (a failed reload is reported, the old version still serves) and, on a
    cluster, every shard a ready copy (``unready_shards`` names those without one)."""
    registry = state.registry
    versions = {name: registry.current(name) for name in registry.names}
    unready = {name: missing for name, v in versions.items() if (missing := v.index.unready())}
    ready = all(not v.closed for v in versions.values()) and not unready
    errors = {name: state.public(error, any_path=True) for name, error in registry.errors.items()}
    payload = {"ready": ready, "indexes": {n: {"version": v.number, "documents": len(v.index)}
                                           for n, v in versions.items()},
               "reload_errors": errors} | ({"unready_shards": unready} if unready else {})
    return JSONResponse(payload, status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(state: State) -> Response:
    """Prometheus text format."""
    for name in state.registry.names:
        version = state.registry.current(name)
        state.metrics.documents.labels(name).set(len(version.index))
        state.metrics.version.labels(name).set(version.number)
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@router.get("/info", response_model=ServiceInfo, dependencies=[Depends(authorized)])
def info(state: State) -> ServiceInfo:
    """Indexes served and the options this server supports (what the web page offers)."""
    described = []
    for name in state.registry.names:
        v = state.registry.current(name)
        m = v.index.manifest
        described.append(IndexInfo(name=name, documents=len(v.index), shards=v.index.shard_count,
                                   model=m.model["name"], version=v.number, opened=v.opened, created=m.created,
                                   sparse=m.sparse))
    return ServiceInfo(indexes=described, modes=list(MODES), rerankers=list(RERANKERS), classify=True,
                       max_image_bytes=state.limits.max_image_bytes, auth=state.settings.api_key is not None)
