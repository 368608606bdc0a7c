"""The Defender fake of the test suite: the APIs of `coordinator/defender.md`, throttling as
they do, on a clock that can run fast, and scriptable by a test.

    emulator = DefenderEmulator(speed=60)          # one emulated minute per real second
    with serve_in_thread(emulator.app) as url:
        httpx.get(url + "/api/incidents", headers={"Authorization": "Bearer contoso-app1"})
        emulator.throttle("/api/incidents", retry_after=2)   # the next answer is a 429
        emulator.times("/api/incidents")                     # arrival times, monotonic

What it does, as the Defender APIs do (defender.md, "Counting" and "Catalog"):

- Who calls is the bearer token (the upstream's app + tenant), "anonymous" without one.
  Each caller has its own counters per endpoint: `incidents`, `advancedhunting`, ...,
  and for the other MDE endpoints one counter per method and path template (ids
  replaced), as "Destination+TenantID+AppID" says. Paths compare case-blind.
- Calls limits are exact sliding windows counted at arrival: a request passes when fewer
  than N requests of that caller and endpoint arrived in the last W.
- Every attempt counts, throttled ones included ("the calculated request rate stays
  high"): a caller who retries before the time it was given is throttled again, and
  pushes its own next chance further out. A caller who waits the given time gets in.
- Advanced hunting also has run-time budgets (10 min per hour, 4 h per day for Defender
  XDR). A query is admitted while the caller's run time in each window is below the
  budget, then its run time is charged at arrival. The run time is simulated: the
  `x-emulator-runtime` header (emulated seconds), else `execution_time` when set, else a
  random draw between `runtime_min` and `runtime_max`. The answer comes after that time
  (at once with `run_queries=False`) and carries it as `Stats.ExecutionTime`, in the
  shape of defender.md, "Advanced hunting answers".
- A throttled answer is a 429 with `Retry-After` and the bodies of defender.md,
  "Throttled answers": code `"429"` and "Maximum allowed N per hh:mm:ss for the key
  Destination+TenantID+AppID. You can send requests again in N seconds." for calls,
  code `"TooManyRequests"` and "You have exceeded processing resources allocated to this
  tenant. You can run queries again in hh:mm:ss." for run time.
- Other answers are 200 with `{"value": [...]}`, after `latency` emulated seconds.

What a test can script, on top (times in real seconds, as the answers say them):

- `throttle(path, retry_after, times=1)`: the next `times` requests of `path` (None: all,
  until `clear()`) get a calls 429, whatever the counters say; they count as attempts.
- `delay(path, seconds)`: answers to `path` come `seconds` later (a slow call).
- `hold(path)`: answers to `path` wait until the returned event is set.
- `execution_time`: the run time of every hunting query (emulated seconds).

What it saw: `arrivals(path, caller)`, `times(path, caller)` and `wait_for(count, path)`.

Time scale: limits, run times and latency are written in emulated seconds (the Defender
figures); `speed` emulated seconds pass per real second. Everything the emulator says
(`Retry-After`, the times in messages, `ExecutionTime`) is in real seconds, so a client
and a coordinator whose policies are scaled by the same factor see a consistent world.
At `speed=1` the answers are Defender's to the letter (whole seconds); faster, the
retry times are Defender's whole emulated seconds divided by `speed`, written with
millisecond precision, as Graph writes `Retry-After: 2.128`.

Admin routes for a benchmark in another process: `GET /_emulator/health`,
`GET /_emulator/arrivals` (every request as `[at, caller, endpoint, status, runtime]`,
times in `time.monotonic()` seconds of the emulator's host), `POST /_emulator/reset`.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
CALLS_KEY = "Destination+TenantID+AppID"


@dataclass(frozen=True, slots=True)
class Limit:
    """At most `amount` calls (or seconds of run time, `runtime=True`) in any window `per`;
    both in emulated seconds."""

    amount: float
    per: float
    runtime: bool = False


def calls(amount: int, per: float) -> Limit:
    return Limit(amount, per)


def runtime(seconds: float, per: float) -> Limit:
    return Limit(seconds, per, runtime=True)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One throttled endpoint. `name` is its counter; `per_path` counts each method and
    path template apart (the MDE default)."""

    name: str
    pattern: str  # a regex matched in full against the lower-case path
    methods: frozenset[str]
    limits: tuple[Limit, ...]
    hunting: bool = False
    per_path: bool = False
    regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "regex", re.compile(self.pattern))

    def key(self, method: str, path: str) -> str:
        return f"{method} {path_template(path)}" if self.per_path else self.name


