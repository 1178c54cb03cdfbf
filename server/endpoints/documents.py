r"""``GET /documents/{id}`` and ``GET /thumbnails/{id}``: stored fields and thumbnails, looked up by id only
(no client path is ever opened).

An id may hold any character an indexing source gave it, newlines included: Starlette's ``path`` convertor
(``.*``) stops at a newline, so the id segment is matched by the ``doc_id`` convertor registered here
(``[\s\S]*``; a named addition to Starlette's table of convertors, changing none of its own).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi.responses import RedirectResponse
from starlette.convertors import PathConvertor, register_url_convertor

from server.imaging import is_remote
from server.schemas import Document
from server.state import State, authorized, find_document, thumbnail_url


class DocumentIdConvertor(PathConvertor):
    """Any text, newlines included: what ``{doc_id:doc_id}`` matches."""

    regex = r"[\s\S]*"


register_url_convertor("doc_id", DocumentIdConvertor())
router = APIRouter(tags=["documents"], dependencies=[Depends(authorized)])


@router.get("/documents/{doc_id:doc_id}", response_model=Document)
def document(state: State, doc_id: str, index: str | None = None) -> Document:
    """Stored fields of one document of the index (looked up by id only)."""
    version = state.checkout(index)
    try:
        row = find_document(version, doc_id)
    finally:
        version.release()
    return Document(id=row["id"], index=version.name, caption=row.get("caption") or "",
                    metadata=row.get("metadata") or {}, source=row["source"], width=row["width"],
                    height=row["height"], thumbnail=thumbnail_url(version.name, row["id"], row["source"]))


@router.get("/thumbnails/{doc_id:doc_id}", responses={200: {"content": {"image/png": {}}},
                                                      307: {"description": "A URL-sourced document: its URL."}})
def thumbnail(state: State, doc_id: str, index: str | None = None,
              size: Annotated[int | None, Query(ge=16, le=512, description="pixels (default: the server's setting)")]
              = None) -> Response:
    """A PNG thumbnail made from the image the index stored for this id; no client path is ever opened. A
    URL-sourced document redirects to its stored URL (the server never fetches it)."""
    version = state.checkout(index)
    try:
        row = find_document(version, doc_id)
        if is_remote(row["source"]):
            return RedirectResponse(row["source"], status_code=307, headers={"Cache-Control": "max-age=300"})
        data = state.thumbnail(version, row, size or state.settings.thumbnail_size)
    finally:
        version.release()
    return Response(data, media_type="image/png",
                    headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"})
