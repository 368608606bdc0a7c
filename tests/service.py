"""Run the coordinator (or any ASGI app) under uvicorn on a free port, in a thread; and
wait for a server in another process to become ready."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import uvicorn

from quotagate.coordinator.embedded import free_port

GRACE = 5.0  # seconds a stopping server gives the requests still running


@contextmanager
def serve_in_thread(app: Any, *, port: int | None = None, **config: Any) -> Iterator[str]:
    """Serve `app` on loopback until the block ends; yields its base URL. `config` goes to
    `uvicorn.Config` (quiet by default)."""
    port = port or free_port()
    # Requests still running GRACE seconds into the shutdown are cancelled, and the app's
    # own shutdown runs after them: its store connections close before its loop does.
    options: dict[str, Any] = {
        "log_level": "warning",
        "lifespan": "on",
        "timeout_graceful_shutdown": GRACE,
        **config,
    }
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(GRACE + 10)
        # A server left running would fail some later test, far from its cause.
        assert not thread.is_alive(), f"the server on port {port} did not stop"


def wait_ready(url: str, timeout: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll `url`/readyz until it answers 200; fail if `alive()` turns false or time runs
    out (a hang detector, not a speed check)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert alive(), f"the server behind {url} exited"
        assert time.monotonic() < deadline, f"{url} did not become ready in {timeout:g} s"
        time.sleep(0.05)
