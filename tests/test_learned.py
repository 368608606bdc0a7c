"""Limits learned from the upstream's 429s (design rule 8), in virtual time."""

from __future__ import annotations

import logging

import httpx
import pytest
from redis.asyncio import Redis

from quotagate.coordinator.engine import Denial, Engine, Grant
from quotagate.coordinator.policy import parse_policies

pytestmark = pytest.mark.server

T0 = 1_700_000_000_000
POLICY = """
margin: 0
apis:
  hunting:
    lease_ttl: 10s
    limits:
      - {calls: 30, per: 2s, granularity: 100ms}
      - {calls: 1000, per: 1h}
      - {concurrent: 50}
"""
POLICIES = parse_policies(POLICY)
TWO_S = 2_000


@pytest.fixture
def engine(redis_client: Redis) -> Engine:
    return Engine(redis_client, POLICIES, learned_ttl_ms=60_000)


async def calls(engine: Engine, n: int, now: int, tenant: str = "t") -> int:
    """How many of n calls, answered at once, are granted at `now`."""
    granted = 0
    for _ in range(n):
        result = await engine.acquire(tenant, "hunting", now=now)
        if isinstance(result, Grant):
            granted += 1
            await engine.release(result.lease_id, "ok", now=now)
    return granted


async def throttled(engine: Engine, named: tuple[int, int], now: int, tenant: str = "t") -> object:
    lease = await engine.acquire(tenant, "hunting", now=now)
    assert isinstance(lease, Grant)
    released = await engine.release(
        lease.lease_id, "throttled", retry_after_ms=1, named=named, now=now
    )
    return released.learned


async def test_a_lower_named_limit_is_learned_and_applied(engine: Engine) -> None:
    learned = await throttled(engine, (20, TWO_S), T0)
    assert learned is not None and learned.code == "LOWERED"
    assert (learned.index, learned.amount, learned.before) == (1, 20, 30)
    later = T0 + 10_000  # past the pause and the window
    assert await calls(engine, 25, later) == 20
    denial = await engine.acquire("t", "hunting", now=later)
    assert isinstance(denial, Denial) and denial.amount == 20
    usage = await engine.usage("t", "hunting", now=later)
    first = usage.limits[0]
    assert (first.amount, first.limit.amount, first.remaining) == (20, 30, 0)
    other = await engine.usage("u", "hunting", now=later)
    assert other.limits[0].amount == 30  # another tenant keeps the policy's


async def test_it_never_rises_goes_lower_and_never_below_one(engine: Engine) -> None:
    await throttled(engine, (20, TWO_S), T0)
    kept = await throttled(engine, (25, TWO_S), T0 + 1)
    assert kept is not None and (kept.code, kept.amount) == ("KEPT", 20)
    lower = await throttled(engine, (10, TWO_S), T0 + 2)
    assert lower is not None and (lower.code, lower.amount, lower.before) == ("LOWERED", 10, 20)
    floor = await throttled(engine, (0, TWO_S), T0 + 3)
    assert floor is not None and floor.amount == 1


