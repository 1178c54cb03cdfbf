"""Run the app under a real uvicorn server on a loopback port, in a background thread.

Why: the browser test, the load test and the screenshot script all need the service reachable over real HTTP
(a browser cannot talk to TestClient), and they should start and stop it the same way.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def serve_in_background(app: FastAPI, port: int | None = None, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` on loopback while the block runs; yields the base URL (``http://127.0.0.1:PORT``).

    The block starts only once uvicorn accepts connections (startup, including the app's lifespan, is done),
    and the server is shut down gracefully afterwards, letting in-flight requests finish.
    """
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host=LOOPBACK, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"the server did not start on {LOOPBACK}:{port} within {start_timeout_s} s")
        time.sleep(0.02)
    try:
        yield f"http://{LOOPBACK}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
