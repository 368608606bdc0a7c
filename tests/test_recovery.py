"""A store that loses its state: the epoch notices, and grants stay conservative."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.asyncio import Redis

from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Denial, Engine, Grant
from quotagate.coordinator.errors import BackendUnavailable
from quotagate.coordinator.policy import load_policies, parse_policies

pytestmark = pytest.mark.server

POLICIES = parse_policies(
    "apis: {p: {limits: [{calls: 10, per: 10s, granularity: 1s, margin: 0}, "
    "{calls: 100, per: 100s, granularity: 10s, margin: 0}]}}"
)
T0 = 1_700_000_000_000


async def grants(engine: Engine, n: int, now: int) -> int:
    """How many of `n` calls are granted at `now`; each is answered at once (released
    `ok` at `now`, so its charge sits in the bucket of `now`)."""
    granted = 0
    for _ in range(n):
        result = await engine.acquire("t", "p", now=now)
        if isinstance(result, Grant):
            granted += 1
            await engine.release(result.lease_id, "ok", now=now)
    return granted


async def test_a_lost_store_grants_a_share_until_each_window_passes(redis_client: Redis) -> None:
    engine = Engine(redis_client, POLICIES, recovery_share=0.5)
    assert await grants(engine, 12, T0) == 10
    await redis_client.flushall()  # the store restarts empty
    after = T0 + 1_000
    assert await grants(engine, 12, after) == 5  # half of 10: the window may hold 10 already
    denial = await engine.acquire("t", "p", now=after)
    assert isinstance(denial, Denial)
    assert denial.retry_after_ms == 10_000  # the 10 s window no longer overlaps the loss
    # Past the short window the short limit is whole again (once the 5 leave it)...
    assert await grants(engine, 12, after + 10_000) == 5
    assert await grants(engine, 12, after + 21_000) == 10
    # ...while the 100 s limit still grants only 50 until its window passes the loss.
    assert await grants(engine, 12, after + 32_000) == 10
    assert await grants(engine, 12, after + 43_000) == 10
    assert await grants(engine, 12, after + 54_000) == 10  # 50 in the 100 s window
    denial = await engine.acquire("t", "p", now=after + 65_000)
    assert isinstance(denial, Denial)
    assert denial.limit == POLICIES.apis["p"].limits[1]
    assert denial.retry_after_ms == 35_000  # when the 100 s window stops overlapping the loss
    assert await grants(engine, 12, after + 100_000) == 10


async def test_an_unknown_store_at_start_is_fresh_unless_told(redis_client: Redis) -> None:
    fresh = Engine(redis_client, POLICIES, recovery_share=0.5)
    assert await grants(fresh, 12, T0) == 10
    await redis_client.flushall()
    cautious = Engine(redis_client, POLICIES, recovery_share=0.2, loss_on_start=True)
    assert await grants(cautious, 12, T0) == 2


async def test_another_coordinator_learns_of_the_loss(redis_client: Redis) -> None:
    first = Engine(redis_client, POLICIES, recovery_share=0.5)
    second = Engine(redis_client, POLICIES, recovery_share=0.5)
    assert await grants(first, 4, T0) == 4
    assert await grants(second, 4, T0) == 4
    await redis_client.flushall()
    assert await grants(first, 3, T0 + 1) == 3  # notices, stamps the new epoch
    assert await grants(second, 10, T0 + 2) == 2  # sees another stamp, checks, recovers


async def test_a_state_that_expired_idle_is_fresh_not_lost(redis_client: Redis) -> None:
    engine = Engine(redis_client, POLICIES, recovery_share=0.5)
    assert await grants(engine, 4, T0) == 4
    state = "qg:{t|p}:s"
    epoch, until = await redis_client.hmget(state, "ep", "tx")
    assert epoch == f"{T0}:fresh".encode()
    assert int(until) >= T0 + 100_000  # outlives the longest window
    assert await redis_client.pttl(state) >= 100_000
    # Past the time it was sure to live, the state may be gone for good reason (its TTL).
    later = int(until) + 1
    await redis_client.flushall()
    assert await grants(engine, 12, later) == 10  # the whole limit, no recovery share
    assert (await redis_client.hget(state, "ep")) == f"{later}:fresh".encode()


async def test_a_loss_puts_only_its_own_hash_tags_into_recovery(redis_client: Redis) -> None:
    engine = Engine(redis_client, POLICIES, recovery_share=0.5)
    assert await grants(engine, 4, T0) == 4
    other = 0
    for _ in range(4):
        result = await engine.acquire("u", "p", now=T0)
        assert isinstance(result, Grant)
        await engine.release(result.lease_id, "ok", now=T0)
        other += 1
    # As a shard that restarted empty: only the keys of {t|p} are gone.
    lost = [key async for key in redis_client.scan_iter(match="qg:{t|p}*")]
    assert lost
    await redis_client.delete(*lost)
    assert await grants(engine, 12, T0 + 1) == 5  # half of 10, for the lost tag
    assert await redis_client.hget("qg:{t|p}:s", "ep") == f"{T0 + 1}:loss".encode()
    granted = 0
    for _ in range(12):
        result = await engine.acquire("u", "p", now=T0 + 1)
        granted += isinstance(result, Grant)
    assert granted == 10 - other  # the other tag is whole
    assert engine.recovery is None


async def _snapshot(redis: Redis, match: str) -> dict[bytes, tuple[int, bytes]]:
    """Every key of `match` as DUMP gives it, with its TTL."""
    return {
        key: (await redis.pttl(key), await redis.dump(key))
        async for key in redis.scan_iter(match=match)
    }


async def _restore(redis: Redis, match: str, snapshot: dict[bytes, tuple[int, bytes]]) -> None:
    """Back to `snapshot`: what a replica promoted before it received the writes since
    would hold."""
    later = [key async for key in redis.scan_iter(match=match) if key not in snapshot]
    if later:
        await redis.delete(*later)
    for key, (ttl, value) in snapshot.items():
        await redis.restore(key, max(ttl, 0), value, replace=True)


async def test_a_state_without_grants_the_engine_saw_written_is_a_loss(
    redis_client: Redis,
) -> None:
    """A failover to a replica that missed the last writes: the state is there, in the
    same epoch, but without grants the engine saw written. Another engine's grants on the
    new master since do not hide the gap (each engine counts its own)."""
    policies = parse_policies("apis: {p: {limits: [{calls: 20, per: 10s, granularity: 1s}]}}")
    first = Engine(redis_client, policies, recovery_share=0.5)
    second = Engine(redis_client, policies, recovery_share=0.5)
    assert await grants(first, 2, T0) == 2
    snapshot = await _snapshot(redis_client, "qg:{t|p}*")
    assert await grants(first, 4, T0) == 4  # written on the old master only
    await _restore(redis_client, "qg:{t|p}*", snapshot)
    assert await grants(second, 5, T0 + 1) == 5  # knew nothing lost: whole limit
    # The window may hold 11 upstream, the store shows 7: the share (10) is what is left.
    assert await grants(first, 20, T0 + 2) == 3
    assert await redis_client.hget("qg:{t|p}:s", "ep") == f"{T0 + 2}:loss".encode()
    assert await grants(second, 20, T0 + 3) == 0  # the others learn of it from the epoch
    # Nothing lost, nothing noticed: the same engines, the same store, a new tenant.
    for engine in (first, second, first):
        result = await engine.acquire("u", "p", now=T0)
        assert isinstance(result, Grant)
    assert await redis_client.hget("qg:{u|p}:s", "ep") == f"{T0}:fresh".encode()


async def test_a_restart_the_engine_saw_is_a_possible_loss(tmp_path: Path) -> None:
    # A restart (or failover) changes the run and replication ids: what was not yet
    # persisted (or replicated) may be gone, so every limit grants only the share.
    policies = parse_policies("apis: {p: {limits: [{calls: 10, per: 20s, margin: 0}]}}")
    server = EmbeddedServer(data_dir=tmp_path).start()
    try:
        client = Redis.from_url(server.url)
        engine = Engine(client, policies, recovery_share=0.5, timeout=1.0)
        await engine.check_store()
        for _ in range(4):
            assert isinstance(await engine.acquire("t", "p"), Grant)
        server.kill()
        server = EmbeddedServer(port=server.port, data_dir=tmp_path).start()
        granted = 0
        for _ in range(10):
            try:
                granted += isinstance(await engine.acquire("t", "p"), Grant)
            except BackendUnavailable:
                pass  # the old connection is gone: the next acquire reconnects
        assert engine.recovery is not None
        assert granted == 1  # 5 of 10 in recovery, 4 of them in flight from before
        await client.aclose()
    finally:
        server.stop()


async def test_the_append_only_file_keeps_everything_across_a_restart(tmp_path: Path) -> None:
    policies = load_policies()
    server = EmbeddedServer(data_dir=tmp_path).start()
    try:
        client = Redis.from_url(server.url)
        engine = Engine(client, policies, recovery_share=0.5)
        for _ in range(30):
            assert isinstance(await engine.acquire("t", "m365d.incidents"), Grant)
        await client.aclose()
        server.kill()  # as a crash would: no shutdown save
        server = EmbeddedServer(port=server.port, data_dir=tmp_path).start()
        client = Redis.from_url(server.url)
        engine = Engine(client, policies, recovery_share=0.5)
        usage = await engine.usage("t", "m365d.incidents")
        assert [lim.used for lim in usage.limits] == [30, 30]
        granted = 0
        for _ in range(25):
            granted += isinstance(await engine.acquire("t", "m365d.incidents"), Grant)
        assert granted == 20  # nothing lost, and no recovery share: 50 in all
        assert engine.recovery is None
        await client.aclose()
    finally:
        server.stop()
