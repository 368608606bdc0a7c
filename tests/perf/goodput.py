"""Goodput: a fleet of workers against the Defender emulator, in several configurations
measured in the same run.

    python -m tests.perf.goodput [--workers 64] [--processes 4] [--seconds 30] [--speed 10]

N workers in M processes share one app + tenant, so the emulator counts them against one
budget per endpoint. Each worker has one job, as a connector does: list incidents, list
machines, or run advanced hunting queries (random run times), one call after another
for a fixed time. The same fleet runs four times, each on a fresh tenant:

- `none`: no coordination; a throttled worker waits the `Retry-After` it was given.
- `local`: each worker has its own token buckets at limit / N, started at that share;
  run time is paid after each query (a query starts while the bucket is not in debt);
  waits `Retry-After` too.
- `limits`: a shared moving window in Redis from the `limits` library, one `hit` per
  window (minute, hour, run time per hour and per day), waiting for the window to reset
  when one says no; run time reserves the estimate (a moving window cannot give back).
- `quotagate`: the httpx transport, leasing from a real coordinator process on the same
  Redis, with the policies scaled like the emulator, at the default margin.
- `late`: the same, with late senders: `late_share` of the calls leave `late_hold`
  real seconds after their lease was granted (a GC pause, a CPU-throttled pod, a cold
  TLS handshake), far beyond any margin.
- `learned`: the same, on a tenant whose calls limits the emulator holds at
  `learned_factor` of the catalog's; the coordinator learns them from the first 429s.
  The calls limits of `learned_probed` (incidents, machines: the apis whose answers are
  quick, as the README recommends) probe above `learned_assured` (0.5) of their amount:
  one call at a time, alone in flight, so the upstream can refuse at most one per limit.
  Hunting's is trusted whole and learned from its first 429.
- `gateway`: plain httpx workers with no quotagate code, sending to the same coordinator's
  gateway (`/gateway/api.security.microsoft.com/...`, which `gateway_upstreams` sends on
  to the emulator) with `X-Quotagate-Tenant` and `X-Quotagate-Wait` headers; a 429 they
  get is waited out like the upstream's.
- `replicas`: as `quotagate`, through three coordinator processes on the same Redis,
  with the workers spread unevenly over them (`replica_spread`, 48/8/8 of 64, each
  job's workers alike), in the same fleet processes as `quotagate`: the one line per
  (tenant, api, key) in the store serves them in turn, whichever replica.

Per configuration it reports upstream 429s, calls completed, the utilisation of each
job's binding limit, the wait before a call (p50, p99: from the moment a worker wants
the call to the moment the request that succeeded left, limiter waits and 429 back-offs
included, over the calls that succeeded) and Jain's fairness index between the workers
of one job. It writes `goodput.md` (the table), `goodput.json` and
`goodput.png` (calls per second over time) to `--out`.

Utilisation: at each of 2,000 instants of the run, how full the fullest window of the
job's endpoint is (accepted calls, or seconds of run time, over the limit), averaged
from the moment the last worker started (workers start spread over a quarter of an
emulated minute) to the end. An ideal client keeps it at 100 %; conservative buckets
keep it at about W / (W + margin + granularity). Fairness: Jain's index over the calls
each worker completed after the first emulated minute.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import httpx

from quotagate.client import (
    DEFENDER_ROUTES,
    AsyncQuotaClient,
    AsyncQuotaTransport,
    QuotaError,
    QuotaExhausted,
    RouteTable,
)
from quotagate.coordinator.embedded import EmbeddedServer

from ..emulator import (
    DEFENDER_ENDPOINTS,
    MINUTE,
    DefenderEmulator,
    Endpoint,
    Limit,
    Throttler,
)
from .harness import SPAWN, app_process, jain, percentile, watchdog

CONFIGS = ("none", "local", "limits", "quotagate", "late", "learned", "replicas", "gateway")
LEASED = ("quotagate", "late", "learned", "replicas")  # the configurations that lease
COORDINATED = (*LEASED, "gateway")  # the configurations that need a coordinator
GATEWAY_HOST = "api.security.microsoft.com"
REPLICAS = 3  # coordinator processes of `replicas`
DEFAULT_OUT = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Job:
    method: str
    path: str
    api: str  # the quotagate api the route table maps it to
    json: dict[str, Any] | None = None


JOBS = {
    "incidents": Job("GET", "/api/incidents", "m365d.incidents"),
    "machines": Job("GET", "/api/machines", "mde.api"),
    "hunting": Job(
        "POST",
        "/api/advancedhunting/run",
        "m365d.advanced-hunting",
        {"Query": "DeviceProcessEvents | where Timestamp > ago(1h) | take 100"},
    ),
}
_THROTTLER = Throttler(DEFENDER_ENDPOINTS)


def endpoint_of(role: str) -> Endpoint:
    job = JOBS[role]
    found = _THROTTLER.endpoint(job.method, job.path)
    assert found is not None
    return found


def counter_of(role: str) -> str:
    """The emulator's counter (endpoint key) of a job."""
    job = JOBS[role]
    return endpoint_of(role).key(job.method, job.path)


