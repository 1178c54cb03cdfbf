"""What each error a route raises answers, as (status, JSON body, headers): one table that the app's exception
handlers and a batch's per-request errors both read, so a search that fails alone and the same search failing
inside a batch say the same thing.

Every message passes through ``public`` (:meth:`server.state.ServiceState.public`): no index folder, bounded
length. Errors not in the table are not the client's: they stay 500s, raised as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from server.imaging import ImageRejected
from server.requests import validation_answer
from stair_search.index import DamagedIndexError, ShardUnavailable

Public = Callable[..., str]  # ServiceState.public: (message, any_path=False) -> the message a client may read


def error_answer(exc: BaseException, public: Public) -> tuple[int, dict[str, Any], dict[str, str]] | None:
    """(status, body, headers) for an error a route raised on a client's behalf, or None for one that is a bug."""
    if isinstance(exc, RequestValidationError):
        return 422, validation_answer(exc.errors()), {}
    if isinstance(exc, HTTPException):
        return exc.status_code, {"detail": public(str(exc.detail))}, dict(exc.headers or {})
    if isinstance(exc, ImageRejected):
        return exc.status, {"detail": public(str(exc))}, {}
    if isinstance(exc, DamagedIndexError):  # the index's files, not the request: that index answers 503
        return 503, {"detail": public(str(exc), any_path=True)}, {}
    if isinstance(exc, ShardUnavailable):  # a cluster shard none of whose copies answers
        return 503, {"detail": public(f"{exc}; retry later, or ask for a partial answer with \"partial\": true"),
                     "missing_shards": [exc.shard]}, {}
    return None