def _endpoint(
    name: str, pattern: str, methods: Iterable[str], *limits: Limit, **extra: bool
) -> Endpoint:
    return Endpoint(name, pattern, frozenset(methods), limits, **extra)


# The figures of defender.md, "Catalog" (tests/perf/test_emulator.py checks them).
DEFENDER_ENDPOINTS: tuple[Endpoint, ...] = (
    _endpoint(
        "incidents",
        r"/api/incidents(/[^/]+)?",
        {"GET", "PATCH"},
        calls(50, MINUTE),
        calls(1500, HOUR),
    ),
    _endpoint(
        "advancedhunting",
        r"/api/advancedhunting/run",
        {"POST"},
        calls(45, MINUTE),
        runtime(10 * MINUTE, HOUR),
        runtime(4 * HOUR, DAY),
        hunting=True,
    ),
    _endpoint(
        "advancedqueries",
        r"/api/advancedqueries/run",
        {"POST"},
        calls(45, MINUTE),
        calls(1500, HOUR),
        runtime(10 * MINUTE, HOUR),
        runtime(3 * HOUR, DAY),
        hunting=True,
    ),
    _endpoint(
        "runliveresponse", r"/api/machines/[^/]+/runliveresponse", {"POST"}, calls(10, MINUTE)
    ),
    _endpoint(
        "alerts.batchupdate",
        r"/api/alerts/batchupdate",
        {"POST"},
        calls(10, MINUTE),
        calls(500, HOUR),
    ),
    _endpoint(
        "alerts.createalertbyreference",
        r"/api/alerts/createalertbyreference",
        {"POST"},
        calls(15, MINUTE),
    ),
    _endpoint("indicators.import", r"/api/indicators/import", {"POST"}, calls(30, MINUTE)),
    _endpoint(
        "indicators.batchdelete",
        r"/api/indicators/batchdelete",
        {"POST"},
        calls(30, MINUTE),
        calls(1500, HOUR),
    ),
    _endpoint(
        "getpackageuri", r"/api/.*/getpackageuri", {"GET"}, calls(2, MINUTE), calls(120, HOUR)
    ),
    _endpoint("mde", r"/api/.*", METHODS, calls(100, MINUTE), calls(1500, HOUR), per_path=True),
)

# Graph's security API (defender.md, "Catalog"), for a test that passes
# `endpoints=DEFENDER_ENDPOINTS + GRAPH_ENDPOINTS`. Paths as an SDK sends them: an empty
# segment after the version (a base URL ending in `/`), the qualified action name.
_GRAPH = r"/(?:v1\.0|beta)/+security/+"
GRAPH_ENDPOINTS: tuple[Endpoint, ...] = (
    _endpoint(
        "graph.hunting",
        _GRAPH + r"(?:microsoft\.graph\.security\.)?runhuntingquery",
        {"POST"},
        calls(45, MINUTE),
    ),
    _endpoint(
        "graph.ti-indicators", _GRAPH + r"tiindicators(?:/.*)?", METHODS, calls(1000, MINUTE)
    ),
    _endpoint("graph.security", _GRAPH + r".+", METHODS, calls(150, MINUTE)),
)

_ID = re.compile(r".*\d.*")


def path_template(path: str) -> str:
    """The path with its ids (segments with a digit) replaced by `{id}`."""
    return "/".join("{id}" if _ID.fullmatch(seg) else seg for seg in path.lower().split("/"))


def clock_text(seconds: float) -> str:
    """`hh:mm:ss`, with a fraction only when there is one (`00:00:00.617`)."""
    millis = math.ceil(round(seconds * 1000, 6))
    whole, frac = divmod(millis, 1000)
    text = f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"
    return text + (f".{frac:03d}".rstrip("0") if frac else "")


def seconds_text(seconds: float) -> str:
    """Seconds rounded up to the millisecond: `8`, `0.134`."""
    return f"{math.ceil(round(seconds * 1000, 6)) / 1000:g}"


def calls_body(limit: int, window: float, retry_after: float, target: str) -> dict[str, Any]:
    """The body of a calls 429 (`window` and `retry_after` in real seconds)."""
    message = (
        f"API calls quota exceeded! Maximum allowed {limit} per {clock_text(window)} for the "
        f"key {CALLS_KEY}. You can send requests again in {seconds_text(retry_after)} seconds."
    )
    return {"error": {"code": "429", "message": message, "target": target}}


