"""No class starves, in virtual time: a lower class that has gone the api's aging without
a grant while it asks is served ahead of the higher classes, and within the whole limit
rather than its share, for one grant (acquire.lua, "Aging")."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Denial, Engine, Grant
from quotagate.coordinator.policy import PolicyError, default_aging_ms, load_catalog, parse_policies

from .strategies import EPOCH_MS

pytestmark = pytest.mark.server

T0 = EPOCH_MS
WAIT_MS = 10_000  # every request may wait in line this long

POLICIES = parse_policies(
    """
margin: 0
apis:
  search:
    lease_ttl: 10s
    classes: {interactive: {}, batch: {share: 0.5}}
    aging: 3s
    limits: [{calls: 4, per: 10s, granularity: 1s}]
"""
)


@pytest.fixture
def engine(redis_client: Redis) -> Engine:
    return Engine(redis_client, POLICIES)


async def ask(engine: Engine, priority: str, now: int, ticket: str | None = None) -> object:
    return await engine.acquire(
        "t",
        "search",
        now=now,
        priority=priority,
        ticket=ticket,
        line_wait_ms=None if ticket is None else WAIT_MS,
    )


async def test_an_aged_lower_class_goes_first_and_beyond_its_share(engine: Engine) -> None:
    # interactive fills the window, one call at T0 and three at T0 + 1 s; batch's cap
    # (2 of 4) is long passed.
    for at in (T0, T0 + 1_000, T0 + 1_000, T0 + 1_000):
        lease = await ask(engine, "interactive", at)
        assert isinstance(lease, Grant)
        await engine.release(lease.lease_id, "ok", now=at)
    waiting = await ask(engine, "batch", T0 + 1_100, ticket="b")
    assert isinstance(waiting, Denial)
    # Not aged yet (the first grant stamped it at T0): it may be served at T0 + 3 s.
    assert waiting.retry_after_ms == 1_900 and waiting.soonest_ms == 1_900
    assert isinstance(await ask(engine, "interactive", T0 + 1_500, ticket="i"), Denial)
    # Aged at T0 + 3 s; one call of room comes when T0's bucket leaves, at T0 + 11 s: it
    # goes to batch although interactive waits ahead of it by class, and use is over its
    # share.
    for now in range(T0 + 2_000, T0 + 11_000, 1_500):  # both wait, refreshing tickets
        assert isinstance(await ask(engine, "interactive", now, ticket="i"), Denial)
        assert isinstance(await ask(engine, "batch", now, ticket="b"), Denial)
    assert isinstance(await ask(engine, "interactive", T0 + 11_000, ticket="i"), Denial)
    assert isinstance(await ask(engine, "batch", T0 + 11_000, ticket="b"), Grant)
    # Stamped again: the room that is left is the higher class's, in order, as before.
    assert isinstance(await ask(engine, "batch", T0 + 11_000), Denial)
    assert isinstance(await ask(engine, "interactive", T0 + 11_000, ticket="i"), Denial)


async def test_an_aged_newcomer_still_needs_room(engine: Engine) -> None:
    for priority in ("batch", "interactive", "interactive", "interactive"):
        lease = await ask(engine, priority, T0)
        assert isinstance(lease, Grant)
        await engine.release(lease.lease_id, "ok", now=T0)
    denial = await ask(engine, "batch", T0 + 5_000)
    assert isinstance(denial, Denial)  # aged, but the limit itself is full
    assert denial.retry_after_ms == 6_000  # T0's bucket leaves at T0 + 11 s


def test_aging_in_the_policy() -> None:
    policy = POLICIES.apis["search"]
    assert policy.aging_ms == 3_000
    assert policy.describe()["aging"] == 3.0
    # The default: two spans of the shortest window (window, margin, a bucket) ...
    default = parse_policies(
        "margin: 0\napis: {a.b: {classes: {hi: {}, mid: {}, lo: {share: 0.5}},"
        " limits: [{calls: 50, per: 5s, granularity: 100ms}, {calls: 200, per: 1m}]}}"
    )
    limits = default.apis["a.b"].limits
    assert default.apis["a.b"].aging_ms == 10_200 == default_aging_ms(limits, 60_000, 0, 3)
    # ... or ten lease-times of the scarcest limit per lower class, when that is longer.
    assert default_aging_ms(limits[:1], 60_000, 0, 12) == 11_000
    hunting = load_catalog().apis["m365d.advanced-hunting"]
    assert hunting.aging_ms is None  # the catalog has no classes
    with_runtime = parse_policies(
        "apis: {h.q: {runtime_estimate: 20s, classes: {hi: {}, lo: {share: 0.6}},"
        " limits: [{calls: 45, per: 1m}, {runtime: 10m, per: 1h}]}}"
    )
    assert with_runtime.apis["h.q"].aging_ms == 1_200_000  # 20 s of 10 min an hour, x10
    for bad, words in (
        ("aging: 0s", "aging must be a positive duration"),
        ("aging: soon", "aging"),
    ):
        with pytest.raises(PolicyError, match=words):
            parse_policies(
                f"apis: {{a.b: {{classes: {{hi: {{}}, lo: {{}}}}, {bad},"
                " limits: [{calls: 5, per: 1s}]}}"
            )
    with pytest.raises(PolicyError, match="aging needs `classes` with two classes"):
        parse_policies("apis: {a.b: {aging: 5s, limits: [{calls: 5, per: 1s}]}}")


# --- the bound, as a property -----------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    amount: int
    window_ms: int
    share: float
    aging_ms: int

    def policies(self) -> str:
        return (
            "margin: 0\napis:\n  line:\n    lease_ttl: 10s\n"
            f"    classes: {{interactive: {{}}, batch: {{share: {self.share}}}}}\n"
            f"    aging: {self.aging_ms}ms\n"
            f"    limits: [{{calls: {self.amount}, per: {self.window_ms}ms,"
            f" granularity: {self.window_ms // 10}ms}}]\n"
        )


setups = st.builds(
    Setup,
    st.sampled_from([2, 4, 10]),
    st.sampled_from([2_000, 5_000]),
    st.sampled_from([0.5, 0.8, 1.0]),
    st.sampled_from([1_000, 3_000, 8_000]),
)
steps = st.lists(st.integers(10, 1_500), min_size=20, max_size=80)


async def _saturate(url: str, setup: Setup, advances: list[int]) -> None:
    policies = parse_policies(setup.policies())
    client = Redis.from_url(url)
    engine = Engine(client, policies)
    tenant = f"t-{uuid.uuid4().hex}"
    cap = int(setup.amount * setup.share)
    gran = setup.window_ms // 10
    # Once aged, batch waits at most for the oldest bucket to leave the window, and for
    # the step in which it asks again.
    bound = setup.aging_ms + setup.window_ms + gran + max(advances)
    now = T0
    first: int | None = None  # the first grant of all: batch ages from it
    batch_grants: list[int] = []
    beyond_share: list[int] = []  # batch grants that went over batch's cap
    try:

        async def acquire(priority: str, ticket: str) -> bool:
            result = await engine.acquire(
                tenant, "line", now=now, priority=priority, ticket=ticket, line_wait_ms=WAIT_MS
            )
            if isinstance(result, Grant):
                await engine.release(result.lease_id, "ok", now=now)
            return isinstance(result, Grant)

        for advance in advances:
            now += advance
            # interactive saturates: it asks until it is refused, and leaves a waiter.
            for attempt in range(setup.amount + 1):
                if not await acquire("interactive", f"i{attempt}"):
                    break
                first = now if first is None else first
            used = (await engine.usage(tenant, "line", now=now)).limits[0].used
            if await acquire("batch", "b"):
                first = now if first is None else first
                batch_grants.append(now)
                if used + 1 > cap:
                    beyond_share.append(now)
            assert (await engine.usage(tenant, "line", now=now)).limits[0].used <= setup.amount
        assert first is not None
        marks = [first, *batch_grants, now]
        gaps = [later - earlier for earlier, later in itertools.pairwise(marks)]
        assert max(gaps) <= bound, (marks, bound)
        # Going beyond the share is aging's privilege: once per aging at most.
        spaced = [b - a for a, b in itertools.pairwise(beyond_share)]
        assert all(gap >= setup.aging_ms for gap in spaced), (beyond_share, setup)
    finally:
        await client.aclose()


@given(setup=setups, advances=steps)
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_a_class_that_keeps_asking_is_served_within_its_aging(
    redis_server: EmbeddedServer, setup: Setup, advances: list[int]
) -> None:
    asyncio.run(_saturate(redis_server.url, setup, advances))
