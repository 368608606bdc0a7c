"""The client against the real coordinator (uvicorn, Valkey) and a Defender-like upstream,
over real HTTP: leases per routed request, releases with the right outcome, a 429 that
stops the whole fleet, hunting run time, the limit under concurrency, lease renewal."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from quotagate.client import (
    DEFENDER_HOSTS,
    DEFENDER_ROUTES,
    AsyncQuotaClient,
    AsyncQuotaTransport,
    BadRequest,
    QuotaClient,
    QuotaExhausted,
    QuotaTransport,
    Route,
    RouteTable,
    UnknownApi,
    UnknownLease,
)
from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.settings import Settings

from ..emulator import DefenderEmulator as Upstream
from ..service import serve_in_thread
from .upstreams import from_threads, most_in_any_window

pytestmark = pytest.mark.server

TENANT = "contoso/app1"  # a '/' in the tenant, as in `<tenant-id>/<app-id>`
LOCAL = "127.0.0.1"  # the upstream test server's host

# The Defender routes, moved to the upstream test server, and the test policies' routes.
ROUTES = RouteTable(
    [
        Route("fast", "/fast/**", hosts={LOCAL}),
        Route("paced", "/paced/**", hosts={LOCAL}),
        Route("sessions", "/sessions/{id}", hosts={LOCAL}, key="{id}"),
        Route("no.such-api", "/nowhere", hosts={LOCAL}),
        *(replace(route, hosts={LOCAL}) for route in DEFENDER_ROUTES if route.hosts),
    ],
    defaults=(),
)
INCIDENTS = "/api/incidents"
HUNTING = "/api/advancedhunting/run"


# -- seeing what the client says to the coordinator ---------------------------------------


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str  # as sent, percent-encoding included
    body: dict[str, Any]
    status: int
    reply: dict[str, Any]


def _exchange(request: httpx.Request, response: httpx.Response) -> Exchange:
    return Exchange(
        request.method,
        request.url.raw_path.decode("ascii"),
        json.loads(request.content) if request.content else {},
        response.status_code,
        response.json(),
    )


class Recording(httpx.BaseTransport):
    """A real HTTP transport that logs every exchange with the coordinator."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.log: list[Exchange] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        response.read()
        self.log.append(_exchange(request, response))
        return response

    def close(self) -> None:
        self.inner.close()


