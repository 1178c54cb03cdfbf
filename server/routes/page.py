"""The web page (``/`` and ``/static``): plain files, served with a content security policy."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

STATIC = Path(__file__).resolve().parents[1] / "static"

router = APIRouter(include_in_schema=False)


@router.get("/")
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={
        "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'"})
