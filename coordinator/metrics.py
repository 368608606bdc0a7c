"""Prometheus metrics (the names are a contract, see the design's "Metrics").

    quotagate_decisions_total{api, tenant, result="granted"|"denied", reason}
    quotagate_releases_total{api, tenant, outcome}
    quotagate_wait_seconds{api}                 histogram of the time an acquire was held
    quotagate_cooldowns_total{api, tenant}      throttled releases: a fleet pause began or grew
    quotagate_cooldowns_active                  (tenant, api) pausing now, fleet-wide
    quotagate_learned_limits{api, tenant, kind, window}   a learned limit's amount; 0: none
    quotagate_store_errors_total{kind}          store calls that failed, by cause
    quotagate_store_latency_seconds             histogram of one store call

`reason` of a grant is `granted`; of a denial `quota_exhausted`, `cooling_down`, or
`client_closed` (the client left while waiting). With `metrics_tenant_label` off every
tenant is `all`; with it on, the first `metrics_max_tenants` tenants a worker sees are
named and the rest are `other`.

With several worker processes (`quotagate serve --workers N`) the parent sets
`PROMETHEUS_MULTIPROC_DIR` before the workers start: each writes its values there and
`/metrics`, whichever worker answers, adds them up (prometheus-client's multiprocess
mode). `quotagate_cooldowns_active` is read from the fleet index in the store when
scraped, so it is the fleet's count whoever reported the pause.

The label children are cached: a decision costs a dictionary look-up and an increment.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from .engine import Engine, Released
from .errors import BackendUnavailable
from .leases import LeaseRef
from .logs import event
from .policy import Kind, Policy

T = TypeVar("T")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
OTHER = "other"
ALL = "all"

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

# Our own registry, not the library's default one: nothing else a process imports adds
# its metrics to ours.
REGISTRY = CollectorRegistry(auto_describe=True)
DECISIONS = Counter(
    "quotagate_decisions",
    "Acquire decisions",
    ("api", "tenant", "result", "reason"),
    registry=REGISTRY,
)
RELEASES = Counter(
    "quotagate_releases",
    "Lease releases by outcome",
    ("api", "tenant", "outcome"),
    registry=REGISTRY,
)
WAIT = Histogram(
    "quotagate_wait_seconds",
    "Seconds an acquire was held",
    ("api",),
    buckets=WAIT_BUCKETS,
    registry=REGISTRY,
)
COOLDOWNS = Counter(
    "quotagate_cooldowns",
    "Throttled releases: a fleet pause began or grew",
    ("api", "tenant"),
    registry=REGISTRY,
)
LEARNED = Gauge(
    "quotagate_learned_limits",
    "Amount of a limit learned from the upstream; 0 when none is in force",
    ("api", "tenant", "kind", "window"),
    multiprocess_mode="mostrecent",
    registry=REGISTRY,
)
STORE_ERRORS = Counter(
    "quotagate_store_errors", "Store calls that failed, by cause", ("kind",), registry=REGISTRY
)
STORE_LATENCY = Histogram(
    "quotagate_store_latency_seconds",
    "Seconds of one store call",
    buckets=STORE_BUCKETS,
    registry=REGISTRY,
)


class Tenants:
    """The tenant label: the tenant, `other` beyond the cap, or `all` when turned off."""

    def __init__(self, enabled: bool, cap: int) -> None:
        self.enabled = enabled
        self.cap = cap
        self._named: set[str] = set()

    def __call__(self, tenant: str) -> str:
        if not self.enabled:
            return ALL
        if tenant in self._named:
            return tenant
        if len(self._named) < self.cap:
            self._named.add(tenant)
            return tenant
        return OTHER

    def forget(self) -> None:
        self._named.clear()


class Meter:
    """The hooks the HTTP layer calls where decisions happen; one per app."""

    def __init__(self, tenants: Tenants) -> None:
        self.tenants = tenants
        self._decisions: dict[tuple[str, str, str], Counter] = {}
        self._releases: dict[tuple[str, str, str], Counter] = {}
        self._cooldowns: dict[tuple[str, str], Counter] = {}
        self._waits: dict[str, Histogram] = {}

    def decision(self, api: str, tenant: str, reason: str, waited: float) -> None:
        """One acquire answered: `reason` is `granted` or why it was denied."""
        key = (api, tenant, reason)
        child = self._decisions.get(key)
        if child is None:
            result = "granted" if reason == "granted" else "denied"
            child = self._decisions[key] = DECISIONS.labels(
                api, self.tenants(tenant), result, reason
            )
        child.inc()
        wait = self._waits.get(api)
        if wait is None:
            wait = self._waits[api] = WAIT.labels(api)
        wait.observe(waited)

    def released(self, api: str, tenant: str, outcome: str) -> None:
        key = (api, tenant, outcome)
        child = self._releases.get(key)
        if child is None:
            child = self._releases[key] = RELEASES.labels(api, self.tenants(tenant), outcome)
        child.inc()
        if outcome == "throttled":
            pair = (api, tenant)
            cooldown = self._cooldowns.get(pair)
            if cooldown is None:
                cooldown = self._cooldowns[pair] = COOLDOWNS.labels(api, self.tenants(tenant))
            cooldown.inc()


class Unmetered(Meter):
    """The hooks when metrics are off (`metrics: false`): nothing is counted."""

    def decision(self, api: str, tenant: str, reason: str, waited: float) -> None:
        pass

    def released(self, api: str, tenant: str, outcome: str) -> None:
        pass


_TENANTS = Tenants(True, 100)


def learned_limit_changed(
    tenant: str,
    api: str,
    kind: str,
    window: float,
    amount: float | None,
    configured: float | None = None,
) -> None:
    """A learned limit was set (`amount`), or forgotten (None): the gauge. `window` in
    seconds. (The engine writes the log line.)"""
    LEARNED.labels(api, _TENANTS(tenant), kind, f"{window:g}").set(amount or 0)


def _error_kind(exc: BaseException) -> str:
    cause = exc.__cause__ or exc
    if isinstance(cause, TimeoutError) or "Timeout" in type(cause).__name__:
        return "timeout"
    name = type(cause).__name__
    for kind, marker in (
        ("connection", "Connection"),
        ("loading", "Loading"),
        ("readonly", "ReadOnly"),
        ("cluster", "Cluster"),
        ("noscript", "NoScript"),
        ("tryagain", "TryAgain"),
    ):
        if marker in name:
            return kind
    if isinstance(cause, OSError):
        return "connection"
    text = str(cause)
    for prefix in ("MASTERDOWN", "LOADING", "READONLY"):
        if text.startswith(prefix):
            return prefix.lower()
    return "other" if isinstance(cause, RedisError | BackendUnavailable) else "unknown"


class MeteredEngine(Engine):
    """The engine with each store call timed and counted, and one log line when the
    store is lost (the first failed call) and when it recovers (the first call that
    answers after that)."""

    _lost_at: float | None = None

    async def _call(self, awaitable: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            result = await super()._call(awaitable)
        except BackendUnavailable as exc:
            kind = _error_kind(exc)
            STORE_ERRORS.labels(kind).inc()
            if self._lost_at is None:
                self._lost_at = time.monotonic()
                event(
                    logging.ERROR, "store_lost", f"the quota store is unavailable: {exc}", kind=kind
                )
            raise
        STORE_LATENCY.observe(time.perf_counter() - started)
        if self._lost_at is not None:
            down = round(time.monotonic() - self._lost_at, 3)
            self._lost_at = None
            event(
                logging.WARNING, "store_recovered", "the quota store answers again", down_for=down
            )
        return result

    async def check_store(self) -> None:
        before = self.recovery
        await super().check_store()
        if self.recovery and self.recovery != before:
            message = "the quota store changed (failover or restart): recovery limits on"
            event(logging.ERROR, "store_state_lost", message, since=self.recovery)

    def _released(
        self, ref: LeaseRef, policy: Policy, named: tuple[int, int] | None, raw: Any
    ) -> Released:
        released = super()._released(ref, policy, named, raw)
        learned = released.learned
        if learned is not None and learned.code == "LOWERED":
            limit = policy.limits[learned.index - 1]
            learned_limit_changed(
                ref.tenant, ref.api, limit.kind.value, limit.window_ms / 1000, learned.amount
            )
        return released

    async def forget(self, tenant: str, api: str, *, now: int | None = None) -> int:
        forgotten = await super().forget(tenant, api, now=now)
        for limit in self.policy(tenant, api).limits:
            if limit.kind is Kind.CALLS:
                learned_limit_changed(tenant, api, "calls", limit.window_ms / 1000, None)
        return forgotten


class _Snapshot(Collector):
    """Gauges read from the store when scraped, handed over as plain values."""

    def __init__(self, cooldowns_active: int | None) -> None:
        self.cooldowns_active = cooldowns_active

    def collect(self) -> Iterable[GaugeMetricFamily]:
        if self.cooldowns_active is not None:
            yield GaugeMetricFamily(
                "quotagate_cooldowns_active",
                "(tenant, api) pausing after an upstream 429 now, fleet-wide",
                value=self.cooldowns_active,
            )


def configure(enabled: bool, cap: int) -> Meter:
    """The meter for an app with these tenant label settings (process-wide)."""
    _TENANTS.enabled = enabled
    _TENANTS.cap = cap
    _TENANTS.forget()
    return Meter(_TENANTS)


def exposition(cooldowns_active: int | None) -> tuple[bytes, str]:
    """The text of `/metrics` and its content type: this process's metrics, or every
    worker's in multiprocess mode, and the gauges read from the store."""
    if os.environ.get(MULTIPROC_ENV):
        workers = CollectorRegistry()
        multiprocess.MultiProcessCollector(workers)  # type: ignore[no-untyped-call]
        text = generate_latest(workers)
    else:
        text = generate_latest(REGISTRY)
    store = CollectorRegistry()
    store.register(_Snapshot(cooldowns_active))
    return text + generate_latest(store), CONTENT_TYPE_LATEST


def process_exited(pid: int) -> None:
    """Drop a finished worker's live gauges (multiprocess mode only)."""
    if os.environ.get(MULTIPROC_ENV):
        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


__all__ = [
    "Meter",
    "MeteredEngine",
    "Tenants",
    "Unmetered",
    "configure",
    "exposition",
    "learned_limit_changed",
    "process_exited",
]