class AsyncRecording(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.log: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        await response.aread()
        self.log.append(_exchange(request, response))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


def calls(log: list[Exchange], suffix: str) -> list[Exchange]:
    return [e for e in log if e.path.endswith(suffix)]


# -- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def upstream() -> Upstream:
    return Upstream(latency=0, run_queries=False)


@pytest.fixture
def upstream_url(upstream: Upstream) -> Iterator[str]:
    with serve_in_thread(upstream.app) as url:
        yield url


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port that is bound but not listening: connections are refused."""
    with socket.socket() as sock:
        sock.bind((LOCAL, 0))
        yield f"http://{LOCAL}:{sock.getsockname()[1]}"


def used(usage: dict[str, Any]) -> list[float]:
    return [limit["used"] for limit in usage["limits"]]


def test_most_in_any_window() -> None:
    assert most_in_any_window([], 1.0) == 0
    assert most_in_any_window([0.0, 0.5, 0.999, 1.0, 1.2, 1.5], 1.0) == 4
    assert most_in_any_window([0.0, 1.0, 2.0], 1.0) == 1


def test_routes_reach_the_upstream() -> None:
    assert all(route.hosts == {LOCAL} for route in ROUTES)
    assert ROUTES.match("GET", LOCAL, INCIDENTS) == ("m365d.incidents", "")
    assert ROUTES.match("POST", LOCAL, HUNTING) == ("m365d.advanced-hunting", "")
    assert ROUTES.match("GET", LOCAL, "/sessions/S1") == ("sessions", "s1")
    assert ROUTES.match("GET", LOCAL, "/public/status") is None
    assert ROUTES.match("GET", "api.security.microsoft.com", INCIDENTS) is None
    # The originals are left alone.
    assert all(route.hosts and LOCAL not in route.hosts for route in DEFENDER_ROUTES)
    assert "api.security.microsoft.com" in DEFENDER_HOSTS


# -- 1. leases per routed request -----------------------------------------------------------


def test_routed_requests_take_and_release_leases(
    coordinator_url: str, upstream: Upstream, upstream_url: str, dead_url: str
) -> None:
    recording = Recording()
    with (
        QuotaClient(coordinator_url, TENANT, transport=recording) as quota,
        httpx.Client(transport=QuotaTransport(quota, ROUTES)) as http,
    ):
        for _ in range(5):
            assert http.get(upstream_url + INCIDENTS).status_code == 200
        assert quota.flush(timeout=5)  # releases go out in the background
        usage = quota.usage("m365d.incidents")
        assert used(usage) == [5, 5]
        assert usage["in_flight"] == 0
        assert usage["cooldown"] == 0

        acquires = calls(recording.log, "/v1/leases")
        assert [(e.status, e.body) for e in acquires] == [
            (200, {"tenant": TENANT, "api": "m365d.incidents", "cost": 1, "wait": 30.0})
        ] * 5
        releases = calls(recording.log, "/release")
        assert [e.path for e in releases] == [
            f"/v1/leases/{e.reply['lease_id']}/release" for e in acquires
        ]
        for release in releases:
            assert release.status == 200
            assert release.reply == {"released": True}
            runtime = release.body.pop("runtime")
            assert isinstance(runtime, float)
            assert runtime >= 0
            assert release.body == {"outcome": "ok", "status_code": 200}

        # Unrouted: straight to the upstream, not a word to the coordinator.
        before = len(recording.log)
        assert http.get(upstream_url + "/public/status").status_code == 200
        assert len(upstream.arrivals("/public/status")) == 1
        assert len(recording.log) == before
        assert used(quota.usage("m365d.incidents")) == [5, 5]

        # Refused connection: the lease was granted, then refunded.
        before = len(recording.log)
        with pytest.raises(httpx.ConnectError):
            http.get(dead_url + INCIDENTS)
        assert quota.flush(timeout=5)
        acquire, release = recording.log[before:]
        assert acquire.status == 200
        assert release.path == f"/v1/leases/{acquire.reply['lease_id']}/release"
        assert (release.status, release.body) == (200, {"outcome": "not_called"})
        usage = quota.usage("m365d.incidents")
        assert used(usage) == [5, 5]
        assert usage["in_flight"] == 0
    assert len(upstream.arrivals(INCIDENTS)) == 5


def test_usage_of_a_tenant_with_slashes(coordinator_url: str, upstream_url: str) -> None:
    recording = Recording()
    with (
        QuotaClient(coordinator_url, TENANT, transport=recording) as quota,
        httpx.Client(transport=QuotaTransport(quota, ROUTES)) as http,
    ):
        http.get(upstream_url + INCIDENTS)
        assert quota.flush(timeout=5)
        usage = quota.usage("m365d.incidents", key="some-key")
        # The client sends the tenant as one segment; the coordinator takes both spellings.
        assert recording.log[-1].path == "/v1/usage/contoso%2Fapp1/m365d.incidents?key=some-key"
        plain = httpx.get(f"{coordinator_url}/v1/usage/{TENANT}/m365d.incidents?key=some-key")
        assert plain.status_code == 200
        assert plain.json() | {"limits": None} == usage | {"limits": None}
        assert usage["tenant"] == TENANT
        assert usage["key"] == "some-key"
        assert quota.usage("m365d.incidents")["key"] is None
        assert [
            (lim["kind"], lim["amount"], lim["window"], lim["scope"]) for lim in usage["limits"]
        ] == [
            ("calls", 50, 60.0, "api"),
            ("calls", 1500, 3600.0, "api"),
        ]
        assert used(usage) == [1, 1]


def test_error_shapes(coordinator_url: str, upstream: Upstream, upstream_url: str) -> None:
    with (
        QuotaClient(coordinator_url, TENANT) as quota,
        httpx.Client(transport=QuotaTransport(quota, ROUTES, wait=0)) as http,
    ):
        with pytest.raises(UnknownApi) as unknown:
            http.get(upstream_url + "/nowhere")
        assert (unknown.value.status_code, unknown.value.code) == (404, "unknown_api")

        with pytest.raises(BadRequest) as bad:
            quota.acquire("m365d.incidents", cost=51)  # no limit could ever grant it
        assert (bad.value.status_code, bad.value.code) == (422, "invalid_request")

        quota.release(quota.acquire("m365d.incidents", cost=50))
        with pytest.raises(QuotaExhausted) as denied:
            http.get(upstream_url + INCIDENTS)
        assert denied.value.code == "quota_exhausted"
        assert denied.value.limit == {"kind": "calls", "amount": 50, "window": 60.0}
        # Until the oldest bucket (1 s) has left the window (60 s) and the margin (1 s).
        assert 0 < denied.value.retry_after <= 62.0

        lease = quota.acquire("fast")
        quota.release(lease)
        with pytest.raises(UnknownLease):
            quota.release(lease)
        with pytest.raises(UnknownLease):
            quota.renew(lease)
    assert upstream.arrivals() == []


# -- 2. a 429 stops the fleet -----------------------------------------------------------

# What the upstream sees as the caller: its own bearer token, one per app registration.
CONTOSO = {"Authorization": "Bearer contoso-app1"}
FABRIKAM = {"Authorization": "Bearer fabrikam-app2"}


def test_throttled_answer_stops_every_worker(
    coordinator_url: str, upstream: Upstream, upstream_url: str
) -> None:
    upstream.throttle(INCIDENTS, retry_after=2)
    recording = Recording()
    with (
        QuotaClient(coordinator_url, TENANT, transport=recording) as first,
        QuotaClient(coordinator_url, TENANT) as second,
        QuotaClient(coordinator_url, "fabrikam/app2") as other_tenant,
        httpx.Client(transport=QuotaTransport(first, ROUTES), headers=CONTOSO) as worker,
        httpx.Client(
            transport=QuotaTransport(second, ROUTES, wait=0), headers=CONTOSO
        ) as impatient,
        httpx.Client(transport=QuotaTransport(second, ROUTES, wait=5), headers=CONTOSO) as patient,
        httpx.Client(
            transport=QuotaTransport(other_tenant, ROUTES, wait=0), headers=FABRIKAM
        ) as elsewhere,
    ):
        answer = worker.get(upstream_url + INCIDENTS)
        assert answer.status_code == 429
        assert answer.json()["error"]["code"] == "429"  # handed back as upstream sent it
        assert first.flush(timeout=5)
        (release,) = calls(recording.log, "/release")
        assert release.status == 200
        release.body.pop("runtime")
        assert release.body == {
            "outcome": "throttled",
            "status_code": 429,
            "retry_after": 2.0,
            "limit": {"amount": 50, "window": 60.0},  # "Maximum allowed 50 per 00:01:00"
        }

        usage = second.usage("m365d.incidents")
        assert 0 < usage["cooldown"] <= 2.0
        with pytest.raises(QuotaExhausted) as denied:
            impatient.get(upstream_url + INCIDENTS)
        assert denied.value.code == "cooling_down"
        assert 0 < denied.value.retry_after <= 2.0
        assert denied.value.limit is None

        # The rest of the tenant's apis and other tenants go on.
        assert impatient.get(upstream_url + "/fast/items").status_code == 200
        assert elsewhere.get(upstream_url + INCIDENTS).status_code == 200
        assert other_tenant.usage("m365d.incidents")["cooldown"] == 0

        # A worker that waits goes out only once the cooldown has passed.
        assert patient.get(upstream_url + INCIDENTS).status_code == 200
    assert len(upstream.arrivals(INCIDENTS, caller="fabrikam-app2")) == 1
    throttled_at, waited_at = upstream.times(INCIDENTS, caller="contoso-app1")
    # The cooldown started at the release, after the 429 arrived; Redis counts whole
    # milliseconds, so the grant may come up to 1 ms before 2 s of real time passed.
    assert waited_at - throttled_at >= 2.0 - 0.001


# -- 3. advanced hunting run time ------------------------------------------------------------


def test_hunting_reports_execution_time(
    coordinator_url: str, upstream: Upstream, upstream_url: str
) -> None:
    upstream.execution_time = 4.5
    gate = upstream.hold(HUNTING)
    recording = Recording()
    with (
        QuotaClient(coordinator_url, TENANT, transport=recording) as quota,
        httpx.Client(transport=QuotaTransport(quota, ROUTES)) as http,
    ):
        answers: list[httpx.Response] = []
        query = {"Query": "DeviceInfo | take 1"}
        thread = threading.Thread(
            target=lambda: answers.append(http.post(upstream_url + HUNTING, json=query))
        )
        thread.start()
        try:
            upstream.wait_for(1, HUNTING)
            during = quota.usage("m365d.advanced-hunting")
        finally:
            gate.set()
            thread.join()
        assert quota.flush(timeout=5)
        after = quota.usage("m365d.advanced-hunting")

    (answer,) = answers
    assert answer.json()["Stats"]["ExecutionTime"] == 4.5
    kinds = [(lim["kind"], lim["amount"], lim["window"]) for lim in after["limits"]]
    assert kinds == [("calls", 45, 60.0), ("runtime", 600.0, 3600.0), ("runtime", 14400.0, 86400.0)]
    # While the query runs, the catalog's estimate (20 s) is reserved; the reported
    # Stats.ExecutionTime replaces it at release. Run time is in seconds.
    assert used(during) == [1, 20.0, 20.0]
    assert during["in_flight"] == 1
    assert used(after) == [1, 4.5, 4.5]
    assert after["in_flight"] == 0
    (release,) = calls(recording.log, "/release")
    assert release.body == {
        "outcome": "ok",
        "status_code": 200,
        "runtime": 4.5,
        "runtime_upstream": True,  # the upstream's own time, not one the client measured
    }


# -- 4. the limit holds under concurrency ------------------------------------------------------
#
# The upstream records when each request arrives; in no exact one-second window may more
# than 20 arrive. Arrival comes after the grant, by a delay that varies: here the
# coordinator, the upstream and the workers share one process (and its GIL), and a burst
# of 20 grants reaches the upstream spread over up to ~150 ms under load. The coordinator
# absorbs that with `margin` (design, rule 3); with margin 0 (the `fast` test policy)
# arrivals were seen 21..28 to a second. `paced` is `fast` with a margin of 250 ms.

PACED_POLICIES = """
apis:
  paced:
    lease_ttl: 2s
    limits: [{calls: 20, per: 1s, granularity: 100ms, margin: 250ms}]
"""
PACED = "/paced/items"
LIMIT, WINDOW = 20, 1.0


@pytest.fixture
def paced_url(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    """A real coordinator with the catalog and `paced`; waits of up to 30 s."""
    with redis.Redis.from_url(valkey_server.url) as store:
        store.flushall()
    policy_file = tmp_path / "paced.yaml"
    policy_file.write_text(PACED_POLICIES)
    settings = Settings(redis_url=valkey_server.url, policies=policy_file, max_wait=30.0)
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_threads_stay_within_the_limit(
    paced_url: str, upstream: Upstream, upstream_url: str
) -> None:
    total, workers = 60, 16
    with (
        QuotaClient(paced_url, TENANT) as quota,
        httpx.Client(transport=QuotaTransport(quota, ROUTES), timeout=60) as http,
    ):
        statuses, errors = from_threads(
            lambda n: http.get(f"{upstream_url}{PACED}?n={n}").status_code, total, workers
        )

    assert errors == []
    assert statuses == [200] * total
    times = upstream.times(PACED)
    assert len(times) == total
    assert most_in_any_window(times, WINDOW) <= LIMIT


async def test_tasks_stay_within_the_limit(
    paced_url: str, upstream: Upstream, upstream_url: str
) -> None:
    total, workers = 80, 64
    tickets = iter(range(total))
    statuses: list[int] = []

    async with (
        AsyncQuotaClient(paced_url, TENANT) as quota,
        httpx.AsyncClient(transport=AsyncQuotaTransport(quota, ROUTES), timeout=60) as http,
    ):

        async def work() -> None:
            for ticket in tickets:
                response = await http.get(f"{upstream_url}{PACED}?n={ticket}")
                statuses.append(response.status_code)

        await asyncio.gather(*(work() for _ in range(workers)))

    assert statuses == [200] * total
    times = upstream.times(PACED)
    assert len(times) == total
    assert most_in_any_window(times, WINDOW) <= LIMIT


# -- 5. renewal against the real coordinator -----------------------------------------------
#
# `sessions` leases live 1 s; the call takes 1.5 s. A lease taken beside it and not
# renewed shows the TTL is real: its release after the call finds it expired.

SLOW = "/sessions/s1"


def check_renewed(log: list[Exchange], caplog: pytest.LogCaptureFixture) -> None:
    renewals = calls(log, "/renew")
    assert renewals
    assert all((e.status, e.body) == (200, {}) for e in renewals)
    assert all(0 < e.reply["expires_in"] <= 1.0 for e in renewals)
    (release,) = [e for e in calls(log, "/release") if "runtime" in e.body]
    assert (release.status, release.reply) == (200, {"released": True})
    assert release.body["outcome"] == "ok"
    # The upstream held the call 1.5 s by its event loop's timer, which may fire up to a
    # millisecond early.
    assert release.body["runtime"] >= 1.49
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_slow_call_keeps_its_lease(
    coordinator_url: str,
    upstream: Upstream,
    upstream_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.delay(SLOW, 1.5)
    recording = Recording()
    with (
        QuotaClient(coordinator_url, TENANT, transport=recording) as quota,
        httpx.Client(transport=QuotaTransport(quota, ROUTES), timeout=10) as http,
    ):
        unrenewed = quota.acquire("sessions", "other")
        assert http.get(upstream_url + SLOW).status_code == 200
        with pytest.raises(UnknownLease):
            quota.release(unrenewed)
        assert quota.flush(timeout=5)
        assert quota.usage("sessions")["in_flight"] == 0
    check_renewed(recording.log, caplog)


async def test_slow_async_call_keeps_its_lease(
    coordinator_url: str,
    upstream: Upstream,
    upstream_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream.delay(SLOW, 1.5)
    recording = AsyncRecording()
    async with (
        AsyncQuotaClient(coordinator_url, TENANT, transport=recording) as quota,
        httpx.AsyncClient(transport=AsyncQuotaTransport(quota, ROUTES), timeout=10) as http,
    ):
        unrenewed = await quota.acquire("sessions", "other")
        assert (await http.get(upstream_url + SLOW)).status_code == 200
        with pytest.raises(UnknownLease):
            await quota.release(unrenewed)
        assert await quota.flush(timeout=5)
        assert (await quota.usage("sessions"))["in_flight"] == 0
    check_renewed(recording.log, caplog)


# -- 6. releases in the background -----------------------------------------------------------
#
# A relay in front of the real coordinator sees every release on its way: it can hold
# them (to show the caller did not wait), answer 503 to the first few (to show they are
# retried), and tell which connections the client used. The catalog's incidents api counts
# in windows of a minute and an hour, so what is used stays in view while a test runs.

API = "m365d.incidents"


class Relay:
    """An ASGI app that forwards everything to the coordinator at `target`."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.url = ""  # where it listens, once served
        self.open = threading.Event()  # releases pass only while set
        self.open.set()
        self.fail = 0  # releases still to answer 503 backend_unavailable
        self.cond = threading.Condition()
        self.releases: list[str] = []  # lease ids, as they arrived
        self.statuses: list[int] = []  # what each release got back, in order
        self.clients: set[tuple[str, int]] = set()  # (host, port) of each connection

    def arrived(self, count: int) -> None:
        """Wait until `count` releases arrived (a hang detector: fails after 10 s)."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.releases) >= count, 10)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        path = scope["path"]
        self.clients.add(tuple(scope["client"]))
        status, headers, content = 0, [(b"content-type", b"application/json")], b""
        if path.endswith("/release"):
            with self.cond:
                self.releases.append(path.split("/")[3])
                self.cond.notify_all()
            assert await asyncio.to_thread(self.open.wait, 10)
            if self.fail > 0:
                self.fail -= 1
                status, content = 503, b'{"error":"backend_unavailable","detail":"relay"}'
        if not status:
            async with httpx.AsyncClient(base_url=self.target) as http:
                answer = await http.request(
                    scope["method"],
                    scope["raw_path"].decode() + "?" + scope["query_string"].decode(),
                    content=body,
                    headers={"content-type": "application/json"},
                )
            status, content = answer.status_code, answer.content
        if path.endswith("/release"):
            self.statuses.append(status)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})


@pytest.fixture
def relay(coordinator_url: str) -> Iterator[Relay]:
    relay = Relay(coordinator_url)
    with serve_in_thread(relay) as url:
        relay.url = url
        yield relay
        relay.open.set()  # let anything still held go, so the server can stop


def in_flight(coordinator_url: str, api: str = "m365d.incidents") -> tuple[int, list[float]]:
    """What the coordinator itself says of `api`: leases in flight and what is used."""
    with QuotaClient(coordinator_url, TENANT) as quota:
        usage = quota.usage(api)
    return usage["in_flight"], used(usage)


def test_release_arrives_after_the_block(coordinator_url: str, relay: Relay) -> None:
    relay.open.clear()
    with QuotaClient(relay.url, TENANT) as quota:
        with quota.lease(API) as lease:
            lease.set_outcome("ok", 200)
        relay.arrived(1)
        # The block is over; its release waits at the relay.
        assert in_flight(coordinator_url) == (1, [1, 1])
        relay.open.set()
        assert quota.flush(timeout=10)
        assert in_flight(coordinator_url) == (0, [1, 1])
    assert relay.statuses == [200]


def test_close_drains_the_queue(
    coordinator_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.open.clear()
    quota = QuotaClient(relay.url, TENANT)
    for _ in range(3):
        with quota.lease(API):
            pass
    relay.arrived(1)
    assert in_flight(coordinator_url) == (3, [3, 3])
    relay.open.set()
    quota.close()
    assert in_flight(coordinator_url) == (0, [3, 3])
    assert relay.statuses == [200] * 3
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_releases_answered_503_are_retried(
    coordinator_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.fail = 2
    with caplog.at_level(logging.INFO, "quotagate.client"):
        with QuotaClient(relay.url, TENANT) as quota:
            with quota.lease(API) as lease:
                pass
            assert quota.flush(timeout=10)
            assert in_flight(coordinator_url) == (0, [1, 1])
    assert relay.statuses == [503, 503, 200]
    assert relay.releases == [lease.lease_id] * 3
    retries = [r.getMessage() for r in caplog.records if "trying again" in r.getMessage()]
    assert len(retries) == 2
    prefix = lease.lease_id[: lease.lease_id.index(".") + 9]
    assert all(prefix in line and lease.lease_id not in line for line in retries)
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_release_that_keeps_failing_is_logged(
    coordinator_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.fail = 100
    with QuotaClient(relay.url, TENANT) as quota:
        with quota.lease(API) as lease:
            pass
        assert quota.flush(timeout=10)
    assert 1 < len(relay.statuses) == len(relay.releases) and set(relay.statuses) == {503}
    (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "backend_unavailable" in warning.getMessage()
    assert lease.lease_id[: lease.lease_id.index(".") + 9] in warning.getMessage()
    assert in_flight(coordinator_url)[0] == 1  # until the lease expires


def test_unknown_lease_is_not_retried(
    coordinator_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, "quotagate.client"):
        with QuotaClient(relay.url, TENANT) as quota:
            with quota.lease(API) as lease:
                quota.release(lease, "ok")  # by hand: the block's release finds it gone
            assert quota.flush(timeout=10)
    assert relay.statuses == [200, 404]
    gone = [r for r in caplog.records if "was gone at release" in r.getMessage()]
    assert [r.levelno for r in gone] == [logging.DEBUG]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_a_full_queue_makes_the_caller_send(coordinator_url: str, relay: Relay) -> None:
    relay.open.clear()
    quota = QuotaClient(relay.url, TENANT, release_queue=2)
    with quota.lease(API), quota.lease(API):
        pass
    relay.arrived(1)  # the sender holds one at the relay; the other waits in the queue

    def third() -> None:
        with quota.lease(API):
            pass

    caller = threading.Thread(target=third)
    caller.start()
    relay.arrived(2)  # the third block's own release: the caller sends it itself
    assert caller.is_alive()
    assert in_flight(coordinator_url) == (3, [3, 3])
    relay.open.set()
    caller.join(10)
    quota.close()
    assert relay.statuses == [200] * 3
    assert in_flight(coordinator_url) == (0, [3, 3])


def test_connections_are_kept_alive(relay: Relay, upstream_url: str) -> None:
    with (
        QuotaClient(relay.url, TENANT) as quota,
        httpx.Client(transport=QuotaTransport(quota, ROUTES)) as http,
    ):
        for _ in range(20):
            assert http.get(upstream_url + "/fast/items").status_code == 200
        assert quota.flush(timeout=10)
    assert len(relay.releases) == 20
    # The caller's connection, and at most one more for the sender while both are busy.
    assert 1 <= len(relay.clients) <= 2


async def test_async_releases_in_the_background(
    coordinator_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.open.clear()
    relay.fail = 1
    quota = AsyncQuotaClient(relay.url, TENANT)
    async with quota.lease(API):
        pass
    async with quota.lease(API):
        pass
    await asyncio.to_thread(relay.arrived, 1)
    assert await asyncio.to_thread(in_flight, coordinator_url) == (2, [2, 2])
    relay.open.set()
    await quota.aclose()  # drains, the retry of the 503 included
    assert relay.statuses == [503, 200, 200]
    assert await asyncio.to_thread(in_flight, coordinator_url) == (0, [2, 2])
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_async_releases_lost_with_their_loop_are_logged(
    coordinator_url: str, relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    relay.open.clear()

    async def forgetful() -> None:
        quota = AsyncQuotaClient(relay.url, TENANT)
        async with quota.lease(API):
            pass
        await asyncio.to_thread(relay.arrived, 1)
        # returns without aclose(): asyncio.run ends the loop

    asyncio.run(forgetful())
    relay.open.set()
    (lost,) = [r for r in caplog.records if "event loop ended" in r.getMessage()]
    assert lost.levelno == logging.WARNING
    assert "not released" in lost.getMessage()


EXITING = """
import sys
from quotagate.client import QuotaClient

quota = QuotaClient(sys.argv[1], "contoso/app1")
with quota.lease("m365d.incidents"):
    pass
print("block done", flush=True)
# exits without close(): the interpreter's exit drains the release
"""


def test_interpreter_exit_drains_the_queue(coordinator_url: str, relay: Relay) -> None:
    relay.open.clear()
    with subprocess.Popen(
        [sys.executable, "-c", EXITING, relay.url],
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == "block done\n"
            relay.arrived(1)
            assert in_flight(coordinator_url) == (1, [1, 1])
            relay.open.set()
            assert child.wait(30) == 0
        finally:
            child.kill()
    assert relay.statuses == [200]
    assert in_flight(coordinator_url) == (0, [1, 1])
