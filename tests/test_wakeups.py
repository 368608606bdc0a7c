"""Wake-ups on every kind of store: two coordinators (each its own client, engine and
lines) share a line; a release through one that may let a waiter in wakes the other's
waiter through the store's sharded pub/sub. The waiters' heartbeat and every retry time
lie far beyond the hang detector, so a waiter granted (or answered) within it was woken
by a publication, not by a timer. Releases that cannot let a waiter in publish nothing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest
import redis

from quotagate.coordinator import codec
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Denial, Engine, Grant
from quotagate.coordinator.errors import BackendUnavailable
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.store import connect
from quotagate.coordinator.waiting import Ask, FleetLines, WakeUps

from .conftest import open_store
from .topologies import Cluster, Replicated, Topology, until

pytestmark = pytest.mark.server

T = TypeVar("T")

POLICIES = parse_policies(
    """
margin: 0
apis:
  slots:
    lease_ttl: 1m
    limits: [{calls: 1000, per: 1m}, {concurrent: 1}]
  calls:
    lease_ttl: 1m
    limits: [{calls: 1, per: 1m}]
  runtime:
    lease_ttl: 1m
    runtime_estimate: 10s
    limits: [{runtime: 10s, per: 1m}]
  learned:
    lease_ttl: 1m
    limits: [{calls: 2, per: 1m}]
  three:
    lease_ttl: 1m
    limits: [{calls: 3, per: 1m}]
  probing:
    lease_ttl: 1m
    limits: [{calls: 4, per: 1m, assured: 0.5}]
