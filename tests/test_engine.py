"""Example tests of the engine against a real server, in virtual time (`now` in ms)."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis
from redis.crc import key_slot

from quotagate.coordinator.engine import Denial, Engine, Grant, Release, Released
from quotagate.coordinator.errors import InvalidRequest, UnknownApi, UnknownLease
from quotagate.coordinator.policy import load_policies, parse_policies

pytestmark = pytest.mark.server

T0 = 1_700_000_000_000

POLICIES = parse_policies(
    """
margin: 0
apis:
  calls:
    lease_ttl: 10s
    limits: [{calls: 3, per: 10s, granularity: 1s}]
  sessions:
    lease_ttl: 10s
    limits: [{calls: 100, per: 10s}, {concurrent: 2}, {concurrent: 1, scope: key}]
  hunting:
    lease_ttl: 20s
    runtime_estimate: 5s
    limits: [{calls: 50, per: 10s}, {runtime: 12s, per: 10s, granularity: 1s}]
"""
)


@pytest.fixture
def engine(store_client: Redis) -> Engine:
    return Engine(store_client, POLICIES)


async def grant(engine: Engine, api: str, key: str = "", now: int = T0, **kw: int) -> Grant:
    result = await engine.acquire("contoso", api, key, now=now, **kw)
    assert isinstance(result, Grant), result
    return result


async def call(engine: Engine, api: str, key: str = "", now: int = T0, **kw: int) -> Grant:
    """A call answered at once: granted and released `ok` at the same moment, so its
    charge sits in the bucket of `now` (design rule 3)."""
    lease = await grant(engine, api, key, now=now, **kw)
    await engine.release(lease.lease_id, "ok", now=now)
    return lease


async def deny(engine: Engine, api: str, key: str = "", now: int = T0, **kw: int) -> Denial:
    result = await engine.acquire("contoso", api, key, now=now, **kw)
    assert isinstance(result, Denial), result
    return result


async def test_denial_names_the_limit_and_the_exact_wait(engine: Engine) -> None:
    await call(engine, "calls", now=T0 + 500)
    await call(engine, "calls", now=T0 + 2_300, cost=2)
    denial = await deny(engine, "calls", now=T0 + 4_000)
    assert denial.reason == "quota_exhausted"
    assert denial.limit == POLICIES.apis["calls"].limits[0]
    # The bucket [T0, T0+1s) stops counting once T0 + 1s <= now - 10s.
    assert denial.retry_after_ms == T0 + 11_000 - (T0 + 4_000)
    await deny(engine, "calls", now=T0 + 10_999)
    await grant(engine, "calls", now=T0 + 11_000)


async def test_unreleased_leases_free_their_slot_at_expiry(engine: Engine) -> None:
    await grant(engine, "sessions", "m1")
    denial = await deny(engine, "sessions", "m1", now=T0 + 1_000)
    assert denial.limit is not None and denial.limit.amount == 1
    assert denial.retry_after_ms == 9_000
    await grant(engine, "sessions", "m2", now=T0 + 1_000)
    api_wide = await deny(engine, "sessions", "m3", now=T0 + 2_000)
    assert api_wide.limit == POLICIES.apis["sessions"].limits[1]
    assert api_wide.retry_after_ms == 8_000  # the earliest expiry of the two
    await grant(engine, "sessions", "m1", now=T0 + 10_000)
    usage = await engine.usage("contoso", "sessions", "m1", now=T0 + 10_000)
    assert usage.in_flight == 2
    assert usage.limits[0].used == 3  # the expired lease's call stays counted


async def test_release_twice_is_a_no_op_that_says_so(engine: Engine) -> None:
    lease = await grant(engine, "calls")
    await engine.release(lease.lease_id, "not_called", now=T0 + 1)
    with pytest.raises(UnknownLease) as second:
        await engine.release(lease.lease_id, "ok", now=T0 + 2)
    assert second.value.reason == "unknown"
    usage = await engine.usage("contoso", "calls", now=T0 + 2)
    assert usage.limits[0].used == 0


async def test_release_after_expiry_changes_nothing(engine: Engine) -> None:
    lease = await grant(engine, "calls")
    with pytest.raises(UnknownLease) as late:
        await engine.release(lease.lease_id, "not_called", now=T0 + 10_000)
    assert late.value.reason == "expired"
    usage = await engine.usage("contoso", "calls", now=T0 + 10_000)
    assert usage.limits[0].used == 1


async def test_not_called_refunds_the_calls(engine: Engine) -> None:
    leases = [await grant(engine, "calls", now=T0 + i) for i in range(3)]
    await deny(engine, "calls", now=T0 + 10)
    await engine.release(leases[1].lease_id, "not_called", now=T0 + 20)
    await grant(engine, "calls", now=T0 + 30)


async def test_throttled_release_pauses_everyone_and_never_shortens(engine: Engine) -> None:
    first = await grant(engine, "sessions", "a")
    second = await grant(engine, "sessions", "b")
    await engine.release(first.lease_id, "throttled", retry_after_ms=8_000, now=T0 + 1_000)
    await engine.release(second.lease_id, "throttled", retry_after_ms=2_000, now=T0 + 2_000)
    denial = await deny(engine, "sessions", "c", now=T0 + 3_000)
    assert (denial.reason, denial.limit, denial.retry_after_ms) == ("cooling_down", None, 6_000)
    await grant(engine, "sessions", "c", now=T0 + 9_000)


async def test_throttled_without_retry_time_pauses_for_the_shortest_window(
    engine: Engine,
) -> None:
    lease = await grant(engine, "calls")
    await engine.release(lease.lease_id, "throttled", now=T0)
    denial = await deny(engine, "calls", now=T0)
    assert denial.retry_after_ms == 10_000


async def test_reported_runtime_replaces_the_estimate(engine: Engine) -> None:
    lease = await grant(engine, "hunting")
    view = await engine.usage("contoso", "hunting", now=T0)
    assert view.limits[1].used == 5_000
    await engine.release(lease.lease_id, "ok", runtime_ms=9_000, now=T0 + 3_000)
    view = await engine.usage("contoso", "hunting", now=T0 + 3_000)
    assert view.limits[1].used == 9_000
    denial = await deny(engine, "hunting", now=T0 + 3_000)
    assert denial.limit == POLICIES.apis["hunting"].limits[1]
    assert denial.retry_after_ms == 4_000 + 10_000 - 3_000  # the release-time bucket ends
    await grant(engine, "hunting", now=T0 + 3_000, runtime_estimate_ms=3_000)


async def test_the_upstreams_own_run_time_dates_the_calls_charge_back(engine: Engine) -> None:
    # Three calls of 3 in 10 s, granted at T0; each ran 4.5 s upstream, answered at
    # T0 + 5 s. The upstream's own processing time says each arrived by T0 + 0.5 s (1 ms
    # more, for a time rounded up): its calls are charged there (not before the grant),
    # its run time at the release.
    leases = [await grant(engine, "calls") for _ in range(3)]
    for lease in leases[:2]:
        await engine.release(
            lease.lease_id, "ok", runtime_ms=4_500, runtime_upstream=True, now=T0 + 5_000
        )
    # A time the client measured bounds nothing: that call is charged at its release.
    await engine.release(leases[2].lease_id, "ok", runtime_ms=4_500, now=T0 + 5_000)
    denial = await deny(engine, "calls", now=T0 + 10_000)
    assert denial.retry_after_ms == 1_000  # the bucket of T0 + 0.5 s leaves at T0 + 11 s
    await grant(engine, "calls", now=T0 + 11_000)
    await grant(engine, "calls", now=T0 + 11_000)
    await deny(engine, "calls", now=T0 + 11_000)  # the measured one counts until T0 + 16 s
    # Run time: still charged at the release, in full.
    hunt = await grant(engine, "hunting")
    await engine.release(
        hunt.lease_id, "ok", runtime_ms=9_000, runtime_upstream=True, now=T0 + 3_000
    )
    assert (await deny(engine, "hunting", now=T0 + 3_000)).retry_after_ms == 11_000
    view = await engine.usage("contoso", "hunting", now=T0 + 3_000)
    assert [u.used for u in view.limits] == [1, 9_000]
    assert view.limits[0].resets_in_ms == 8_000  # charged at T0 (its grant), not T0 - 6 s


async def test_a_lease_of_several_calls_ends_in_parts(engine: Engine) -> None:
    """A block of 3 call units: 1 called and 1 kept in flight (the third refunded), then
    the kept one called: 2 charged, none left in flight, room for one more."""
    block = await grant(engine, "calls", cost=3)
    await engine.release(block.lease_id, "ok", calls=1, keep=1, now=T0 + 100)
    view = await engine.usage("contoso", "calls", now=T0 + 100)
    assert (view.limits[0].used, view.in_flight) == (2, 1)  # 1 charged + 1 in flight
    await engine.release(block.lease_id, "ok", calls=1, now=T0 + 200)
    view = await engine.usage("contoso", "calls", now=T0 + 200)
    assert (view.limits[0].used, view.in_flight) == (2, 0)
    await grant(engine, "calls", now=T0 + 300)
    await deny(engine, "calls", now=T0 + 300)
    with pytest.raises(UnknownLease):
        await engine.release(block.lease_id, "ok", calls=0, now=T0 + 300)


async def test_parts_that_do_not_fit_the_lease_are_refused_naming_the_field(
    engine: Engine,
) -> None:
    block = await grant(engine, "calls", cost=2)
    before = await engine.usage("contoso", "calls", now=T0)
    with pytest.raises(InvalidRequest) as exceeds:
        await engine.release(block.lease_id, "ok", calls=2, keep=1, now=T0)
    assert exceeds.value.field == "calls"
    with pytest.raises(InvalidRequest) as negative:
        await engine.release(block.lease_id, "ok", keep=-1, now=T0)
    assert negative.value.field == "keep"
    assert await engine.usage("contoso", "calls", now=T0) == before
    # Only an api of calls limits alone, none probing: a slot or run time ends whole.
    for api in ("sessions", "hunting"):
        lease = await grant(engine, api)
        with pytest.raises(InvalidRequest, match="end whole"):
            await engine.release(lease.lease_id, "ok", calls=1, now=T0)
        await engine.release(lease.lease_id, "ok", now=T0)  # still live: it ends whole
    await engine.release(block.lease_id, "ok", calls=2, now=T0)


async def test_renew_extends_a_live_lease_only(engine: Engine) -> None:
    lease = await grant(engine, "sessions", "m1")
    assert await engine.renew(lease.lease_id, 30_000, now=T0 + 5_000) == 30_000
    await deny(engine, "sessions", "m1", now=T0 + 20_000)
    await engine.release(lease.lease_id, "ok", now=T0 + 21_000)
    with pytest.raises(UnknownLease):
        await engine.renew(lease.lease_id, now=T0 + 22_000)


async def test_bad_requests_are_refused_before_redis(engine: Engine) -> None:
    with pytest.raises(UnknownApi):
        await engine.acquire("contoso", "nope")
    for cost in (0, -1, 4):
        with pytest.raises(InvalidRequest) as err:
            await engine.acquire("contoso", "calls", cost=cost)
        assert err.value.field == "cost"
    with pytest.raises(InvalidRequest) as err:
        await engine.acquire("a{b}", "calls")
    assert err.value.field == "tenant"
    with pytest.raises(InvalidRequest) as err:
        await engine.acquire("contoso", "hunting", runtime_estimate_ms=13_000)
    assert err.value.field == "runtime_estimate"
    assert await engine.redis.dbsize() == 0


async def test_forged_lease_ids_are_unknown(engine: Engine) -> None:
    lease = await grant(engine, "calls")
    scope, _, token = lease.lease_id.partition(".")
    for forged in ("", "x", f"{scope}.{'0' * 32}", f"{scope}.{token.upper()}", f"{token}.{scope}"):
        with pytest.raises(UnknownLease):
            await engine.release(forged, "ok", now=T0 + 1)


async def test_redis_time_is_the_clock(engine: Engine) -> None:
    seconds, micros = await engine.redis.time()
    lease = await engine.acquire("contoso", "calls")
    assert isinstance(lease, Grant)
    assert abs(lease.granted_at_ms - (seconds * 1000 + micros // 1000)) < 5_000


async def test_scripts_reload_after_the_cache_is_flushed(engine: Engine) -> None:
    await grant(engine, "calls")
    await engine.redis.script_flush()
    await grant(engine, "calls", now=T0 + 1)


async def test_release_many_is_each_release_in_one_round_trip(engine: Engine) -> None:
    calls = [await grant(engine, "calls", now=T0 + i) for i in range(3)]
    session = await grant(engine, "sessions", "m1")
    gone = await grant(engine, "sessions", "m2")
    await engine.release(gone.lease_id, "ok", now=T0 + 5)
    results = await engine.release_many(
        [
            Release(calls[0].lease_id, "not_called"),
            Release(gone.lease_id, "ok"),  # released already: nothing changes
            Release("not-a-lease", "ok"),
            Release(calls[1].lease_id, "ok"),
            Release(session.lease_id, "throttled", retry_after_ms=4_000),
        ],
        now=T0 + 10,
    )
    assert [type(result) for result in results] == [
        Released,
        UnknownLease,
        UnknownLease,
        Released,
        Released,
    ]
    await grant(engine, "calls", now=T0 + 20)  # the refund freed one call
    await deny(engine, "calls", now=T0 + 21)
    paused = await deny(engine, "sessions", "m3", now=T0 + 1_000)
    assert (paused.reason, paused.retry_after_ms) == ("cooling_down", 3_010)
    usage = await engine.usage("contoso", "sessions", "m1", now=T0 + 1_000)
    assert usage.in_flight == 0


async def test_release_many_reloads_its_script(engine: Engine) -> None:
    leases = [await grant(engine, "calls", now=T0 + i) for i in range(3)]
    await engine.redis.script_flush()
    results = await engine.release_many(
        [Release(lease.lease_id, "not_called") for lease in leases], now=T0 + 10
    )
    assert all(isinstance(result, Released) for result in results)
    assert await engine.release_many([], now=T0 + 10) == []
    usage = await engine.usage("contoso", "calls", now=T0 + 10)
    assert usage.limits[0].used == 0


async def test_every_key_has_a_ttl_and_one_slot(engine: Engine) -> None:
    for api, key in (("calls", ""), ("sessions", "m1"), ("hunting", "")):
        lease = await engine.acquire("contoso", api, key)
        assert isinstance(lease, Grant)
        if api == "hunting":
            await engine.release(
                lease.lease_id, "throttled", retry_after_ms=5_000, runtime_ms=2_000
            )
    keys = [k.decode() for k in await engine.redis.keys("*")]
    assert len(keys) >= 8
    for name in keys:
        assert await engine.redis.pttl(name) > 0, name
    for api in ("calls", "sessions", "hunting"):
        slots = {key_slot(k.encode()) for k in keys if f"{{contoso|{api}}}" in k}
        assert len(slots) == 1


async def test_memory_of_a_full_hourly_window_stays_small(store_client: Redis) -> None:
    # As the service runs it: loss tracking on, so the state hash carries its epoch.
    engine = Engine(store_client, load_policies(), recovery_share=0.5)
    seconds, _ = await store_client.time()
    now, granted = seconds * 1000, 0
    while granted < 1500:
        result = await engine.acquire("tenant-1/app-1", "m365d.incidents", now=now)
        if isinstance(result, Grant):
            granted += 1
            await engine.release(result.lease_id, "ok", now=now)
            now += 37
        else:
            now += result.retry_after_ms
    usage = await engine.usage("tenant-1/app-1", "m365d.incidents", now=now)
    assert usage.limits[1].used == 1500
    total = 0
    for name in await store_client.keys("*"):
        total += await store_client.memory_usage(name) or 0
    print(f"memory for a full hourly window: {total} bytes")
    assert total <= 1536, total  # issue target: at most 1.5 KB
