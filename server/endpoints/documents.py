r"""``GET /documents/{id}``, ``GET /thumbnails/{id}`` and ``GET /images/{id}``: stored fields, thumbnails and the
stored image at its own size (the original a detail view links to), looked up by id only (no client path is ever
opened; an image is always re-encoded from its pixels, never the file's own bytes).

An id may hold any character an indexing source gave it, newlines included: Starlette's ``path`` convertor
(``.*``) stops at a newline, so the id segment is matched by the ``doc_id`` convertor registered here
(``[\s\S]*``; a named addition to Starlette's table of convertors, changing none of its own).

A thumbnail or image carries an ``ETag`` (the source file's identity and time, the size) and ``Cache-Control``; a
request whose ``If-None-Match`` names the current ETag is answered 304 before anything is read or decoded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response
from fastapi.responses import RedirectResponse
from starlette.convertors import PathConvertor, register_url_convertor

from server.imaging import Thumbnail, is_remote
from server.registry import IndexVersion
from server.schemas import Document
from server.state import ServiceState, State, authorized, etag_matches, find_document, thumbnail_etag, thumbnail_url

THUMBNAIL_MAX_AGE_S = 300  # then the browser revalidates: a 304 from an lstat while the file is unchanged
FULL_SIZE = 0  # the ETag's size of an image served at its own size


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


@router.get("/thumbnails/{doc_id:doc_id}", responses={200: {"content": {"image/jpeg": {}, "image/png": {}}},
                                                      304: {"description": "Unchanged since its ETag."},
                                                      307: {"description": "A URL-sourced document: its URL."}})
def thumbnail(state: State, doc_id: str, index: str | None = None,
              size: Annotated[int | None, Query(ge=16, le=512, description="pixels (default: the server's setting)")]
              = None, if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """A thumbnail made from the image the index stored for this id (JPEG for photos, PNG for drawings and
    images with transparency); no client path is ever opened. A URL-sourced document redirects to its stored URL
    (the server never fetches it)."""
    size = size or state.settings.thumbnail_size
    return _image_answer(state, doc_id, index, if_none_match, size,
                         lambda version, row: state.thumbnail(version, row, size))


@router.get("/images/{doc_id:doc_id}", responses={200: {"content": {"image/jpeg": {}, "image/png": {}}},
                                                  304: {"description": "Unchanged since its ETag."},
                                                  307: {"description": "A URL-sourced document: its URL."}})
def image(state: State, doc_id: str, index: str | None = None,
          if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The image the index stored for this id at its own size (up to the server's source pixel cap), re-encoded
    as its thumbnail is (JPEG for photos, PNG otherwise); a URL-sourced document redirects to its stored URL."""
    return _image_answer(state, doc_id, index, if_none_match, FULL_SIZE, lambda _, row: state.full_image(row))


def _image_answer(state: ServiceState, doc_id: str, index: str | None, if_none_match: str | None, size: int,
                  make: Callable[[IndexVersion, dict[str, Any]], Thumbnail]) -> Response:
    """The one path of /thumbnails and /images: the document by id, a 307 to a URL source, a 304 for a matching
    ETag before anything is decoded, else ``make``'s image with the cache headers."""
    version = state.checkout(index)
    try:
        row = find_document(version, doc_id)
        if is_remote(row["source"]):
            return RedirectResponse(row["source"], status_code=307, headers={"Cache-Control": "max-age=300"})
        etag = thumbnail_etag(row["source"], size)
        headers = _thumbnail_headers(state, etag)
        if etag is not None and etag_matches(if_none_match, etag):
            return Response(status_code=304, headers=headers)
        made = make(version, row)
    finally:
        version.release()
    return Response(made.data, media_type=made.media_type, headers=headers)


def _thumbnail_headers(state: State, etag: str | None) -> dict[str, str]:
    """Cache-Control (private when an API key guards the server: a shared cache must not hand it out), ETag."""
    scope = "private, " if state.settings.api_key else ""
    headers = {"Cache-Control": f"{scope}max-age={THUMBNAIL_MAX_AGE_S}", "X-Content-Type-Options": "nosniff"}
    return headers | ({"ETag": etag} if etag else {})
