"""Priority classes in the acquire script, in virtual time: a class's share caps how full
each windowed limit may be for its grants; concurrent limits are shared alike."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Denial, Engine, Grant
from quotagate.coordinator.errors import InvalidRequest
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.settings import Settings

from .conftest import _wipe
from .service import serve_in_thread

pytestmark = pytest.mark.server

T0 = 1_700_000_000_000

POLICIES = parse_policies(
    """
margin: 0
apis:
  search:
    lease_ttl: 10s
    classes: {interactive: {}, batch: {share: 0.6}, backfill: {share: 0.2}}
    limits: [{calls: 10, per: 10s, granularity: 1s}, {concurrent: 20}]
  hunting:
    lease_ttl: 20s
    runtime_estimate: 2s
    classes: {interactive: {}, batch: {share: 0.5}}
    default_class: interactive
    limits: [{runtime: 10s, per: 10s, granularity: 1s}]
  plain:
    limits: [{calls: 2, per: 10s}]
"""
)


@pytest.fixture
def engine(redis_client: Redis) -> Engine:
    return Engine(redis_client, POLICIES)


async def ask(engine: Engine, api: str, priority: str | None, now: int, cost: int = 1) -> object:
    return await engine.acquire("t", api, "", cost, now=now, priority=priority)


async def test_a_class_fills_the_window_up_to_its_share(engine: Engine) -> None:
    granted = [await ask(engine, "search", "batch", T0) for _ in range(7)]
    assert [isinstance(g, Grant) for g in granted] == [True] * 6 + [False]
    denial = granted[-1]
    assert isinstance(denial, Denial) and denial.reason == "quota_exhausted"
    assert denial.amount == 10  # the limit's amount in force, not the class's cap
    # The headroom above the share stays for the higher class.
    higher = [await ask(engine, "search", "interactive", T0) for _ in range(5)]
    assert [isinstance(r, Grant) for r in higher] == [True, True, True, True, False]


async def test_a_lower_class_waits_for_use_to_drop_below_its_share(engine: Engine) -> None:
    for _ in range(2):
        assert isinstance(await ask(engine, "search", "interactive", T0), Grant)
    denial = await ask(engine, "search", "backfill", T0 + 500)
    assert isinstance(denial, Denial)
    # Leases in flight count until released; released now, their bucket leaves at T0+10s+1s.
    assert denial.soonest_ms == 10_500
    assert denial.retry_after_ms > 0


async def test_the_default_class_and_an_unknown_one(engine: Engine) -> None:
    # default_class of search is its lowest (backfill): 2 of 10.
    results = [await ask(engine, "search", None, T0) for _ in range(3)]
    assert [isinstance(r, Grant) for r in results] == [True, True, False]
    with pytest.raises(InvalidRequest) as info:
        await ask(engine, "search", "urgent", T0)
    assert info.value.field == "priority"
    assert "'urgent'" in str(info.value) and "interactive, batch, backfill" in str(info.value)


async def test_an_api_without_classes_ignores_priority(engine: Engine) -> None:
    assert isinstance(await ask(engine, "plain", "anything", T0), Grant)
    assert isinstance(await ask(engine, "plain", None, T0), Grant)
    assert isinstance(await ask(engine, "plain", "interactive", T0), Denial)


async def test_a_cost_beyond_the_class_share_is_refused(engine: Engine) -> None:
    with pytest.raises(InvalidRequest) as info:
        await ask(engine, "search", "backfill", T0, cost=3)
    assert info.value.field == "cost" and "'backfill'" in str(info.value)
    assert isinstance(await ask(engine, "search", "interactive", T0, cost=3), Grant)


async def test_runtime_share(engine: Engine) -> None:
    # batch may fill 5 s of 10: two estimates of 2 s, not three.
    results = [await ask(engine, "hunting", "batch", T0) for _ in range(3)]
    assert [isinstance(r, Grant) for r in results] == [True, True, False]
    assert isinstance(await ask(engine, "hunting", None, T0), Grant)  # interactive
    with pytest.raises(InvalidRequest) as info:
        await engine.acquire("t", "hunting", "", 1, 6_000, now=T0, priority="batch")
    assert info.value.field == "runtime_estimate"


# --- through HTTP -----------------------------------------------------------------------


@pytest.fixture
def http(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[httpx.Client]:
    _wipe(valkey_server.url)
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(
        "apis:\n  search:\n    classes: {interactive: {}, batch: {share: 0.5}}\n"
        "    limits: [{calls: 4, per: 1m}]\n"
    )
    settings = Settings(redis_url=valkey_server.url, policies=policy_file, max_wait=5.0)
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url) as client:
        yield client


def test_http_priority_names_a_class(http: httpx.Client) -> None:
    body = {"tenant": "t", "api": "search"}
    assert [http.post("/v1/leases", json=body).status_code for _ in range(3)] == [200, 200, 429]
    assert http.post("/v1/leases", json={**body, "priority": "interactive"}).status_code == 200
    unknown = http.post("/v1/leases", json={**body, "priority": "urgent"})
    assert unknown.status_code == 422, unknown.text
    assert unknown.json()["field"] == "priority" and "'urgent'" in unknown.json()["detail"]
    for bad in (3, "Bad Name", ["interactive"]):
        reply = http.post("/v1/leases", json={**body, "priority": bad})
        assert reply.status_code == 422 and reply.json()["field"] == "priority", reply.text
    # The catalog's apis have no classes: a priority there has no effect.
    incidents = {"tenant": "t", "api": "m365d.incidents", "priority": "interactive"}
    assert http.post("/v1/leases", json=incidents).status_code == 200


def test_usage_shows_each_class_and_the_line(http: httpx.Client) -> None:
    body = {"tenant": "t", "api": "search"}
    assert http.post("/v1/leases", json=body).status_code == 200
    usage = http.get("/v1/usage/t/search").json()
    assert usage["limits"][0]["remaining_by_class"] == {"interactive": 3, "batch": 1}
    assert usage["waiting"] == 0
    assert "remaining_by_class" not in http.get("/v1/usage/t/m365d.incidents").json()["limits"][0]


def test_the_clients_and_transports_ask_with_a_priority(http: httpx.Client) -> None:
    from quotagate.client import QuotaClient, QuotaExhausted, QuotaTransport
    from quotagate.client.routes import Route

    url = str(http.base_url).rstrip("/")
    with QuotaClient(url, "t") as client:
        for _ in range(2):
            client.acquire("search")  # the default class, batch: 2 of 4
        with pytest.raises(QuotaExhausted):
            client.acquire("search")
        with client.lease("search", priority="interactive") as lease:
            assert lease.lease_id
        routes = [Route("search", "/items", hosts=["api.example.test"])]
        upstream = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
        batch = QuotaTransport(client, routes, inner=upstream, wait=0.0)
        interactive = QuotaTransport(client, routes, inner=upstream, wait=0.0, priority="high")
        with httpx.Client(transport=batch) as plain, pytest.raises(QuotaExhausted):
            plain.get("https://api.example.test/items")
        assert interactive.gate.priority == "high"
        ok = QuotaTransport(client, routes, inner=upstream, wait=0.0, priority="interactive")
        with httpx.Client(transport=ok) as fast:
            assert fast.get("https://api.example.test/items").status_code == 200
        client.flush()
