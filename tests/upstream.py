"""A Defender-like upstream for tests: an ASGI app that records every arrival and answers
the way the Defender APIs do, including their throttling.

    upstream = Upstream()
    with serve_in_thread(upstream.app) as url:
        upstream.throttle("/api/incidents", retry_after=2)   # the next answer is a 429
        ...
        upstream.times("/api/incidents")                     # arrival times, monotonic

Who calls is the bearer token of the request (the upstream's idea of app + tenant),
"anonymous" without one. Paths compare case-blind, as upstream. Answers:

- a throttled path: 429 with `Retry-After` and the MDE body (code `"429"`, "maximum
  allowed N per hh:mm:ss", "send requests again in N seconds");
- advanced hunting (`/api/advancedhunting/run`, `/api/advancedqueries/run`): 200 with
  `Schema`, `Results` and `Stats.ExecutionTime` (seconds);
- anything else: 200 `{"value": []}`.

A path can be delayed (a slow call) or held until the test lets it go.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

HUNTING_PATHS = frozenset({"/api/advancedhunting/run", "/api/advancedqueries/run"})
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # time.monotonic() when the request reached the app
    caller: str  # the bearer token, or "anonymous"
    method: str
    path: str  # lower case


@dataclass(slots=True)
class _Throttle:
    retry_after: float  # seconds
    times: int | None  # answers still to throttle; None: until cleared
    limit: int
    window: float


def _hhmmss(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def throttled_body(path: str, retry_after: float, limit: int, window: float) -> dict[str, object]:
    """The body of an MDE / Defender XDR 429."""
    message = (
        f"API calls quota exceeded! Maximum allowed {limit} per {_hhmmss(window)} for the key "
        "Destination+TenantID+AppID. You can send requests again in "
        f"{math.ceil(retry_after)} seconds."
    )
    return {"error": {"code": "429", "message": message, "target": path}}


class Upstream:
    """The app (`.app`) and what it saw; safe to configure and read from any thread."""

    def __init__(self, *, execution_time: float = 0.5) -> None:
        self.execution_time = execution_time  # seconds, reported by hunting answers
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self._throttles: dict[str, _Throttle] = {}
        self._delays: dict[str, float] = {}
        self._gates: dict[str, threading.Event] = {}
        self.app = Starlette(routes=[Route("/{path:path}", self._handle, methods=METHODS)])

    # -- what it should do ----------------------------------------------------------------

    def throttle(
        self,
        path: str,
        retry_after: float = 2.0,
        *,
        times: int | None = 1,
        limit: int = 50,
        window: float = 60.0,
    ) -> None:
        """Answer the next `times` requests of `path` (None: all) with a 429."""
        with self._lock:
            self._throttles[path.lower()] = _Throttle(retry_after, times, limit, window)

    def delay(self, path: str, seconds: float) -> None:
        """Answer requests of `path` only after `seconds`."""
        with self._lock:
            self._delays[path.lower()] = seconds

    def hold(self, path: str) -> threading.Event:
        """Hold requests of `path` until the returned event is set."""
        gate = threading.Event()
        with self._lock:
            self._gates[path.lower()] = gate
        return gate

    def clear(self) -> None:
        """Forget throttles, delays and holds (held requests are let go)."""
        with self._lock:
            for gate in self._gates.values():
                gate.set()
            self._throttles.clear()
            self._delays.clear()
            self._gates.clear()

    # -- what it saw --------------------------------------------------------------------

    def arrivals(self, path: str | None = None, caller: str | None = None) -> list[Arrival]:
        with self._lock:
            seen = list(self._arrivals)
        return [
            a
            for a in seen
            if (path is None or a.path == path.lower()) and caller in (None, a.caller)
        ]

    def times(self, path: str | None = None, caller: str | None = None) -> list[float]:
        """Arrival times (monotonic seconds), in order."""
        return sorted(a.at for a in self.arrivals(path, caller))

    def wait_for(self, count: int, path: str | None = None, timeout: float = 10.0) -> None:
        """Block until `count` requests of `path` arrived."""
        deadline = time.monotonic() + timeout
        while len(self.arrivals(path)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} arrivals at {path or 'any path'} never came")
            time.sleep(0.005)

    # -- the app ------------------------------------------------------------------------

    async def _handle(self, request: Request) -> JSONResponse:
        at = time.monotonic()
        path = request.url.path.lower()
        auth = request.headers.get("authorization", "")
        caller = auth.removeprefix("Bearer ").strip() or "anonymous"
        with self._lock:
            self._arrivals.append(Arrival(at, caller, request.method, path))
            throttle = self._throttles.get(path)
            if throttle is not None and throttle.times is not None:
                throttle.times -= 1
                if throttle.times <= 0:
                    del self._throttles[path]
            delay = self._delays.get(path, 0.0)
            gate = self._gates.get(path)
        if gate is not None:
            while not gate.is_set():
                await asyncio.sleep(0.005)
        if delay:
            await asyncio.sleep(delay)
        if throttle is not None:
            body = throttled_body(path, throttle.retry_after, throttle.limit, throttle.window)
            headers = {"Retry-After": f"{throttle.retry_after:g}"}
            return JSONResponse(body, 429, headers=headers)
        if path in HUNTING_PATHS and request.method == "POST":
            return JSONResponse(
                {
                    "Schema": [{"Name": "Timestamp", "Type": "DateTime"}],
                    "Results": [],
                    "Stats": {
                        "ExecutionTime": self.execution_time,
                        "dataset_statistics": [{"table_row_count": 0, "table_size": 0}],
                    },
                }
            )
        return JSONResponse({"value": []})
