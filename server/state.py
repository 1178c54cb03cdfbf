"""ServiceState: what every route of one app shares, in one object (``app.state.service``), nothing process-wide.

The index registry, the settings, the metrics, the search thread pool with its in-flight cap, the thumbnail
cache (per app, keyed by index version and the source file's state, so a changed file is never served stale;
a thumbnail's ETag is made from the same state, so a browser's revalidation is answered 304 from an ``lstat``
without decoding anything),
and :meth:`ServiceState.public`, which every error answer passes through: a served index is named by its
served name, never by its folder (``/readyz`` needs no key, and a path tells a client where the files are).
Routes reach it through :func:`service`, a FastAPI dependency.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, HTTPException, Request

from server.imaging import Thumbnail, full_image, is_remote, make_thumbnail, source_state
from server.limits import clip, require_api_key
from server.metrics import Metrics
from server.registry import IndexRegistry, IndexVersion
from server.settings import ServerSettings
from stair_search.index import STORED_FIELDS

THUMBNAIL_CACHE_SIZE = 2048
THUMBNAIL_RECIPE = "lanczos/jpeg85-or-png/1"  # part of every ETag: a change of how thumbnails are made renews them
MAX_DETAIL_CHARS = 1000  # an error answer's message; every echo of client input inside it is shorter still
ID_CHARS = 100  # the most of a document id an error answer repeats
# An absolute path left in a message (one not inside a served index): shown as its last part only.
_ABSOLUTE_PATH = re.compile(r"(?<![\w>/.:~-])/(?:[^\s'\"/<>]+/)+")


@dataclass
class ServiceState:
    registry: IndexRegistry
    settings: ServerSettings
    metrics: Metrics = field(default_factory=Metrics)

    def __post_init__(self) -> None:
        self.limits = self.settings.limits
        self.pool = ThreadPoolExecutor(max_workers=self.settings.search_threads, thread_name_prefix="search")
        self.in_flight = asyncio.Semaphore(self.limits.max_in_flight)
        self.check_api_key = require_api_key(self.settings.api_key)
        self._thumbnails = functools.lru_cache(maxsize=THUMBNAIL_CACHE_SIZE)(self._make_thumbnail)
        self._index_folders = _folder_names(self.registry)

    def public(self, message: str, any_path: bool = False) -> str:
        """``message`` as a client may read it: each served index's folder (and so every file in it) replaced by
        ``<index 'NAME'>``, cut to MAX_DETAIL_CHARS. ``any_path``: every other absolute path too, shown by its
        last part (for server-side errors that clients without a key see; a client's own echoed text is left
        alone). The full text is in the server log."""
        for folder, name in self._index_folders:
            message = message.replace(folder, f"<index '{name}'>")
        return clip(_ABSOLUTE_PATH.sub("…/", message) if any_path else message, MAX_DETAIL_CHARS)

    def refuse_when_busy(self, what: str) -> None:
        """503 instead of an ever-growing queue when clients send more than the server can run."""
        if self.in_flight.locked():
            raise HTTPException(503, f"the server is busy ({self.limits.max_in_flight} {what}es in flight); retry "
                                     f"shortly", headers={"Retry-After": "1"})

    async def run_limited(self, function: Callable[[], Any], what: str) -> Any:
        """Run blocking work on the search pool; 504 past the timeout (the work itself finishes in the
        background and releases what it holds)."""
        async with self.in_flight:
            future = asyncio.get_running_loop().run_in_executor(self.pool, function)
            try:
                return await asyncio.wait_for(future, self.limits.search_timeout_s)
            except TimeoutError as exc:
                raise HTTPException(504, f"{what} took longer than {self.limits.search_timeout_s} s") from exc

    def checkout(self, name: str | None) -> IndexVersion:
        """The current version of ``name`` with one lease taken; the worker that uses it releases it."""
        try:
            with self.registry.lease(name) as version:
                version.acquire()
            return version
        except KeyError:
            raise HTTPException(404, f"no index named '{clip(name or '')}'; this server has "
                                     f"{self.registry.names}") from None

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def thumbnail(self, version: IndexVersion, row: dict, size: int) -> Thumbnail:
        source = row["source"]
        return self._thumbnails(version.name, version.number, row["id"], source, source_state(source), size)

    def full_image(self, row: dict) -> Thumbnail:
        """The document's stored image at its own size, re-encoded (not cached: one is up to the source pixel cap)."""
        return self._served(row["id"], "image", lambda: full_image(row["source"], self.limits.max_source_pixels))

    def _make_thumbnail(self, index: str, number: int, doc_id: str, source: str, state: tuple | None,
                        size: int) -> Thumbnail:
        """JPEG or PNG thumbnail (``index``, ``number`` and ``state`` are only cache keys)."""
        return self._served(doc_id, "thumbnail", lambda: make_thumbnail(source, size, self.limits.max_source_pixels))

    @staticmethod
    def _served(doc_id: str, what: str, make: Callable[[], Thumbnail]) -> Thumbnail:
        """``make()``, or a 404 naming the document and the reason (never the file's path)."""
        try:
            return make()
        except (FileNotFoundError, KeyError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)  # not the file's path
            raise HTTPException(404, f"no {what} for '{clip(doc_id, ID_CHARS)}': {reason}") from exc


