"""The fleet-wide line per (tenant, api, key), in the acquire script, in virtual time:
tickets ordered by class then arrival; a newcomer never overtakes a waiter; a ticket that
is not refreshed loses its place; a request whose soonest grant lies beyond its wait does
not join."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from quotagate.coordinator.engine import TICKET_TTL_MS, Denial, Engine, Grant
from quotagate.coordinator.policy import parse_policies

pytestmark = pytest.mark.server

T0 = 1_700_000_000_000

POLICIES = parse_policies(
    """
margin: 0
apis:
  slots:
    lease_ttl: 10s
    classes: {hi: {}, lo: {}}
    limits: [{calls: 100, per: 10s}, {concurrent: 1}]
  calls:
    lease_ttl: 10s
    limits: [{calls: 2, per: 10s, granularity: 1s}]
  runtime:
    lease_ttl: 10s
    runtime_estimate: 4s
    limits: [{runtime: 10s, per: 1m, granularity: 1s}]
"""
)


@pytest.fixture
def engine(redis_client: Redis) -> Engine:
    return Engine(redis_client, POLICIES)


async def attempt(
    engine: Engine,
    api: str,
    now: int,
    ticket: str | None = None,
    wait_ms: int | None = 5_000,
    priority: str | None = None,
    key: str = "",
) -> Grant | Denial:
    return await engine.acquire(
        "t", api, key, now=now, ticket=ticket, line_wait_ms=wait_ms, priority=priority
    )


async def waiting(engine: Engine, api: str, now: int, key: str = "") -> int:
    return (await engine.usage("t", api, key, now=now)).waiting


async def test_a_newcomer_never_overtakes_a_waiter(engine: Engine) -> None:
    held = await attempt(engine, "slots", T0)
    assert isinstance(held, Grant)
    assert isinstance(await attempt(engine, "slots", T0 + 10, "w1"), Denial)
    assert await waiting(engine, "slots", T0 + 10) == 1
    await engine.release(held.lease_id, "ok", now=T0 + 20)
    # The slot is free, but w1 waits for it: a newcomer (with or without a ticket) is not
    # granted, and learns that its soonest grant is after w1's.
    newcomer = await attempt(engine, "slots", T0 + 30)
    assert isinstance(newcomer, Denial) and newcomer.limit is not None
    assert newcomer.limit.amount == 1 and newcomer.retry_after_ms > 0
    assert isinstance(await attempt(engine, "slots", T0 + 30, "w2"), Denial)
    granted = await attempt(engine, "slots", T0 + 40, "w1")
    assert isinstance(granted, Grant)
    assert await waiting(engine, "slots", T0 + 40) == 1  # w2 is the head now
    await engine.release(granted.lease_id, "ok", now=T0 + 50)
    assert isinstance(await attempt(engine, "slots", T0 + 60, "w2"), Grant)
    assert await waiting(engine, "slots", T0 + 60) == 0


async def test_a_higher_class_goes_first(engine: Engine) -> None:
    held = await attempt(engine, "slots", T0)
    assert isinstance(held, Grant)
    assert isinstance(await attempt(engine, "slots", T0 + 1, "lo", priority="lo"), Denial)
    assert isinstance(await attempt(engine, "slots", T0 + 2, "hi", priority="hi"), Denial)
    await engine.release(held.lease_id, "ok", now=T0 + 3)
    assert isinstance(await attempt(engine, "slots", T0 + 4, "lo", priority="lo"), Denial)
    assert isinstance(await attempt(engine, "slots", T0 + 5, "hi", priority="hi"), Grant)


async def test_the_line_is_per_key(engine: Engine) -> None:
    assert isinstance(await attempt(engine, "calls", T0, key="a"), Grant)
    assert isinstance(await attempt(engine, "calls", T0, key="a"), Grant)
    assert isinstance(await attempt(engine, "calls", T0 + 1, "wa", 60_000, key="a"), Denial)
    assert await waiting(engine, "calls", T0 + 1, key="a") == 1
    assert await waiting(engine, "calls", T0 + 1, key="b") == 0


async def test_a_ticket_not_refreshed_loses_its_place(engine: Engine) -> None:
    held = await attempt(engine, "slots", T0)
    assert isinstance(held, Grant)
    assert isinstance(await attempt(engine, "slots", T0 + 1, "gone"), Denial)
    await engine.release(held.lease_id, "ok", now=T0 + 2)
    assert isinstance(await attempt(engine, "slots", T0 + TICKET_TTL_MS, "other"), Denial)
    # "other" refreshed its ticket at T0 + TICKET_TTL_MS; "gone" did not.
    later = T0 + 1 + TICKET_TTL_MS
    assert await waiting(engine, "slots", later) == 1
    assert isinstance(await attempt(engine, "slots", later, "other"), Grant)


async def test_a_refreshed_ticket_keeps_its_place(engine: Engine) -> None:
    held = await attempt(engine, "slots", T0)
    assert isinstance(held, Grant)
    for at in range(T0 + 1, T0 + 3 * TICKET_TTL_MS, TICKET_TTL_MS // 2):
        assert isinstance(await attempt(engine, "slots", at, "first"), Denial)
        assert isinstance(await attempt(engine, "slots", at + 1, "second"), Denial)
    await engine.release(held.lease_id, "ok", now=T0 + 3 * TICKET_TTL_MS)
    now = T0 + 3 * TICKET_TTL_MS + 1
    assert isinstance(await attempt(engine, "slots", now, "second"), Denial)
    assert isinstance(await attempt(engine, "slots", now, "first"), Grant)


async def test_a_request_whose_soonest_grant_is_beyond_its_wait_does_not_join(
    engine: Engine,
) -> None:
    for _ in range(2):
        lease = await attempt(engine, "calls", T0)
        assert isinstance(lease, Grant)
        await engine.release(lease.lease_id, "ok", now=T0)
    denial = await attempt(engine, "calls", T0 + 500, "short", wait_ms=5_000)
    assert isinstance(denial, Denial) and denial.soonest_ms == 10_500
    assert await waiting(engine, "calls", T0 + 500) == 0
    assert isinstance(await attempt(engine, "calls", T0 + 500, "long", wait_ms=11_000), Denial)
    assert await waiting(engine, "calls", T0 + 500) == 1
    # A second waiter counts the first one's call too: its soonest grant is no earlier.
    behind = await attempt(engine, "calls", T0 + 600, "behind", wait_ms=60_000)
    assert isinstance(behind, Denial)
    assert behind.now_ms + behind.soonest_ms >= denial.now_ms + denial.soonest_ms
    assert await waiting(engine, "calls", T0 + 600) == 2


async def test_leave(engine: Engine) -> None:
    held = await attempt(engine, "slots", T0)
    assert isinstance(held, Grant)
    assert isinstance(await attempt(engine, "slots", T0 + 1, "w"), Denial)
    assert await engine.leave("t", "slots", "", "w", now=T0 + 2)
    assert not await engine.leave("t", "slots", "", "w", now=T0 + 2)
    await engine.release(held.lease_id, "ok", now=T0 + 3)
    assert isinstance(await attempt(engine, "slots", T0 + 4), Grant)


async def test_a_final_attempt_without_a_wait_leaves_the_line(engine: Engine) -> None:
    held = await attempt(engine, "slots", T0)
    assert isinstance(held, Grant)
    assert isinstance(await attempt(engine, "slots", T0 + 1, "w"), Denial)
    assert isinstance(await attempt(engine, "slots", T0 + 2, "w", wait_ms=None), Denial)
    assert await waiting(engine, "slots", T0 + 2) == 0


async def test_waiters_that_never_fit_at_once_are_served_in_order(engine: Engine) -> None:
    for _ in range(2):
        lease = await attempt(engine, "calls", T0)
        assert isinstance(lease, Grant)
        await engine.release(lease.lease_id, "ok", now=T0)
    joined = T0 + 9_500
    for number, ticket in enumerate(("w1", "w2", "w3")):
        assert isinstance(await attempt(engine, "calls", joined + number, ticket), Denial)
    later = T0 + 11_000  # the two calls have left the window: room for two
    # w3 has two ahead of it and is not granted; w2 is, as the room holds w1 too.
    assert isinstance(await attempt(engine, "calls", later, "w3"), Denial)
    assert isinstance(await attempt(engine, "calls", later, "w2"), Grant)
    assert isinstance(await attempt(engine, "calls", later, "w3"), Denial)
    assert isinstance(await attempt(engine, "calls", later, "w1"), Grant)
    # With w2's call in the window now, w3's soonest grant is 10 s away, beyond its 5 s:
    # it is answered at once and leaves the line.
    last = await attempt(engine, "calls", later, "w3")
    assert isinstance(last, Denial) and last.soonest_ms > 5_000
    assert await waiting(engine, "calls", later) == 0


async def test_a_waiter_for_run_time_stays_while_estimates_in_flight_may_come_back(
    engine: Engine,
) -> None:
    # 4 s charged, 4 s reserved in flight: a third 4 s estimate does not fit now.
    done = await attempt(engine, "runtime", T0)
    assert isinstance(done, Grant)
    await engine.release(done.lease_id, "ok", runtime_ms=4_000, now=T0 + 100)
    flying = await attempt(engine, "runtime", T0 + 200)
    assert isinstance(flying, Grant)
    # A release charges the run time it reports, not the estimate: the lease in flight
    # may leave room at once, so the waiter stays in line rather than being told a
    # minute (its estimate charged in full).
    denial = await attempt(engine, "runtime", T0 + 300, "w", wait_ms=5_000)
    assert isinstance(denial, Denial) and denial.retry_after_ms > 5_000
    assert denial.soonest_ms == 0
    assert await waiting(engine, "runtime", T0 + 300) == 1
    # Behind it, another counts no more of its estimate either.
    behind = await attempt(engine, "runtime", T0 + 300, "w2", wait_ms=5_000)
    assert isinstance(behind, Denial) and behind.soonest_ms == 0
    await engine.release(flying.lease_id, "ok", runtime_ms=1_000, now=T0 + 400)
    served = await attempt(engine, "runtime", T0 + 500, "w")
    assert isinstance(served, Grant)
    await engine.release(served.lease_id, "ok", runtime_ms=4_000, now=T0 + 600)
    # Nothing in flight now and 9 s charged: no release can make room for 4 s.
    last = await attempt(engine, "runtime", T0 + 700, "w2", wait_ms=5_000)
    assert isinstance(last, Denial) and last.soonest_ms > 5_000
    assert await waiting(engine, "runtime", T0 + 700) == 0
