"""The gateway's background release sender (`coordinator/releases.py`) on a real server:
releases that come in together go in one batch, a batch the store did not take is sent
again, and closing drains what is queued. And the gateway's upstream pools (`Upstream`):
each call on the least busy one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from quotagate.coordinator import releases as releases_module
from quotagate.coordinator.engine import Denial, Engine, Grant, Release, Released
from quotagate.coordinator.errors import BackendUnavailable, UnknownLease
from quotagate.coordinator.gateway import Upstream
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.releases import ReleaseSender
from quotagate.coordinator.settings import Settings
from quotagate.coordinator.waiting import FleetLines

pytestmark = pytest.mark.server

POLICIES = parse_policies(
    """
margin: 0
apis:
  calls:
    lease_ttl: 60s
    limits: [{calls: 1000, per: 1m}, {concurrent: 1000}]
  slot:
    lease_ttl: 60s
    limits: [{concurrent: 1}]
"""
)


class CountingEngine(Engine):
    """The engine, with the batches it was given and `failures` store failures first."""

    def __init__(self, redis: Any, failures: int = 0) -> None:
        super().__init__(redis, POLICIES)
        self.batches: list[int] = []
        self.failures = failures

    async def release_many(
        self, releases: Sequence[Release], *, now: int | None = None
    ) -> list[Released | UnknownLease]:
        self.batches.append(len(releases))
        if self.failures:
            self.failures -= 1
            raise BackendUnavailable("the store is away (on purpose)")
        return await super().release_many(releases, now=now)


async def grants(engine: Engine, n: int) -> list[Grant]:
    found = [await engine.acquire("contoso", "calls") for _ in range(n)]
    assert all(isinstance(grant, Grant) for grant in found)
    return [grant for grant in found if isinstance(grant, Grant)]


async def in_flight(engine: Engine) -> int:
    return (await engine.usage("contoso", "calls")).in_flight


async def test_releases_that_come_together_go_in_one_batch(redis_client: Redis) -> None:
    engine = CountingEngine(redis_client)
    sender = ReleaseSender(engine, FleetLines(engine))
    leases = await grants(engine, 40)
    for lease in leases:
        sender.send(Release(lease.lease_id, "ok"), "contoso", "calls")
    await sender.aclose()
    assert sum(engine.batches) == 40
    assert len(engine.batches) < 40
    assert await in_flight(engine) == 0


async def test_a_batch_the_store_did_not_take_is_sent_again(
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(releases_module, "FIRST_RETRY", 0.001)
    engine = CountingEngine(redis_client, failures=2)
    sender = ReleaseSender(engine, FleetLines(engine))
    leases = await grants(engine, 5)
    with caplog.at_level(logging.WARNING, "quotagate"):
        for lease in leases:
            sender.send(Release(lease.lease_id, "ok"), "contoso", "calls")
        await sender.aclose()
    assert engine.batches[:3] == [5, 5, 5]
    assert await in_flight(engine) == 0
    assert sum("trying again" in r.getMessage() for r in caplog.records) == 2


async def test_a_batch_that_keeps_failing_is_logged(
    redis_client: Redis, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(releases_module, "FIRST_RETRY", 0.001)
    engine = CountingEngine(redis_client, failures=releases_module.TRIES)
    sender = ReleaseSender(engine, FleetLines(engine))
    (lease,) = await grants(engine, 1)
    with caplog.at_level(logging.WARNING, "quotagate"):
        sender.send(Release(lease.lease_id, "ok"), "contoso", "calls")
        await sender.aclose()
    assert len(engine.batches) == releases_module.TRIES
    assert any("expire at their time to live" in r.getMessage() for r in caplog.records)
    assert await in_flight(engine) == 1  # left to expire


async def test_unknown_leases_are_logged_and_the_rest_released(
    redis_client: Redis, caplog: pytest.LogCaptureFixture
) -> None:
    engine = CountingEngine(redis_client)
    sender = ReleaseSender(engine, FleetLines(engine))
    (lease,) = await grants(engine, 1)
    with caplog.at_level(logging.WARNING, "quotagate"):
        sender.send(Release("contoso.calls..not-a-lease", "ok"), "contoso", "calls")
        sender.send(Release(lease.lease_id, "ok"), "contoso", "calls")
        await sender.aclose()
    assert await in_flight(engine) == 0
    assert any("releasing a lease of calls failed" in r.getMessage() for r in caplog.records)


async def test_a_release_wakes_the_waiters_of_its_api(redis_client: Redis) -> None:
    engine = CountingEngine(redis_client)
    lines = FleetLines(engine)
    woken: list[tuple[str, str]] = []
    lines.released = lambda tenant, api: woken.append((tenant, api))  # type: ignore[method-assign]
    sender = ReleaseSender(engine, lines)
    (lease,) = await grants(engine, 1)
    sender.send(Release(lease.lease_id, "ok"), "contoso", "calls")
    await sender.aclose()
    assert woken == []  # nobody waits in its line: the release publishes nothing
    held = await engine.acquire("contoso", "slot")
    assert isinstance(held, Grant)
    waiter = await engine.acquire("contoso", "slot", ticket="waiter", line_wait_ms=60_000)
    assert isinstance(waiter, Denial)  # in line for the one slot
    sender.send(Release(held.lease_id, "ok"), "contoso", "slot")
    await sender.aclose()
    assert woken == [("contoso", "slot")]
    (lease,) = await grants(engine, 1)
    sender.send(Release(lease.lease_id, "ok"), "contoso", "calls")  # a sender closed restarts
    await asyncio.sleep(0)
    await sender.aclose()


async def test_each_upstream_call_goes_to_the_least_busy_pool() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b"{}")

    clients = [httpx.AsyncClient(transport=httpx.MockTransport(answer)) for _ in range(3)]
    upstream = Upstream(clients)
    sent = [
        await upstream.send(clients[0].build_request("GET", "https://x.test/")) for _ in range(4)
    ]
    assert upstream.busy == [2, 1, 1]
    for response, free in sent[:2]:
        await response.aclose()
        free()
        free()  # a second call changes nothing
    assert upstream.busy == [1, 0, 1]
    await upstream.send(clients[0].build_request("GET", "https://x.test/"))
    assert upstream.busy == [1, 1, 1]
    await upstream.aclose()
    assert all(client.is_closed for client in clients)


def test_the_pools_share_the_connections_of_the_settings() -> None:
    assert [Upstream.shares(n) for n in (200, 10, 3, 1)] == [(8, 25), (8, 2), (3, 1), (1, 1)]
    upstream = Upstream.from_settings(Settings(gateway_connections=10))
    assert len(upstream.clients) == 8
