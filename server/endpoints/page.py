"""The web page (``/`` and ``/static``): plain files, served with a content security policy.

Scripts, styles and requests stay on this server; images may also come from http(s) hosts, because a
URL-sourced collection's images are shown by the browser loading their stored URLs (the server never fetches
them, and the page sends them no API key and no referrer)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data: https: http:; "
                                   "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"})