def thumbnail_etag(source: str, size: int) -> str | None:
    """A strong ETag for the thumbnail of ``source`` at ``size``: a digest of the source, its file's identity and
    time, the size and the recipe (never the path itself); None when the source is no local file."""
    state = source_state(source)
    if state is None:
        return None
    digest = hashlib.sha256(repr((source, state, size, THUMBNAIL_RECIPE)).encode("utf-8", "surrogateescape"))
    return f'"{digest.hexdigest()[:32]}"'


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (or is ``*``); weak comparison, as RFC 9110 asks."""
    if not if_none_match:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
    return "*" in tags or etag in tags


def service(request: Request) -> ServiceState:
    """FastAPI dependency: the app's shared state."""
    return request.app.state.service


def authorized(request: Request) -> None:
    """FastAPI dependency: the API key check of this app's settings."""
    service(request).check_api_key(request)


def find_document(version: IndexVersion, doc_id: str) -> dict:
    """Stored fields of ``doc_id`` through the index's public read API (so deleted documents stay hidden)."""
    found = version.index.find(doc_id)
    if found is not None:
        return version.index.documents([found], STORED_FIELDS)[0]
    raise HTTPException(404, no_document(doc_id, version.name))


def no_document(doc_id: str, index: str) -> str:
    """The 404 message for an unknown id: the index by its served name."""
    return f"no document with id '{clip(doc_id, ID_CHARS)}' in index '{index}'"


def _folder_names(registry: IndexRegistry) -> list[tuple[str, str]]:
    """(folder as text, served name) of every index, absolute and resolved forms, longest first (so a folder
    inside another's is replaced before its parent)."""
    pairs = {(str(form), name) for name, folder in registry.dirs.items()
             for form in (folder.absolute(), folder.resolve()) if str(form) != "/"}
    return sorted(pairs, key=lambda pair: -len(pair[0]))


def thumbnail_url(index: str, doc_id: str, source: str) -> str:
    """Where a client gets a document's thumbnail: this server's ``/thumbnails`` for a local source; the source
    URL itself for a URL-sourced document (its browser loads it: the server never fetches stored URLs)."""
    if is_remote(source):
        return source
    return f"/thumbnails/{quote(doc_id, safe='')}?index={quote(index, safe='')}"


def document_url(index: str, doc_id: str) -> str:
    return f"/documents/{quote(doc_id, safe='')}?index={quote(index, safe='')}"


State = Annotated[ServiceState, Depends(service)]  # a route's parameter ``state: State`` receives the app's state
