"""The gateway's background release sender (`coordinator/releases.py`) on a real server:
releases that come in together go in one batch, a batch the store did not take is sent
again, and closing drains what is queued. And the gateway's upstream client (`Upstream`):
one session, made on first use, on the settings."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import aiohttp
import pytest
import yarl
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


async def test_the_upstream_session_is_made_once_on_the_settings() -> None:
    upstream = Upstream.from_settings(Settings(gateway_connections=10, gateway_timeout=7.0))
    await upstream.aclose()  # none made yet: nothing to close
    session = upstream.session
    assert upstream.session is session
    assert session.connector is not None and session.connector.limit == 10
    assert (session.timeout.connect, session.timeout.sock_read) == (7.0, 7.0)
    assert isinstance(session.cookie_jar, aiohttp.DummyCookieJar)
    assert not session.trust_env and not session.auto_decompress  # proxies: read once
    assert {"User-Agent", "Accept", "Accept-Encoding"} <= set(session.skip_auto_headers)
    await upstream.aclose()
    assert session.closed


def test_the_upstream_proxy_is_chosen_as_the_environment_says() -> None:
    proxies = {
        "http": "http://user:secret@egress.example:3128",
        "all": "egress.example:8080",
        "no": "skip.example, .inner.example:8443,[::1]",
    }
    upstream = Upstream(aiohttp.ClientSession, proxies)
    egress = yarl.URL("http://egress.example:3128")
    assert upstream.proxy(yarl.URL("http://api.example/x")) == (
        egress,
        "Basic dXNlcjpzZWNyZXQ=",
    )
    assert upstream.proxy(yarl.URL("https://api.example/x")) == (
        yarl.URL("http://egress.example:8080"),
        None,
    )
    for bypassed in (
        "http://skip.example/",
        "http://a.skip.example/",
        "https://b.inner.example:8443/",
        "http://[::1]:80/",
    ):
        assert upstream.proxy(yarl.URL(bypassed)) == (None, None), bypassed
    assert upstream.proxy(yarl.URL("https://b.inner.example/"))[0] is not None  # other port
    assert upstream.proxy(yarl.URL("http://notskip.example/"))[0] == egress
    assert Upstream(aiohttp.ClientSession, {}).proxy(yarl.URL("http://a.example/")) == (None, None)