def runtime_body(retry_after: float, target: str) -> dict[str, Any]:
    """The body of a hunting run-time 429."""
    message = (
        "You have exceeded processing resources allocated to this tenant. "
        f"You can run queries again in {clock_text(retry_after)}."
    )
    return {"error": {"code": "TooManyRequests", "message": message, "target": target}}


class _Log:
    """Charges (time, amount) in arrival order, with the sum of those still in the window."""

    __slots__ = ("amounts", "head", "times", "total", "window")

    def __init__(self, window: float) -> None:
        self.window = window  # real seconds
        self.times: list[float] = []
        self.amounts: list[float] = []
        self.head = 0
        self.total = 0.0

    def prune(self, now: float) -> None:
        """Forget charges that left the window at `now` (at or before `now - window`)."""
        horizon = now - self.window
        times, amounts, head = self.times, self.amounts, self.head
        while head < len(times) and times[head] <= horizon:
            self.total -= amounts[head]
            head += 1
        if head > 1024 and head * 2 > len(times):
            del times[:head], amounts[:head]
            head = 0
        self.head = head
        if head == len(times):
            self.total = 0.0  # no drift from float sums

    def add(self, at: float, amount: float = 1.0) -> None:
        self.times.append(at)
        self.amounts.append(amount)
        self.total += amount

    def leaves_below(self, amount: float) -> float:
        """When the sum falls below `amount`, if nothing more is charged."""
        left = self.total
        for i in range(self.head, len(self.times)):
            left -= self.amounts[i]
            if left < amount:
                return self.times[i] + self.window
        return self.times[-1] + self.window if self.times else 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    endpoint: Endpoint | None  # None: not a throttled endpoint
    key: str  # the counter: endpoint name, or method and path template
    retry_after: float = 0.0  # real seconds; 0 when admitted
    limit: Limit | None = None  # the limit that bound the retry time
    amount: float = 0.0  # that limit's amount for this caller (see Throttler.factors)

    @property
    def admitted(self) -> bool:
        return self.limit is None


@dataclass(frozen=True, slots=True)
class Arrival:
    at: float  # real seconds on the emulator's clock
    caller: str
    method: str
    path: str  # lower case
    endpoint: str  # the counter's key, "" for an unthrottled path
    status: int
    runtime: float  # real seconds of simulated run time (hunting), else 0


class Throttler:
    """The quota arithmetic, apart from HTTP: times are real seconds, passed in."""

    def __init__(self, endpoints: Iterable[Endpoint] = DEFENDER_ENDPOINTS, speed: float = 1.0):
        if speed <= 0:
            raise ValueError("speed must be positive")
        self.endpoints = tuple(endpoints)
        self.speed = speed
        self._logs: dict[tuple[str, str, int], _Log] = {}
        # Tenants whose calls limits are a share of the catalog's, as Microsoft's "the
        # number of calls varies per tenant" allows: caller -> factor.
        self.factors: dict[str, float] = {}

    def amount(self, caller: str, limit: Limit) -> float:
        """A limit's amount for `caller`: calls limits scaled by its factor (at least 1)."""
        if limit.runtime:
            return limit.amount
        return max(math.floor(limit.amount * self.factors.get(caller, 1.0)), 1)

    def real(self, emulated: float) -> float:
        return emulated / self.speed

    def endpoint(self, method: str, path: str) -> Endpoint | None:
        path = path.lower()
        for endpoint in self.endpoints:
            if method in endpoint.methods and endpoint.regex.fullmatch(path):
                return endpoint
        return None

    def admit(self, caller: str, method: str, path: str, now: float, run: float = 0.0) -> Decision:
        """Count one arrival at `now` and decide. `run` is the query's real run time,
        charged to the run-time budgets when a hunting query is admitted."""
        endpoint = self.endpoint(method, path)
        if endpoint is None:
            return Decision(None, "")
        key = endpoint.key(method, path)
        retry, bound, bound_amount = 0.0, None, 0.0
        logs: list[tuple[Limit, _Log]] = []
        for i, limit in enumerate(endpoint.limits):
            window = self.real(limit.per)
            log = self._logs.get((caller, key, i))
            if log is None:
                log = self._logs[caller, key, i] = _Log(window)
            log.prune(now)
            logs.append((limit, log))
            amount = self.amount(caller, limit)
            if limit.runtime:
                if log.total >= self.real(amount):
                    wait = log.leaves_below(self.real(amount)) - now
                    if wait > retry:
                        retry, bound, bound_amount = wait, limit, amount
            elif log.total >= amount:
                # This attempt counts too, so the retry time is when the window holds
                # fewer than `amount` with it: the (n + 1 - amount)-th oldest has left.
                index = log.head + int(log.total) - int(amount)
                nth = log.times[index + 1] if index + 1 < len(log.times) else now
                wait = nth + window - now
                if wait > retry:
                    retry, bound, bound_amount = wait, limit, amount
        admitted = bound is None
        for limit, log in logs:
            if not limit.runtime:
                log.add(now)
            elif admitted and run > 0:
                log.add(now, run)
        if admitted:
            return Decision(endpoint, key)
        # Defender answers in whole seconds of its own clock; never before the real time.
        emulated = math.ceil(round(retry * self.speed, 6))
        return Decision(endpoint, key, max(emulated, 1) / self.speed, bound, bound_amount)

    def reset(self) -> None:
        self._logs.clear()
        self.factors.clear()


