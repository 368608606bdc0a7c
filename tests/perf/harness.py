"""What the benchmarks share: ASGI apps served by child processes on loopback, and a few
statistics.

Every child stops by itself: when its lifetime runs out, or when the process that
started it is gone, whichever comes first.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import httpx

from quotagate.coordinator.embedded import free_port

SPAWN = multiprocessing.get_context("spawn")


def watchdog(lifetime: float) -> None:
    """Exit the process once `lifetime` seconds passed or its parent went away."""
    parent = os.getppid()
    deadline = time.monotonic() + lifetime

    def watch() -> None:
        while time.monotonic() < deadline and os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, daemon=True).start()


def _serve(factory: Callable[..., Any], kwargs: dict[str, Any], port: int, lifetime: float) -> None:
    import uvicorn

    watchdog(lifetime)
    app = factory(**kwargs)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on"
    )
    uvicorn.Server(config).run()


@contextmanager
def app_process(
    factory: Callable[..., Any],
    *,
    health: str,
    lifetime: float,
    **kwargs: Any,
) -> Iterator[str]:
    """Serve `factory(**kwargs)` (a module-level function returning an ASGI app) in a
    child process on a free loopback port; yields its base URL once `health` answers."""
    port = free_port()
    process = SPAWN.Process(
        target=_serve, args=(factory, kwargs, port, lifetime), daemon=True, name=factory.__name__
    )
    process.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + health, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if not process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{factory.__name__} did not start on port {port}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        process.join(10)
        if process.is_alive():
            process.kill()
            process.join()


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100), nearest rank; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


def jain(values: Sequence[float]) -> float:
    """Jain's fairness index: 1 when all are equal, 1/n when one takes everything."""
    if not values or not any(values):
        return math.nan
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))
