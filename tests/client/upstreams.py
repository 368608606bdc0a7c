"""Helpers for tests that send to the real Microsoft host names and reach the emulator:
inner transports and adapters that move a request to the emulator's port on loopback
(the route table still sees `graph.microsoft.com`), a coordinator with a test's own
policies, and counting what the emulator saw."""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import redis
import requests
from requests.adapters import HTTPAdapter

from quotagate.coordinator.app import create_app
from quotagate.coordinator.settings import Settings

from ..service import serve_in_thread


@contextmanager
def coordinator(redis_url: str, tmp_path: Path, policies: str, **settings: Any) -> Iterator[str]:
    """A real coordinator under uvicorn with the catalog and `policies` (YAML)."""
    with redis.Redis.from_url(redis_url) as store:
        store.flushall()
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(policies)
    options: dict[str, Any] = {"max_wait": 30.0, **settings}
    app = create_app(Settings(redis_url=redis_url, policies=policy_file, **options))
    with serve_in_thread(app) as url:
        yield url


def _moved(url: httpx.URL, target: httpx.URL) -> httpx.URL:
    return url.copy_with(scheme=target.scheme, host=target.host, port=target.port)


def moved_request(request: httpx.Request, target: str) -> httpx.Request:
    """A copy of `request` addressed to `target`; the original is left as it was."""
    return httpx.Request(
        request.method,
        _moved(request.url, httpx.URL(target)),
        headers=request.headers,
        stream=request.stream,
        extensions=request.extensions,
    )


class ToEmulator(httpx.BaseTransport):
    """httpx's transport, every request moved to `target` (scheme, host and port)."""

    def __init__(self, target: str, delays: LateSends | None = None) -> None:
        self.target = target
        self.delays = delays
        self.inner = httpx.HTTPTransport()
        self.seen: list[httpx.Request] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if self.delays is not None:
            self.delays.wait()
        return self.inner.handle_request(moved_request(request, self.target))

    def close(self) -> None:
        self.inner.close()


class AsyncToEmulator(httpx.AsyncBaseTransport):
    def __init__(self, target: str) -> None:
        self.target = target
        self.inner = httpx.AsyncHTTPTransport()
        self.seen: list[httpx.Request] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        return await self.inner.handle_async_request(moved_request(request, self.target))

    async def aclose(self) -> None:
        await self.inner.aclose()


class EmulatorAdapter(HTTPAdapter):
    """requests' adapter, every request moved to `target`."""

    def __init__(self, target: str, **options: Any) -> None:
        super().__init__(**options)
        self.target = httpx.URL(target)

    def send(self, request: requests.PreparedRequest, **options: Any) -> requests.Response:  # type: ignore[override]
        moved = request.copy()
        moved.url = str(_moved(httpx.URL(request.url or ""), self.target))
        return super().send(moved, **options)


class LateSends:
    """Holds some sends back before they leave: a share `late` of them by a time drawn
    from `[low, high]` seconds (a GC pause, a throttled pod, a cold TLS handshake)."""

    def __init__(self, late: float, low: float, high: float, seed: int = 7) -> None:
        self.late, self.low, self.high = late, low, high
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.held = 0

    def wait(self) -> None:
        with self._lock:
            delay = self._random.uniform(self.low, self.high)
            late = self._random.random() < self.late
            self.held += late
        if late:
            time.sleep(delay)  # the sender's own delay, the case under test


def from_threads(
    call: Callable[[int], int], total: int, workers: int
) -> tuple[list[int], list[BaseException]]:
    """`call(n)` for each n in range(total), from `workers` threads that each take the
    next n in turn: the statuses it returned, and what any thread raised (which ends
    that thread)."""
    tickets = iter(range(total))
    lock = threading.Lock()
    statuses: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        while True:
            with lock:
                ticket = next(tickets, None)
            if ticket is None:
                return
            try:
                statuses.append(call(ticket))
            except BaseException as exc:
                errors.append(exc)
                return

    threads = [threading.Thread(target=work) for _ in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses, errors


def most_in_any_window(times: list[float], window: float) -> int:
    """The most arrivals in any half-open interval `[t, t + window)`, exactly."""
    times = sorted(times)
    most, first = 0, 0
    for last, at in enumerate(times):
        while at - times[first] >= window:
            first += 1
        most = max(most, last - first + 1)
    return most


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy that answers for the upstream itself and records the absolute URLs
    it was asked for."""

    def do_GET(self) -> None:
        self.server.seen.append(self.path)  # type: ignore[attr-defined]
        body = json.dumps({"value": [], "via": "proxy"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def forward_proxy() -> Iterator[tuple[str, list[str]]]:
    """A plain-HTTP forward proxy on loopback: its URL, and the URLs it was asked for."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    seen: list[str] = []
    server.seen = seen  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
