"""Request-body cap (an ASGI middleware, so nothing oversized is ever parsed), the cap on what an error answer
echoes back of a request (:func:`clip`) and the optional API key."""

from __future__ import annotations

import hmac
import json

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

API_KEY_HEADER = "X-API-Key"
ECHO_CHARS = 60  # the most of a client's value an error answer repeats


def clip(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` cut to ``limit`` characters (marked with '…'): error answers name a bad value by a short prefix,
    so a 100 KB query parameter never comes back as a 100 KB answer."""
    return text if len(text) <= limit else text[:limit] + "…"


class BodySizeLimit:
    """Answer 413 for a request body over ``max_bytes``.

    A declared Content-Length over the cap is refused before reading; a chunked body is read up to the cap
    and refused as soon as it passes it. Either way the app below never sees a partial body.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await _answer(send, 400, f"Content-Length '{clip(declared.decode('latin-1'), 20)}' is not a byte count")
            return
        if declared is not None and (len(declared) > 18 or int(declared) > self.max_bytes):  # no int() of 5,000 digits
            await self._refuse(send, clip(declared.decode("latin-1"), 20))
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(send, f"more than {size}")
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send, size: str) -> None:
        await _answer(send, 413, f"request body of {size} bytes is over the limit of {self.max_bytes} bytes; "
                                 f"send a smaller image or query")


async def _answer(send: Send, status: int, detail: str) -> None:
    """A JSON error answered by the middleware itself (the app below never runs)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect as usual

    return replay


def require_api_key(expected: str | None):  # returns a FastAPI dependency
    """Dependency: when a key is configured, the request must carry it in X-API-Key (compared in constant time)."""

    def check(request: Request) -> None:
        if expected is None:
            return
        given = request.headers.get(API_KEY_HEADER, "")
        if not hmac.compare_digest(given.encode(), expected.encode()):
            raise HTTPException(401, f"missing or wrong API key: send it in the {API_KEY_HEADER} header",
                                headers={"WWW-Authenticate": API_KEY_HEADER})

    return check