@dataclass(frozen=True)
class Options:
    workers: int = 64
    processes: int = 4
    seconds: float = 30.0  # real seconds per configuration
    speed: float = 10.0  # emulated seconds per real second: a minute is 6 s
    margin_ms: int | None = None  # quotagate: per limit; None: the default (clock rate)
    granularity_ms: int = 10  # quotagate: bucket size of windows up to 10 s
    mix: tuple[tuple[str, int], ...] = (("incidents", 2), ("machines", 1), ("hunting", 1))
    runtime_min: float = 1.0  # emulated seconds of a hunting query
    runtime_max: float = 20.0
    latency: float = 0.3  # emulated seconds of a plain call
    stagger: float = 0.25  # workers start spread over this share of an emulated minute
    late_share: float = 0.05  # `late`: the share of sends held ...
    late_hold: tuple[float, float] = (1.0, 2.0)  # ... this many real seconds
    learned_factor: float = 0.7  # `learned`: the tenant's calls limits, of the catalog's
    learned_assured: float | None = 0.5  # `learned`: its policies' `assured`; None: unset
    learned_probed: tuple[str, ...] = ("incidents", "machines")  # the roles given `assured`
    replica_spread: tuple[float, ...] = (0.75, 0.125, 0.125)  # `replicas`: workers' shares
    configs: tuple[str, ...] = CONFIGS
    seed: int = 1
    out: Path = DEFAULT_OUT
    raw: bool = False  # also write every arrival the emulator saw

    def real(self, emulated: float) -> float:
        return emulated / self.speed

    def roles(self) -> list[str]:
        """The job of each worker: the mix, interleaved so each process gets its share."""
        pattern = [role for role, weight in self.mix for _ in range(weight)]
        return [pattern[i % len(pattern)] for i in range(self.workers)]


# -- the fleet (runs in child processes) ---------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What one fleet process runs."""

    config: str
    tenant: str
    emulator_url: str
    coordinator_url: str | None
    redis_url: str | None
    roles: tuple[str, ...]  # of this process's workers
    options: Options
    process: int = 0
    worker_urls: tuple[str, ...] = ()  # `replicas`: each worker's coordinator


@dataclass
class WorkerStats:
    role: str
    completed: int = 0  # 2xx answers to calls sent before the end
    throttled: int = 0  # 429 answers
    errors: int = 0  # coordinator or transport errors
    waits: list[float] = field(default_factory=list)  # seconds from due to sent, per call
    unfinished: int = 0  # calls still waiting at the end
    settled: int = 0  # completed calls sent after the first emulated minute (fairness)


