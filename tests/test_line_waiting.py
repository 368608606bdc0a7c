"""FleetLines against a real server: two coordinators in one process, each with its own
engine and lines, share the line in the store; a release through one wakes a waiter of
the other through pub/sub."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from quotagate.coordinator.engine import Denial, Engine, Grant
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.waiting import Ask, FleetLines

pytestmark = pytest.mark.server

POLICIES = parse_policies(
    """
apis:
  slots:
    lease_ttl: 20s
    classes: {hi: {}, lo: {}}
    limits: [{calls: 1000, per: 1m}, {concurrent: 1}]
  minute:
    limits: [{calls: 1, per: 1m}]
"""
)
SLOTS = Ask("t", "slots", wait=15.0)
HANG = 10  # seconds: a hang detector, far below the lease's 20 s


async def staying() -> bool:
    return False


async def leaving() -> bool:
    return True


@pytest.fixture
def engines(redis_client: Redis) -> tuple[Engine, Engine]:
    other = Redis(connection_pool=redis_client.connection_pool)
    return Engine(redis_client, POLICIES), Engine(other, POLICIES)


async def test_a_release_through_another_coordinator_wakes_the_waiter(
    engines: tuple[Engine, Engine],
) -> None:
    one, two = engines
    here, there = FleetLines(one, heartbeat=60.0), FleetLines(two, heartbeat=60.0)
    held = await there.acquire(SLOTS, staying)
    assert isinstance(held, Grant)
    waiter = asyncio.create_task(here.acquire(SLOTS, staying))
    while (await one.usage("t", "slots")).waiting == 0:
        await asyncio.sleep(0.01)
    await two.release(held.lease_id, "ok")  # not through `here`: only pub/sub tells it
    async with asyncio.timeout(HANG):
        granted = await waiter
    assert isinstance(granted, Grant)
    assert not here.wakeups.channels()  # nobody waits: nothing listens
    await here.aclose()
    await there.aclose()


async def test_higher_class_first_across_coordinators(engines: tuple[Engine, Engine]) -> None:
    one, two = engines
    here, there = FleetLines(one, heartbeat=0.05), FleetLines(two, heartbeat=0.05)
    held = await here.acquire(SLOTS, staying)
    assert isinstance(held, Grant)
    order: list[str] = []

    async def wait(lines: FleetLines, priority: str) -> None:
        result = await lines.acquire(Ask("t", "slots", wait=15.0, priority=priority), staying)
        assert isinstance(result, Grant)
        order.append(priority)
        await lines.engine.release(result.lease_id, "ok")
        lines.released("t", "slots")

    low = asyncio.create_task(wait(here, "lo"))
    while (await one.usage("t", "slots")).waiting < 1:
        await asyncio.sleep(0.01)
    high = asyncio.create_task(wait(there, "hi"))
    while (await one.usage("t", "slots")).waiting < 2:
        await asyncio.sleep(0.01)
    await one.release(held.lease_id, "ok")
    async with asyncio.timeout(HANG):
        await asyncio.gather(low, high)
    assert order == ["hi", "lo"]


async def test_a_waiter_whose_client_left_leaves_the_line(engines: tuple[Engine, Engine]) -> None:
    one, _ = engines
    lines = FleetLines(one, heartbeat=0.05)
    held = await lines.acquire(SLOTS, staying)
    assert isinstance(held, Grant)
    assert await lines.acquire(SLOTS, leaving) is None
    assert (await one.usage("t", "slots")).waiting == 0


async def test_a_wait_too_short_for_the_soonest_grant_is_answered_at_once(
    engines: tuple[Engine, Engine],
) -> None:
    one, _ = engines
    lines = FleetLines(one)
    first = await lines.acquire(Ask("t", "minute"), staying)
    assert isinstance(first, Grant)
    await one.release(first.lease_id, "ok")
    loop = asyncio.get_running_loop()
    started = loop.time()
    denial = await lines.acquire(Ask("t", "minute", wait=15.0), staying)
    assert isinstance(denial, Denial) and denial.retry_after_ms > 15_000
    assert loop.time() - started < HANG  # answered, not held for the wait
    assert (await one.usage("t", "minute")).waiting == 0