@dataclass(slots=True)
class _Throttle:
    """A scripted calls 429 (real seconds, as written in the answer)."""

    retry_after: float
    times: int | None  # answers still to throttle; None: until cleared
    limit: int
    window: float


class DefenderEmulator:
    """The ASGI app (`.app`), what it saw and what a test scripted; safe to use from any
    thread.

    `clock` (real seconds) and `sleep` can be replaced to drive it in virtual time.
    """

    def __init__(
        self,
        *,
        speed: float = 1.0,
        endpoints: Iterable[Endpoint] = DEFENDER_ENDPOINTS,
        latency: float = 0.3,  # emulated seconds before a plain answer
        runtime_min: float = 1.0,  # emulated seconds, simulated hunting run time
        runtime_max: float = 20.0,
        execution_time: float | None = None,  # emulated seconds; None: a draw
        run_queries: bool = True,  # False: hunting answers come at once
        seed: int | None = 0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not 0 <= runtime_min <= runtime_max:
            raise ValueError("need 0 <= runtime_min <= runtime_max")
        self.throttler = Throttler(endpoints, speed)
        self.speed = speed
        self.latency = latency
        self.runtime_min = runtime_min
        self.runtime_max = runtime_max
        self.execution_time = execution_time
        self.run_queries = run_queries
        self.clock = clock
        self.sleep = sleep
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self._arrivals: list[Arrival] = []
        self._throttles: dict[str, _Throttle] = {}
        self._delays: dict[str, float] = {}
        self._gates: dict[str, threading.Event] = {}
        self.app = Starlette(
            routes=[
                Route("/_emulator/health", self._health, methods=["GET"]),
                Route("/_emulator/arrivals", self._list_arrivals, methods=["GET"]),
                Route("/_emulator/reset", self._reset, methods=["POST"]),
                Route("/_emulator/factor", self._factor, methods=["POST"]),
                Route("/{path:path}", self._handle, methods=METHODS),
            ]
        )

    # -- what a test scripts ------------------------------------------------------------

    def throttle(
        self,
        path: str,
        retry_after: float = 2.0,
        *,
        times: int | None = 1,
        limit: int = 50,
        window: float = 60.0,
    ) -> None:
        """Answer the next `times` requests of `path` (None: all) with a calls 429 that
        says "maximum allowed `limit` per `window`", and `retry_after`."""
        with self._lock:
            self._throttles[path.lower()] = _Throttle(retry_after, times, limit, window)

    def delay(self, path: str, seconds: float) -> None:
        """Answer requests of `path` only after `seconds` more."""
        with self._lock:
            self._delays[path.lower()] = seconds

    def hold(self, path: str) -> threading.Event:
        """Hold answers to `path` until the returned event is set."""
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
        """Every request, in arrival order; of `path` and `caller` when given."""
        wanted = None if path is None else path.lower()
        with self._lock:
            return [
                a for a in self._arrivals if wanted in (None, a.path) and caller in (None, a.caller)
            ]

    def times(self, path: str | None = None, caller: str | None = None) -> list[float]:
        """Arrival times (real seconds on the emulator's clock), in order."""
        return sorted(a.at for a in self.arrivals(path, caller))

    def wait_for(self, count: int, path: str | None = None, timeout: float = 10.0) -> None:
        """Block until `count` requests of `path` arrived (from a thread other than the
        app's)."""
        deadline = time.monotonic() + timeout
        while len(self.arrivals(path)) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{count} arrivals at {path or 'any path'} never came")
            time.sleep(0.005)

    def reset(self) -> None:
        """Forget what it saw and counted (not what a test scripted)."""
        with self._lock:
            self._arrivals.clear()
            self.throttler.reset()

    # -- the app ------------------------------------------------------------------------

    def _run_time(self, request: Request) -> float:
        """Emulated seconds the query runs."""
        asked = request.headers.get("x-emulator-runtime")
        if asked is not None:
            return max(float(asked), 0.0)
        if self.execution_time is not None:
            return self.execution_time
        return self._random.uniform(self.runtime_min, self.runtime_max)

    def _scripted_throttle(self, path: str) -> _Throttle | None:
        """The scripted 429 for this request, used up by it (under the lock)."""
        throttle = self._throttles.get(path)
        if throttle is not None and throttle.times is not None:
            throttle.times -= 1
            if throttle.times <= 0:
                del self._throttles[path]
        return throttle

    async def _handle(self, request: Request) -> JSONResponse:
        method, path = request.method, request.url.path.lower()
        caller = caller_of(request.headers.get("authorization", ""))
        with self._lock:
            now = self.clock()
            scripted = self._scripted_throttle(path)
            endpoint = self.throttler.endpoint(method, path)
            hunting = endpoint is not None and endpoint.hunting and scripted is None
            run = self._run_time(request) / self.speed if hunting else 0.0
            decision = self.throttler.admit(caller, method, path, now, run)
            admitted = decision.admitted and scripted is None
            status = 200 if admitted else 429
            self._arrivals.append(
                Arrival(now, caller, method, path, decision.key, status, run if admitted else 0.0)
            )
            delay = self._delays.get(path, 0.0)
            gate = self._gates.get(path)
        if gate is not None:
            while not gate.is_set():
                await asyncio.sleep(0.005)  # the test's thread sets it, in real time
        if delay:
            await self.sleep(delay)
        target = str(uuid.uuid4())
        if scripted is not None:
            body = calls_body(scripted.limit, scripted.window, scripted.retry_after, target)
            return _throttled(body, scripted.retry_after)
        if not admitted:
            return self._throttled(decision, target)
        if hunting:
            if self.run_queries:
                await self.sleep(run)
            return JSONResponse(hunting_answer(run))
        await self.sleep(self.latency / self.speed)
        return JSONResponse({"@odata.context": f"{path}/$metadata", "value": []})

    def _throttled(self, decision: Decision, target: str) -> JSONResponse:
        limit = decision.limit
        assert limit is not None
        retry = decision.retry_after
        if limit.runtime:
            body = runtime_body(retry, target)
        else:
            body = calls_body(int(decision.amount), limit.per / self.speed, retry, target)
        return _throttled(body, retry)

    async def _health(self, request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "speed": self.speed})

    async def _list_arrivals(self, request: Request) -> JSONResponse:
        rows = [[a.at, a.caller, a.endpoint, a.status, a.runtime] for a in self.arrivals()]
        return JSONResponse({"arrivals": rows})

    async def _reset(self, request: Request) -> JSONResponse:
        self.reset()
        return JSONResponse({"reset": True})

    async def _factor(self, request: Request) -> JSONResponse:
        """`{"caller": ..., "factor": f}`: that tenant's calls limits are f of the catalog's."""
        body = await request.json()
        with self._lock:
            self.throttler.factors[str(body["caller"])] = float(body["factor"])
        return JSONResponse({"factor": body["factor"]})


def caller_of(authorization: str) -> str:
    """Who calls: the bearer token (the upstream's app + tenant), or "anonymous"."""
    return authorization.removeprefix("Bearer ").strip() or "anonymous"


def _throttled(body: dict[str, Any], retry_after: float) -> JSONResponse:
    return JSONResponse(body, 429, headers={"Retry-After": seconds_text(retry_after)})


def hunting_answer(run: float) -> dict[str, Any]:
    """An advanced hunting answer whose query ran `run` seconds."""
    return {
        "Schema": [
            {"Name": "Timestamp", "Type": "DateTime"},
            {"Name": "DeviceName", "Type": "String"},
        ],
        "Results": [{"Timestamp": "2024-01-01T00:00:00Z", "DeviceName": "emulated"}],
        "Stats": {
            "ExecutionTime": round(run, 6),
            "resource_usage": {
                "cpu": {
                    "user": clock_text(run),
                    "kernel": "00:00:00",
                    "total cpu": clock_text(run),
                },
                "memory": {"peak_per_node": 236822432},
            },
            "dataset_statistics": [{"table_row_count": 1, "table_size": 102}],
        },
    }