"""
)
HEARTBEAT = 600.0  # seconds: no waiter here tries again on its own within the test
HANG = 10.0  # a hang detector, far below the heartbeat and every retry time here


async def staying() -> bool:
    return False


@dataclass
class Pair:
    """Two coordinators on one store: `here` waits, `there` holds and releases."""

    here: FleetLines
    there: Engine

    async def waiting(self, tenant: str, api: str, count: int = 1) -> None:
        async with asyncio.timeout(HANG):
            while (await self.there.usage(tenant, api)).waiting < count:
                await asyncio.sleep(0.01)

    async def listening(self, tenant: str, api: str) -> None:
        async with asyncio.timeout(HANG):
            while not self.here.wakeups.listening(tenant, api):
                await asyncio.sleep(0.01)


@pytest.fixture
async def pair(store: Topology) -> AsyncIterator[Pair]:
    store.wipe()
    one, two = await open_store(store), await open_store(store)
    lines = FleetLines(Engine(one, POLICIES), heartbeat=HEARTBEAT)
    yield Pair(lines, Engine(two, POLICIES))
    await lines.aclose()
    await one.aclose()
    await two.aclose()


async def held(engine: Engine, api: str, tenant: str = "t") -> Grant:
    grant = await engine.acquire(tenant, api)
    assert isinstance(grant, Grant)
    return grant


async def settled(waiter: Awaitable[T]) -> T:
    async with asyncio.timeout(HANG):
        return await waiter


async def test_a_freed_slot_wakes_a_waiter_on_another_coordinator(pair: Pair) -> None:
    lease = await held(pair.there, "slots")
    waiter = asyncio.create_task(pair.here.acquire(Ask("t", "slots", wait=60), staying))
    await pair.waiting("t", "slots")
    assert (await pair.there.release(lease.lease_id, "ok")).woke
    assert isinstance(await settled(waiter), Grant)


async def test_a_kept_charge_wakes_nobody(pair: Pair) -> None:
    first = await held(pair.there, "calls")
    # Its soonest grant: the lease released now, its unit leaves the window in a minute.
    waiter = asyncio.create_task(pair.here.acquire(Ask("t", "calls", wait=90), staying))
    await pair.waiting("t", "calls")
    # Released ok, its unit stays counted (design rule 3): no waiter can be let in.
    assert not (await pair.there.release(first.lease_id, "ok")).woke
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_a_not_called_release_gives_the_unit_to_the_waiter(pair: Pair) -> None:
    lease = await held(pair.there, "calls")
    waiter = asyncio.create_task(pair.here.acquire(Ask("t", "calls", wait=90), staying))
    await pair.waiting("t", "calls")
    assert (await pair.there.release(lease.lease_id, "not_called")).woke
    assert isinstance(await settled(waiter), Grant)


async def test_a_refund_of_several_units_wakes_the_waiters_here_in_turn(pair: Pair) -> None:
    lease = await pair.there.acquire("t", "three", cost=3)
    assert isinstance(lease, Grant)
    waiters = []
    for number in range(3):  # one after the other: their order in line is known
        ask = Ask("t", "three", wait=90, holder=str(number))
        waiters.append(asyncio.create_task(pair.here.acquire(ask, staying)))
        await pair.waiting("t", "three", number + 1)
    # One wake-up: it wakes the first here, whose grant wakes the next, and so on.
    assert (await pair.there.release(lease.lease_id, "not_called")).woke
    granted = await settled(asyncio.gather(*waiters))
    assert all(isinstance(grant, Grant) for grant in granted)


async def test_run_time_at_the_estimate_wakes_nobody(pair: Pair) -> None:
    full = await held(pair.there, "runtime")  # 10 s estimated: the window is full
    ask = Ask("t", "runtime", runtime_estimate_ms=4_000, wait=90)
    waiter = asyncio.create_task(pair.here.acquire(ask, staying))
    await pair.waiting("t", "runtime")
    assert not (await pair.there.release(full.lease_id, "ok", runtime_ms=10_000)).woke
    assert not waiter.done()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter


async def test_run_time_below_the_estimate_wakes_the_waiter(pair: Pair) -> None:
    full = await held(pair.there, "runtime")  # 10 s estimated: the window is full
    ask = Ask("t", "runtime", runtime_estimate_ms=4_000, wait=90)
    waiter = asyncio.create_task(pair.here.acquire(ask, staying))
    await pair.waiting("t", "runtime")
    # 2 s of the 10 reserved ran: 8 s come back, enough for the waiter's 4.
    assert (await pair.there.release(full.lease_id, "ok", runtime_ms=2_000)).woke
    assert isinstance(await settled(waiter), Grant)


async def test_a_pause_wakes_the_waiter_to_its_new_soonest_grant(pair: Pair) -> None:
    lease = await held(pair.there, "slots")
    waiter = asyncio.create_task(pair.here.acquire(Ask("t", "slots", wait=60), staying))
    await pair.waiting("t", "slots")
    released = await pair.there.release(lease.lease_id, "throttled", retry_after_ms=300)
    assert released.woke
    # Woken, it learns the pause's end (its retry time now) and is granted then.
    assert isinstance(await settled(waiter), Grant)


async def test_a_pause_beyond_the_wait_answers_the_waiter_at_once(pair: Pair) -> None:
    lease = await held(pair.there, "slots")
    waiter = asyncio.create_task(pair.here.acquire(Ask("t", "slots", wait=30), staying))
    await pair.waiting("t", "slots")
    released = await pair.there.release(lease.lease_id, "throttled", retry_after_ms=120_000)
    assert released.woke
    denial = await settled(waiter)
    assert isinstance(denial, Denial) and denial.reason == "cooling_down"
    assert (await pair.there.usage("t", "slots")).waiting == 0


async def test_a_forgotten_learned_limit_wakes_the_waiter(pair: Pair) -> None:
    lease = await held(pair.there, "learned")
    # The upstream said 1 per minute: the tenant learns it, and its one call fills it.
    released = await pair.there.release(
        lease.lease_id, "throttled", retry_after_ms=1, named=(1, 60_000)
    )
    assert released.learned is not None and released.learned.code == "LOWERED"
    waiter = asyncio.create_task(pair.here.acquire(Ask("t", "learned", wait=90), staying))
    await pair.waiting("t", "learned")
    assert await pair.there.forget("t", "learned") == 1  # 2 per minute again
    assert isinstance(await settled(waiter), Grant)


async def test_the_end_of_the_calls_in_flight_lets_a_probe_go(pair: Pair) -> None:
    # Two calls are assured; a third is a probe, which goes only alone in flight.
    first, second = await held(pair.there, "probing"), await held(pair.there, "probing")
    waiter = asyncio.create_task(pair.here.acquire(Ask("t", "probing", wait=90), staying))
    await pair.waiting("t", "probing")
    assert (await pair.there.release(first.lease_id, "ok")).woke
    assert (await pair.there.release(second.lease_id, "ok")).woke
    assert isinstance(await settled(waiter), Grant)


def _tenants_on_every_master(cluster: Cluster) -> list[str]:
    homes: dict[int, str] = {}
    for n in range(1000):
        tenant = f"tenant-{n}"
        homes.setdefault(cluster.master_of(codec.wake_channel(tenant, "slots")).port, tenant)
        if len(homes) == len(cluster.masters):
            return list(homes.values())
    raise AssertionError("no tenant on some master")


async def test_on_a_cluster_wake_ups_come_from_every_master(cluster: Cluster) -> None:
    cluster.wipe()
    one, two = await open_store(cluster), await open_store(cluster)
    here, there = FleetLines(Engine(one, POLICIES), heartbeat=HEARTBEAT), Engine(two, POLICIES)
    try:
        tenants = _tenants_on_every_master(cluster)
        leases = []
        for tenant in tenants:
            lease = await there.acquire(tenant, "slots")
            assert isinstance(lease, Grant)
            leases.append(lease)
        waiters = [
            asyncio.create_task(here.acquire(Ask(tenant, "slots", wait=60), staying))
            for tenant in tenants
        ]
        async with asyncio.timeout(HANG):
            while not all(here.wakeups.listening(tenant, "slots") for tenant in tenants):
                await asyncio.sleep(0.01)
        for lease in reversed(leases):  # the last master's first
            assert (await there.release(lease.lease_id, "ok")).woke
        granted = await settled(asyncio.gather(*waiters))
        assert all(isinstance(grant, Grant) for grant in granted)
        assert not here.wakeups.channels()  # nobody waits: nothing subscribed
    finally:
        await here.aclose()
        await one.aclose()
        await two.aclose()


async def served(call: Callable[[], Awaitable[T]]) -> T:
    """`call` once the store answers again (after a failover)."""
    async with asyncio.timeout(30):
        while True:
            try:
                return await call()
            except BackendUnavailable:
                await asyncio.sleep(0.1)


async def test_wake_ups_go_on_after_a_sentinel_failover(replicated: Replicated) -> None:
    replicated.ready_for_failover()
    replicated.wipe()
    one, two = await open_store(replicated), await open_store(replicated)
    here, there = FleetLines(Engine(one, POLICIES), heartbeat=HEARTBEAT), Engine(two, POLICIES)
    pair = Pair(here, there)

    async def woken(tenant: str) -> None:
        lease = await served(lambda: held(there, "slots", tenant))
        waiter = asyncio.create_task(here.acquire(Ask(tenant, "slots", wait=60), staying))
        await pair.waiting(tenant, "slots")
        await pair.listening(tenant, "slots")
        assert (await there.release(lease.lease_id, "ok")).woke
        assert isinstance(await settled(waiter), Grant)

    try:
        await woken("before")
        before = replicated.master_port()
        replicated.failover()
        until("the failover to end", lambda: replicated.master_port() != before)
        replicated.settle()
        await woken("after")
    finally:
        await here.aclose()
        await one.aclose()
        await two.aclose()
        replicated.ready_for_failover()  # as found: a master and a replica in sync


def kill_pub_sub(store: Topology) -> int:
    """CLIENT KILL TYPE pubsub on every master of `store`; how many were killed."""
    if isinstance(store, Cluster):
        clients = [node.client() for node in store.masters]
    elif isinstance(store, Replicated):
        clients = [store.master().client()]
    else:
        clients = [redis.Redis.from_url(store.url)]
    killed = 0
    for client in clients:
        with client:
            killed += int(client.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
    return killed


async def test_wake_ups_go_on_after_the_pub_sub_connection_is_killed(
    store: Topology, pair: Pair
) -> None:
    lease = await held(pair.there, "slots")
    waiter = asyncio.create_task(pair.here.acquire(Ask("t", "slots", wait=60), staying))
    await pair.waiting("t", "slots")
    await pair.listening("t", "slots")
    assert kill_pub_sub(store) >= 1
    # Released at once: heard when the connection is back (each subscription, once
    # confirmed again, wakes its waiters), or published to it.
    assert (await pair.there.release(lease.lease_id, "ok")).woke
    assert isinstance(await settled(waiter), Grant)


def _clients(url: str) -> int:
    """Connections the server holds, besides the one asking."""
    with redis.Redis.from_url(url) as admin:
        return len(admin.client_list()) - 1


async def test_channels_joined_while_the_connection_opens_share_it(
    valkey_server: EmbeddedServer,
) -> None:
    """Subscriptions asked for while the pub/sub connection is being opened go on that one
    connection, and closing leaves none behind (redis-py's PubSub opens its connection in
    whichever command comes first: two at once would each open one, one of them unowned)."""
    before = _clients(valkey_server.url)
    client = connect(valkey_server.url)
    heard: list[tuple[str, str]] = []
    wakeups = WakeUps(client, lambda tenant, api: heard.append((tenant, api)))
    try:
        wakeups.join("t0", "slots")
        await asyncio.sleep(0)  # the node's task starts opening the connection
        for number in range(1, 8):
            wakeups.join(f"t{number}", "slots")
            await asyncio.sleep(0)
        async with asyncio.timeout(HANG):
            while not all(wakeups.listening(f"t{n}", "slots") for n in range(8)):
                await asyncio.sleep(0.01)
        assert _clients(valkey_server.url) == before + 1
    finally:
        await wakeups.aclose()
        await client.aclose()
    assert _clients(valkey_server.url) == before