async def test_a_higher_or_unknown_limit_changes_nothing_and_is_a_hint_once(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quotagate")
    higher = await throttled(engine, (45, TWO_S), T0)
    assert higher is not None and (higher.code, higher.amount) == ("HIGHER", 30)
    await throttled(engine, (45, TWO_S), T0 + 1)
    unknown = await throttled(engine, (45, 60_000), T0 + 2)
    assert unknown is not None and unknown.code == "NO_LIMIT"
    hints = [r for r in caplog.records if r.getMessage().startswith("hint:")]
    assert len(hints) == 2  # once per named limit
    assert (await engine.usage("t", "hunting", now=T0 + 10_000)).limits[0].amount == 30


async def test_only_a_throttled_release_teaches(engine: Engine) -> None:
    lease = await engine.acquire("t", "hunting", now=T0)
    assert isinstance(lease, Grant)
    released = await engine.release(lease.lease_id, "ok", named=(5, TWO_S), now=T0)
    assert released.learned is None
    assert (await engine.usage("t", "hunting", now=T0)).limits[0].amount == 30


async def test_it_lapses_and_a_changed_policy_drops_it(redis_client: Redis) -> None:
    engine = Engine(redis_client, POLICIES, learned_ttl_ms=60_000)
    await throttled(engine, (20, TWO_S), T0)
    assert (await engine.usage("t", "hunting", now=T0 + 59_000)).limits[0].amount == 20
    assert (await engine.usage("t", "hunting", now=T0 + 60_001)).limits[0].amount == 30
    await throttled(engine, (20, TWO_S), T0 + 70_000)
    changed = Engine(redis_client, parse_policies(POLICY.replace("calls: 30", "calls: 40")))
    assert (await changed.usage("t", "hunting", now=T0 + 70_001)).limits[0].amount == 40


async def test_forget(engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="quotagate")
    await throttled(engine, (20, TWO_S), T0)
    assert any("learned limit" in r.getMessage() for r in caplog.records)
    assert await engine.forget("t", "hunting", now=T0 + 1) == 1
    assert await engine.forget("t", "hunting", now=T0 + 2) == 0
    assert (await engine.usage("t", "hunting", now=T0 + 3)).limits[0].amount == 30


def test_over_http(coordinator_url: str) -> None:
    with httpx.Client(base_url=coordinator_url) as http:
        lease = http.post("/v1/leases", json={"tenant": "t/app", "api": "fast"}).json()
        bad = http.post(
            f"/v1/leases/{lease['lease_id']}/release",
            json={"outcome": "throttled", "limit": {"amount": 0, "window": 1}},
        )
        assert bad.status_code == 422 and bad.json()["field"] == "limit"
        done = http.post(
            f"/v1/leases/{lease['lease_id']}/release",
            json={"outcome": "throttled", "retry_after": 0.01, "limit": {"amount": 7, "window": 1}},
        )
        assert done.status_code == 200, done.text
        first = http.get("/v1/usage/t/app/fast").json()["limits"][0]
        assert (first["amount"], first["configured"]) == (7, 20)
        assert http.delete("/v1/learned/t/app/fast").json() == {"forgotten": 1}
        first = http.get("/v1/usage/t/app/fast").json()["limits"][0]
        assert first["amount"] == first["configured"] == 20
        assert http.delete("/v1/learned/t/app/nothing").status_code == 404


# -- probing: above the assured share, one probe at a time, alone in flight -------------------

PROBING = parse_policies(
    """
margin: 0
apis:
  hunting:
    lease_ttl: 10s
    limits:
      - {calls: 10, per: 2s, granularity: 10ms, assured: 0.5}
"""
)


@pytest.fixture
def prober(redis_client: Redis) -> Engine:
    return Engine(redis_client, PROBING, learned_ttl_ms=60_000)


async def grant(engine: Engine, now: int) -> Grant:
    lease = await engine.acquire("t", "hunting", now=now)
    assert isinstance(lease, Grant), lease
    return lease


async def test_above_the_assured_share_a_probe_goes_alone(prober: Engine) -> None:
    held = [await grant(prober, T0) for _ in range(5)]  # assured: 5 of 10
    busy = await prober.acquire("t", "hunting", now=T0 + 1)
    assert isinstance(busy, Denial) and busy.soonest_ms == 0 and busy.retry_after_ms > 0
    for lease in held:
        await prober.release(lease.lease_id, "ok", now=T0 + 30)
    probe = await grant(prober, T0 + 40)  # nothing else in flight: the probe
    assert isinstance(await prober.acquire("t", "hunting", now=T0 + 41), Denial)
    await prober.release(probe.lease_id, "ok", now=T0 + 50)
    # It proved 6 (the five before it and itself): the next probe is the seventh.
    probe = await grant(prober, T0 + 60)
    await prober.release(probe.lease_id, "ok", now=T0 + 70)
    probe = await grant(prober, T0 + 80)
    assert isinstance(await prober.acquire("t", "hunting", now=T0 + 81), Denial)


@pytest.mark.parametrize("upstream", [False, True], ids=["measured", "upstream's own"])
async def test_a_probe_proves_the_calls_before_its_latest_arrival_only(
    prober: Engine, upstream: bool
) -> None:
    """A probe released 2.2 s after its grant, its run time 2.15 s: had the upstream said
    so, the probe arrived by 1.85 s and its window held the five granted at 0, which it
    proves too; a time the client measured says nothing of when the probe left, so its
    window may have started after those five arrived: it proves only itself."""
    tenant = f"t-{upstream}"

    async def take(now: int) -> Grant | Denial:
        return await prober.acquire(tenant, "hunting", now=now)

    for _ in range(5):
        lease = await take(T0)
        assert isinstance(lease, Grant)
        await prober.release(lease.lease_id, "ok", now=T0 + 30)
    probe = await take(T0 + 1_800)  # 5 in the window: the probe
    assert isinstance(probe, Grant)
    await prober.release(
        probe.lease_id, "ok", runtime_ms=2_150, runtime_upstream=upstream, now=T0 + 4_000
    )
    later = T0 + 10_000  # a fresh window; five held in flight, then a sixth
    held = [await take(later) for _ in range(5)]
    assert all(isinstance(lease, Grant) for lease in held)
    sixth = await take(later)
    if upstream:
        assert isinstance(sixth, Grant)  # 6 confirmed: not a probe
    else:
        assert isinstance(sixth, Denial) and sixth.soonest_ms == 0  # a probe: waits alone


async def test_a_throttled_probe_ends_probing_at_the_named_limit(prober: Engine) -> None:
    for _ in range(5):
        await prober.release((await grant(prober, T0)).lease_id, "ok", now=T0 + 10)
    probe = await grant(prober, T0 + 20)
    await prober.release(
        probe.lease_id, "throttled", retry_after_ms=1, named=(5, TWO_S), now=T0 + 30
    )
    later = T0 + 10_000  # a fresh window: 5 in force, all confirmed, no probing
    held = [await grant(prober, later) for _ in range(5)]
    assert len(held) == 5
    denial = await prober.acquire("t", "hunting", now=later)
    assert isinstance(denial, Denial) and denial.amount == 5 and denial.soonest_ms > 0


async def test_a_named_limit_at_the_policy_ends_probing(prober: Engine) -> None:
    probe = await grant(prober, T0)
    await prober.release(
        probe.lease_id, "throttled", retry_after_ms=1, named=(10, TWO_S), now=T0 + 1
    )
    later = T0 + 10_000
    held = [await grant(prober, later) for _ in range(10)]  # all at once: confirmed
    assert len(held) == 10


async def test_forget_drops_the_confirmed_level(prober: Engine) -> None:
    probe = await grant(prober, T0)
    await prober.release(
        probe.lease_id, "throttled", retry_after_ms=1, named=(8, TWO_S), now=T0 + 1
    )
    assert await prober.forget("t", "hunting", now=T0 + 2) == 1
    later = T0 + 10_000
    held = [await grant(prober, later) for _ in range(5)]
    busy = await prober.acquire("t", "hunting", now=later)
    assert len(held) == 5 and isinstance(busy, Denial) and busy.soonest_ms == 0


def test_assured_is_a_share_of_a_calls_limit() -> None:
    limit = PROBING.resolve("t", "hunting")
    assert limit is not None and limit.limits[0].assured == 5
    assert limit.describe()["limits"][0]["assured"] == 5
    plain = POLICIES.resolve("t", "hunting")
    assert plain is not None and "assured" not in plain.describe()["limits"][0]
    for bad in ("1.5", "-0.1", "yes"):
        with pytest.raises(ValueError, match="assured"):
            parse_policies(f"apis:\n  x:\n    limits: [{{calls: 4, per: 1s, assured: {bad}}}]\n")
    with pytest.raises(ValueError, match="calls limits only"):
        parse_policies("apis:\n  x:\n    limits: [{runtime: 4s, per: 1m, assured: 0.5}]\n")