class Stamped(httpx.AsyncBaseTransport):
    """The inner transport: notes when a request leaves for the upstream."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.sent = 0.0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent = time.monotonic()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Late(httpx.AsyncBaseTransport):
    """Between the lease and the upstream: holds a share of the sends for a while."""

    def __init__(self, inner: httpx.AsyncBaseTransport, options: Options, seed: str) -> None:
        self.inner = inner
        self.share = options.late_share
        self.hold = options.late_hold
        self.random = random.Random(seed)
        self.held = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self.random.random() < self.share:
            self.held += 1
            await asyncio.sleep(self.random.uniform(*self.hold))
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Gate(Protocol):
    async def before(self, role: str, deadline: float) -> bool:
        """Wait until the call may go; False if the deadline came first."""

    def after(self, role: str, ran: float | None) -> None:
        """The call ended; `ran` is its run time (hunting), None when it did not run."""


class OpenGate:
    """`none` and `quotagate` (whose limiter sits in the transport)."""

    async def before(self, role: str, deadline: float) -> bool:
        return True

    def after(self, role: str, ran: float | None) -> None:
        pass


class TokenBucket:
    def __init__(self, rate: float, capacity: float, tokens: float) -> None:
        self.rate = rate  # units per second
        self.capacity = capacity
        self.tokens = tokens
        self.at = time.monotonic()

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
        self.at = now

    def wait_for(self, units: float, now: float) -> float:
        """Seconds until `units` are there (for 0: until the debt is paid)."""
        self.refill(now)
        if units == 0:
            return max(-self.tokens, 0.0) / self.rate
        return max(units - self.tokens, 0.0) / self.rate


class LocalGate:
    """Token buckets of one worker, each limit divided by the fleet size N. Run time is
    paid after the query (its cost is known only then): a query starts while the bucket
    is not in debt."""

    def __init__(self, options: Options, role: str) -> None:
        self.buckets: list[tuple[TokenBucket, float]] = []  # bucket, units needed to start
        self.runtime: list[TokenBucket] = []
        n = options.workers
        for limit in endpoint_of(role).limits:
            window = options.real(limit.per)
            share = (options.real(limit.amount) if limit.runtime else limit.amount) / n
            if limit.runtime:
                bucket = TokenBucket(share / window, share, share)
                self.buckets.append((bucket, 0.0))
                self.runtime.append(bucket)
            else:
                self.buckets.append((TokenBucket(share / window, max(1.0, share), share), 1.0))

    async def before(self, role: str, deadline: float) -> bool:
        while True:
            now = time.monotonic()
            wait = max(bucket.wait_for(units, now) for bucket, units in self.buckets)
            if wait <= 0:
                for bucket, units in self.buckets:
                    bucket.tokens -= units
                return True
            if now + wait >= deadline:
                await asyncio.sleep(max(deadline - now, 0))
                return False
            await asyncio.sleep(wait)

    def after(self, role: str, ran: float | None) -> None:
        for bucket in self.runtime:
            bucket.tokens -= ran or 0.0


class LimitsGate:
    """The `limits` library: a moving window per limit in Redis, one `hit` each."""

    def __init__(self, options: Options, redis_url: str, tenant: str) -> None:
        from limits import RateLimitItemPerSecond
        from limits.aio.storage import RedisStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        self.tenant = tenant
        self.storage = RedisStorage(f"async+{redis_url}", implementation="redispy")
        self.limiter = MovingWindowRateLimiter(self.storage)
        self.items: dict[str, list[tuple[Any, int]]] = {}
        for role in JOBS:
            items = []
            for limit in endpoint_of(role).limits:
                window = options.real(limit.per)
                if window != int(window) or window < 1:
                    raise ValueError(
                        f"limits counts whole seconds: a {limit.per:g} s window at speed "
                        f"{options.speed:g} is {window:g} s"
                    )
                if limit.runtime:  # in whole emulated seconds of run time
                    item = RateLimitItemPerSecond(int(limit.amount), int(window))
                    items.append((item, math.ceil(options.runtime_max)))
                else:
                    items.append((RateLimitItemPerSecond(int(limit.amount), int(window)), 1))
            self.items[role] = items

    async def warm(self, roles: Sequence[str]) -> None:
        """Open the connections and load the scripts, changing no count."""
        await asyncio.gather(
            *(
                self.limiter.test(item, self.tenant, "warm-up")
                for r in roles
                for item, _ in self.items[r]
            )
        )

    async def before(self, role: str, deadline: float) -> bool:
        key = counter_of(role)
        while True:
            for item, cost in self.items[role]:
                if not await self.limiter.hit(item, self.tenant, key, cost=cost):
                    stats = await self.limiter.get_window_stats(item, self.tenant, key)
                    wait = max(stats.reset_time - time.time(), 0.001)
                    now = time.monotonic()
                    if now + wait >= deadline:
                        await asyncio.sleep(max(deadline - now, 0))
                        return False
                    await asyncio.sleep(wait)
                    break
            else:
                return True

    def after(self, role: str, ran: float | None) -> None:
        pass


async def _worker(
    plan: Plan,
    role: str,
    http: httpx.AsyncClient,
    stamp: Stamped,
    gate: Gate,
    begin: float,
    deadline: float,
) -> WorkerStats:
    stats = WorkerStats(role)
    settle = deadline - plan.options.seconds + plan.options.real(MINUTE)
    job = JOBS[role]
    url = plan.emulator_url + job.path
    if plan.config == "gateway":
        url = f"{plan.coordinator_url}/gateway/{GATEWAY_HOST}{job.path}"
    params = {"$top": "100"} if job.method == "GET" else None
    try:
        await asyncio.sleep(max(begin - time.monotonic(), 0))
        while time.monotonic() < deadline:
            due = time.monotonic()
            while True:
                if time.monotonic() >= deadline:
                    stats.unfinished += 1
                    break
                if not await gate.before(role, deadline):
                    continue
                try:
                    response = await http.request(job.method, url, params=params, json=job.json)
                except QuotaExhausted as denied:
                    left = deadline - time.monotonic()
                    await asyncio.sleep(min(max(denied.retry_after, 0.001), max(left, 0)))
                    continue
                except (QuotaError, httpx.TransportError):
                    stats.errors += 1
                    await asyncio.sleep(0.01)
                    continue
                # Through the gateway the call leaves for the upstream once the lease came.
                sent = stamp.sent + float(response.headers.get("x-quotagate-waited", 0))
                if response.status_code == 429:
                    stats.throttled += 1
                    gate.after(role, None)
                    retry = _retry_after(response)
                    await asyncio.sleep(min(retry, max(deadline - time.monotonic(), 0)))
                    continue
                if sent >= deadline:
                    stats.unfinished += 1
                    break
                ran = None
                if role == "hunting" and response.status_code == 200:
                    ran = float(response.json()["Stats"]["ExecutionTime"])
                gate.after(role, ran)
                stats.completed += 1
                stats.settled += sent >= settle
                stats.waits.append(sent - due)
                break
    except asyncio.CancelledError:
        pass  # the run is over; what was counted stands
    return stats


def _retry_after(response: httpx.Response) -> float:
    try:
        return max(float(response.headers["Retry-After"]), 0.001)
    except (KeyError, ValueError):
        return 1.0


# The Defender routes, moved to the emulator on loopback.
ROUTES = RouteTable(
    [replace(route, hosts={"127.0.0.1"}) for route in DEFENDER_ROUTES if route.hosts],
    defaults=(),
)


async def _fleet(plan: Plan, ready: Any, go: Any, start_at: Any) -> list[WorkerStats]:
    options = plan.options
    headers = {"Authorization": f"Bearer {plan.tenant}"}
    timeout = httpx.Timeout(options.seconds + 10)
    quota = None
    quotas: dict[str, AsyncQuotaClient] = {}  # by coordinator URL
    limits_gate = None
    if plan.config in LEASED:
        assert plan.coordinator_url is not None
        for url in {plan.coordinator_url, *plan.worker_urls}:
            quotas[url] = AsyncQuotaClient(url, plan.tenant, timeout=5.0)
        quota = quotas[plan.coordinator_url]
    if plan.config == "limits":
        assert plan.redis_url is not None
        limits_gate = LimitsGate(options, plan.redis_url, plan.tenant)

    clients = []
    for number, role in enumerate(plan.roles):
        stamp = Stamped()
        transport: httpx.AsyncBaseTransport = stamp
        gate: Gate = OpenGate()
        if quota is not None:
            inner: httpx.AsyncBaseTransport = stamp
            if plan.config == "late":
                inner = Late(stamp, options, f"{options.seed}:{plan.process}:{number}")
            mine = quotas[plan.worker_urls[number]] if plan.worker_urls else quota
            transport = AsyncQuotaTransport(
                mine, ROUTES, inner=inner, wait=options.seconds + 5, unrouted="pass"
            )
        elif plan.config == "local":
            gate = LocalGate(options, role)
        elif limits_gate is not None:
            gate = limits_gate
        extra = {}
        if plan.config == "gateway":
            extra = {
                "X-Quotagate-Tenant": plan.tenant,
                "X-Quotagate-Wait": f"{options.seconds + 5}",
            }
        http = httpx.AsyncClient(transport=transport, headers={**headers, **extra}, timeout=timeout)
        clients.append((role, http, stamp, gate))

    # Open every connection before the start: a cold first call takes hundreds of ms,
    # which no one would count as the limiter's wait.
    health = plan.emulator_url + "/_emulator/health"
    await asyncio.gather(*(http.get(health) for _, http, _, _ in clients))
    for client in quotas.values():
        await asyncio.gather(*(client.usage(JOBS[role].api) for role in plan.roles))
    if limits_gate is not None:
        await limits_gate.warm(plan.roles)

    await asyncio.to_thread(ready.wait)
    await asyncio.to_thread(go.wait)
    start = start_at.value
    deadline = start + options.seconds
    await asyncio.sleep(max(start - time.monotonic(), 0))
    # Workers start spread over part of the shortest window, as a fleet does, rather
    # than in one millisecond; the same spread in every configuration.
    spread = options.stagger * options.real(MINUTE)
    rng = random.Random(f"{options.seed}:{plan.process}")
    tasks = [
        asyncio.create_task(
            _worker(plan, role, http, stamp, gate, start + rng.uniform(0, spread), deadline)
        )
        for role, http, stamp, gate in clients
    ]
    # Calls sent before the end may finish; nothing waits longer than this.
    _, pending = await asyncio.wait(tasks, timeout=deadline + 5 - time.monotonic())
    for task in pending:
        task.cancel()
    results = [await task for task in tasks]
    for _, http, _, _ in clients:
        await http.aclose()
    for client in quotas.values():
        await client.aclose()
    if limits_gate is not None:
        await limits_gate.storage.bridge.storage.aclose()
    return results


def fleet_process(plan: Plan, ready: Any, go: Any, start_at: Any, queue: Any) -> None:
    watchdog(plan.options.seconds + 120)
    stats = asyncio.run(_fleet(plan, ready, go, start_at))
    queue.put([asdict(s) for s in stats])


# -- the servers -----------------------------------------------------------------------------


def emulator_app(options: Options) -> Any:
    return DefenderEmulator(
        speed=options.speed,
        latency=options.latency,
        runtime_min=options.runtime_min,
        runtime_max=options.runtime_max,
        seed=options.seed,
    ).app


def coordinator_app(redis_url: str, policies: str, max_wait: float, upstream: str) -> Any:
    from quotagate.coordinator.app import create_app
    from quotagate.coordinator.policy import parse_policies
    from quotagate.coordinator.settings import Settings

    settings = Settings(
        redis_url=redis_url, max_wait=max_wait, gateway_upstreams={GATEWAY_HOST: upstream}
    )
    return create_app(settings, policies=parse_policies(policies, "<goodput>"))


def _ms(seconds: float) -> int:
    return math.ceil(round(seconds * 1000, 6))


def _api_lines(
    options: Options, indent: str, assured: float | None, probed: Sequence[str] = ()
) -> list[str]:
    lines = []
    for role, job in JOBS.items():
        endpoint = endpoint_of(role)
        lines.append(f"{indent}{job.api}:")
        if endpoint.hunting:
            lines.append(f"{indent}  runtime_estimate: {_ms(options.real(options.runtime_max))}ms")
            lines.append(f"{indent}  lease_ttl: {_ms(options.real(4 * 60))}ms")
        lines.append(f"{indent}  limits:")
        for limit in endpoint.limits:
            window = _ms(options.real(limit.per))
            if limit.runtime:
                spec = f"runtime: {_ms(options.real(limit.amount))}ms, per: {window}ms"
            else:
                spec = f"calls: {int(limit.amount)}, per: {window}ms"
                if assured is not None and role in probed:
                    spec += f", assured: {assured:g}"
            if window <= 10_000 and window % options.granularity_ms == 0:
                spec += f", granularity: {options.granularity_ms}ms"
            if endpoint.per_path:
                spec += ", scope: key"
            lines.append(f"{indent}    - {{{spec}}}")
    return lines


def quotagate_policies(options: Options) -> str:
    """The coordinator's policies for the jobs: the emulator's limits on its time scale;
    windows up to 10 s in buckets of `granularity_ms`, and `margin_ms` on every limit if
    set (else each window's default). The `learned` tenants' calls limits of the
    `learned_probed` jobs probe above `learned_assured` of their amount, the setting the
    README recommends for tenants whose limits vary, on apis whose answers are quick."""
    lines = [] if options.margin_ms is None else [f"margin: {options.margin_ms}ms"]
    lines.append("apis:")
    lines.extend(_api_lines(options, "  ", None))
    if options.learned_assured is not None:
        lines.append("tenants:")
        lines.append('  "bench-learned-*":')
        lines.extend(_api_lines(options, "    ", options.learned_assured, options.learned_probed))
    return "\n".join(lines) + "\n"


# -- one configuration -------------------------------------------------------------------------


def _replicas_of(roles: list[str], shares: Sequence[float]) -> list[int]:
    """Each worker's replica: the workers of each job spread over the replicas by
    `shares` (so each replica has the mix of the whole)."""
    given = {role: [0] * len(shares) for role in roles}
    replicas = []
    for role in roles:  # each worker to the replica furthest below its share of the job
        counts = given[role]
        at = min(range(len(shares)), key=lambda i: (counts[i] + 1) / shares[i])
        counts[at] += 1
        replicas.append(at)
    return replicas


def run_config(
    config: str,
    options: Options,
    emulator_url: str,
    coordinator_url: str | None,
    redis_url: str,
    replica_urls: Sequence[str] = (),
) -> dict[str, Any]:
    tenant = f"bench-{config}-{os.getpid()}"
    # A fresh tenant per configuration, rather than a flushed store: the coordinator
    # would take a flush for a lost store and grant only a share until its windows pass.
    httpx.post(emulator_url + "/_emulator/reset", timeout=10).raise_for_status()
    factor = options.learned_factor if config == "learned" else 1.0
    if config == "learned":
        lower = {"caller": tenant, "factor": factor}
        httpx.post(emulator_url + "/_emulator/factor", json=lower, timeout=10).raise_for_status()
    roles = options.roles()
    before = store_calls(redis_url)
    start_at = SPAWN.Value("d", 0.0)
    queue = SPAWN.Queue()
    processes = []
    # The fleet's processes are those of every configuration; with `replicas`, each
    # worker leases from its replica, the workers of each job spread by `replica_spread`.
    worker_urls: list[str] = []
    if config == "replicas":
        worker_urls = [replica_urls[r] for r in _replicas_of(roles, options.replica_spread)]
        coordinator_url = replica_urls[0]
    parts = [roles[p :: options.processes] for p in range(options.processes)]
    their_urls = [tuple(worker_urls[p :: options.processes]) for p in range(options.processes)]
    kept = [p for p, part in enumerate(parts) if part]  # a small fleet leaves some idle
    ready = SPAWN.Barrier(len(kept) + 1)
    go = SPAWN.Barrier(len(kept) + 1)
    for p in kept:
        plan = Plan(
            config, tenant, emulator_url, coordinator_url, redis_url, tuple(parts[p]), options,
            p, their_urls[p],
        )  # fmt: skip
        process = SPAWN.Process(
            target=fleet_process, args=(plan, ready, go, start_at, queue), daemon=True
        )
        process.start()
        processes.append(process)
    try:
        ready.wait(timeout=60)
        start_at.value = time.monotonic() + 0.3
        start = start_at.value
        go.wait(timeout=10)
        workers: list[dict[str, Any]] = []
        for _ in processes:
            workers.extend(queue.get(timeout=options.seconds + 60))
    finally:
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
    after = store_calls(redis_url)
    rows = httpx.get(emulator_url + "/_emulator/arrivals", timeout=30).json()["arrivals"]
    arrivals = [row for row in rows if row[1] == tenant]
    if options.raw:
        path = options.out / f"goodput-arrivals-{config}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"start": start, "arrivals": arrivals}))
    result = summarise(config, options, workers, arrivals, start, factor)
    result["store_calls"] = {name: after[name] - before[name] for name in after}
    return result


def store_calls(redis_url: str) -> dict[str, int]:
    """The store's count of script runs and of wake-ups published, so far."""
    import redis

    with redis.Redis.from_url(redis_url) as client:
        stats = client.info("commandstats")
    calls = {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in SCRIPTED}
    return {
        "scripts": calls["evalsha"] + calls["eval"],
        "wakeups": calls["spublish"] + calls["publish"],
    }


SCRIPTED = ("evalsha", "eval", "spublish", "publish")


# -- figures -----------------------------------------------------------------------------------


def utilisation(
    options: Options,
    role: str,
    arrivals: Sequence[Sequence[Any]],
    start: float,
    factor: float = 1.0,
) -> float:
    """The time average of how full the fullest window of the job's endpoint is, against
    the tenant's real limits (calls limits at `factor` of the catalog's)."""
    counter = counter_of(role)
    accepted = sorted((a[0], a[4]) for a in arrivals if a[2] == counter and a[3] == 200)
    times = [at for at, _ in accepted]
    sums = {False: [0.0], True: [0.0]}
    for _, ran in accepted:
        sums[False].append(sums[False][-1] + 1)
        sums[True].append(sums[True][-1] + ran)
    samples = 2000
    total = 0.0
    limits: list[Limit] = list(endpoint_of(role).limits)
    # From the moment the last worker has started (they start spread out) to the end.
    begin = start + options.stagger * options.real(MINUTE)
    span = start + options.seconds - begin
    for s in range(samples):
        t = begin + span * (s + 0.5) / samples
        fullest = 0.0
        for limit in limits:
            lo = bisect.bisect_right(times, t - options.real(limit.per))
            hi = bisect.bisect_right(times, t)
            prefix = sums[limit.runtime]
            amount = (
                options.real(limit.amount)
                if limit.runtime
                else max(math.floor(limit.amount * factor), 1)
            )
            fullest = max(fullest, (prefix[hi] - prefix[lo]) / amount)
        total += min(fullest, 1.0)
    return total / samples


def summarise(
    config: str,
    options: Options,
    workers: list[dict[str, Any]],
    arrivals: list[list[Any]],
    start: float,
    factor: float = 1.0,
) -> dict[str, Any]:
    end = start + options.seconds
    waits = [w for worker in workers for w in worker["waits"]]
    roles = sorted({w["role"] for w in workers}, key=list(JOBS).index)
    # Between workers of one job, over the calls after the first emulated minute: by then
    # every worker has started (they start spread over part of it).
    fairness = {r: jain([w["settled"] for w in workers if w["role"] == r]) for r in roles}
    return {
        "config": config,
        "throttled": sum(1 for a in arrivals if a[3] == 429),
        "throttled_by_role": {
            r: sum(1 for a in arrivals if a[3] == 429 and a[2] == counter_of(r)) for r in roles
        },
        "completed": sum(w["completed"] for w in workers),
        "completed_by_role": {
            r: sum(w["completed"] for w in workers if w["role"] == r) for r in roles
        },
        "accepted_in_run": sum(1 for a in arrivals if a[3] == 200 and start <= a[0] < end),
        "utilisation": {r: utilisation(options, r, arrivals, start, factor) for r in roles},
        "wait_p50": percentile(waits, 50),
        "wait_p99": percentile(waits, 99),
        "wait_by_role": {
            r: [
                percentile([x for w in workers if w["role"] == r for x in w["waits"]], q)
                for q in (50, 99)
            ]
            for r in roles
        },
        "unfinished": sum(w["unfinished"] for w in workers),
        "errors": sum(w["errors"] for w in workers),
        "jain": fairness,
        "per_worker": {r: [w["settled"] for w in workers if w["role"] == r] for r in roles},
        "series": _series(arrivals, start, options),
    }


def _series(arrivals: list[list[Any]], start: float, options: Options) -> dict[str, list[int]]:
    """Accepted calls per job and 429s, in bins of `BIN` seconds from the start."""
    bins = max(math.ceil(options.seconds / BIN), 1)
    series: dict[str, list[int]] = {name: [0] * bins for name in [*JOBS, "429"]}
    by_counter = {counter_of(role): role for role in JOBS}
    for at, _, counter, status, _ in arrivals:
        index = int((at - start) / BIN)
        if 0 <= index < bins:
            name = "429" if status == 429 else by_counter.get(counter)
            if name is not None:
                series[name][index] += 1
    return series


BIN = 0.25  # seconds


def table(results: list[dict[str, Any]], options: Options) -> str:
    roles = list(results[0]["utilisation"]) if results else []
    head = (
        "| configuration | upstream 429s | calls completed | utilisation "
        f"({' / '.join(roles)}) | wait p50 | wait p99 | Jain ({' / '.join(roles)}) |"
    )
    lines = [head, "|---|---:|---:|---|---:|---:|---|"]
    for r in results:
        util = " / ".join(f"{100 * r['utilisation'][role]:.1f} %" for role in roles)
        fair = " / ".join(_fairness(r["jain"][role]) for role in roles)
        lines.append(
            f"| {r['config']} | {r['throttled']:,} | {r['completed']:,} | {util} | "
            f"{1000 * r['wait_p50']:.0f} ms | {1000 * r['wait_p99']:.0f} ms | {fair} |"
        )
    leased = [r for r in results if r["config"] in COORDINATED and r.get("store_calls")]
    if leased:
        lines.append("")
        lines.append(
            "Store scripts per completed call (wake-ups published): "
            + "; ".join(
                f"{r['config']} {r['store_calls']['scripts'] / max(r['completed'], 1):.1f} "
                f"({r['store_calls']['wakeups']:,})"
                for r in leased
            )
        )
    return "\n".join(lines) + "\n"


def _fairness(index: float) -> str:
    return "n/a" if math.isnan(index) else f"{index:.2f}"


def plot(results: list[dict[str, Any]], options: Options, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(results), 1, figsize=(9, 2.2 * len(results) + 0.6), sharex=True, squeeze=False
    )
    colours = {"incidents": "tab:blue", "machines": "tab:green", "hunting": "tab:purple"}
    for ax, result in zip(axes[:, 0], results, strict=True):
        for name, counts in result["series"].items():
            xs = [BIN * (i + 0.5) for i in range(len(counts))]
            rates = [c / BIN for c in counts]
            if name == "429":
                ax.plot(xs, rates, color="tab:red", linestyle="--", linewidth=1, label="429s")
            else:
                ax.plot(xs, rates, color=colours.get(name), linewidth=1.2, label=name)
        ax.set_title(result["config"], loc="left", fontsize=10)
        ax.set_ylabel("calls / s")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper right", fontsize=8, ncol=4)
    axes[-1, 0].set_xlabel(
        f"seconds since the start (real; {options.speed:g} emulated seconds per second)"
    )
    fig.suptitle(
        f"Accepted calls per second, {options.workers} workers in {options.processes} processes",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    defaults = Options()
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--processes", type=int, default=defaults.processes)
    parser.add_argument("--seconds", type=float, default=defaults.seconds)
    parser.add_argument("--speed", type=float, default=defaults.speed)
    parser.add_argument(
        "--margin-ms", type=int, default=defaults.margin_ms, help="default: the policy default"
    )
    parser.add_argument("--late-share", type=float, default=defaults.late_share)
    parser.add_argument("--learned-factor", type=float, default=defaults.learned_factor)
    parser.add_argument(
        "--learned-assured",
        type=lambda text: None if text == "none" else float(text),
        default=defaults.learned_assured,
        help="`assured` of the learned tenant's calls limits ('none': no probing)",
    )
    parser.add_argument(
        "--learned-probed",
        default=",".join(defaults.learned_probed),
        help="the jobs whose calls limits get `learned_assured` (default: the quick ones)",
    )
    parser.add_argument("--granularity-ms", type=int, default=defaults.granularity_ms)
    parser.add_argument(
        "--mix",
        default=",".join(f"{role}={weight}" for role, weight in defaults.mix),
        help="jobs and their weights among the workers",
    )
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--stagger", type=float, default=defaults.stagger)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--out", type=Path, default=defaults.out)
    parser.add_argument("--raw", action="store_true", help="also write the arrivals")
    args = parser.parse_args(argv)
    mix = tuple((name, int(weight)) for name, weight in (p.split("=") for p in args.mix.split(",")))
    configs = tuple(args.configs.split(","))
    probed = tuple(name for name in args.learned_probed.split(",") if name)
    unknown = (
        [name for name, _ in mix if name not in JOBS]
        + [c for c in configs if c not in CONFIGS]
        + [name for name in probed if name not in JOBS]
    )
    if unknown:
        parser.error(f"unknown job or configuration: {', '.join(unknown)}")
    if args.workers < args.processes or args.processes < 1:
        parser.error("need at least one worker per process")
    return replace(
        defaults,
        workers=args.workers,
        processes=args.processes,
        seconds=args.seconds,
        speed=args.speed,
        margin_ms=args.margin_ms,
        granularity_ms=args.granularity_ms,
        late_share=args.late_share,
        learned_factor=args.learned_factor,
        learned_assured=args.learned_assured,
        learned_probed=probed,
        mix=mix,
        configs=configs,
        stagger=args.stagger,
        seed=args.seed,
        out=args.out,
        raw=args.raw,
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    options = parse_args(argv)
    random.seed(options.seed)
    load_before = os.getloadavg()[0]
    lifetime = len(options.configs) * (options.seconds + 90) + 60
    results = []
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedServer())
        emulator_url = stack.enter_context(
            app_process(
                emulator_app, health="/_emulator/health", lifetime=lifetime, options=options
            )
        )
        coordinator_url = None
        if any(config in COORDINATED for config in options.configs):
            coordinator_url = stack.enter_context(
                app_process(
                    coordinator_app,
                    health="/healthz",
                    lifetime=lifetime,
                    redis_url=server.url,
                    policies=quotagate_policies(options),
                    max_wait=options.seconds + 10,
                    upstream=emulator_url,
                )
            )
        replica_urls: list[str] = []
        if "replicas" in options.configs:
            replica_urls = [
                stack.enter_context(
                    app_process(
                        coordinator_app,
                        health="/healthz",
                        lifetime=lifetime,
                        redis_url=server.url,
                        policies=quotagate_policies(options),
                        max_wait=options.seconds + 10,
                        upstream=emulator_url,
                    )
                )
                for _ in range(REPLICAS)
            ]
        for config in options.configs:
            print(f"goodput: {config} ...", file=sys.stderr, flush=True)
            results.append(
                run_config(config, options, emulator_url, coordinator_url, server.url, replica_urls)
            )
    options.out.mkdir(parents=True, exist_ok=True)
    text = table(results, options)
    (options.out / "goodput.md").write_text(text)
    (options.out / "goodput.json").write_text(
        json.dumps(
            {
                "options": {**asdict(options), "out": _shown(options.out)},
                "load": [load_before, os.getloadavg()[0]],
                "results": results,
            },
            indent=1,
        )
    )
    plot(results, options, options.out / "goodput.png")
    print(
        f"{options.workers} workers in {options.processes} processes, {options.seconds:g} s "
        f"per configuration, speed {options.speed:g}; quotagate margin "
        f"{'default' if options.margin_ms is None else f'{options.margin_ms} ms'}, "
        f"granularity {options.granularity_ms} ms; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    print(text)
    return results


def _shown(folder: Path) -> str:
    """The output folder as the results show it: relative to the repository when inside."""
    root = Path(__file__).resolve().parents[2]
    try:
        return str(folder.resolve().relative_to(root))
    except ValueError:
        return folder.name


if __name__ == "__main__":
    main()
