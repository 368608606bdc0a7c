"""Failover and shard loss on real topologies: a SENTINEL FAILOVER, a FLUSHALL on one
cluster master, and clients pointed at the wrong node. The store may say "again" or
"elsewhere"; the service answers 503 with Retry-After, never another 5xx, and grants
resume once the store has settled."""

from __future__ import annotations

import asyncio
import bisect
import gc
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from quotagate.coordinator import codec
from quotagate.coordinator.app import create_app
from quotagate.coordinator.engine import Engine, Grant
from quotagate.coordinator.errors import BackendUnavailable
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.settings import Settings
from quotagate.coordinator.store import connect

from .service import serve_in_thread
from .topologies import Cluster, Replicated, until

pytestmark = pytest.mark.server

# A master killed or failed over under load leaves redis-py holding a connection to it
# that it drops unclosed (its pool keeps in-use connections by weak reference): collected
# later, its socket warns. The store client's own behaviour is what these tests check;
# the warnings of those sockets are let pass here, and `under_load` collects them before
# it ends, so they do not turn up in a later test.
DROPPED_BY_REDIS_PY = (
    # Whichever object holds the socket when it is collected: redis-py's stream, the
    # loop's transport or handle, the socket itself.
    pytest.mark.filterwarnings(
        r"ignore:(?s)Exception ignored in.*ResourceWarning. (unclosed|loop is closed)"
        ":pytest.PytestUnraisableExceptionWarning"
    ),
)


def dropped_by_redis_py(test: Callable[..., None]) -> Callable[..., None]:
    for mark in DROPPED_BY_REDIS_PY:
        test = mark(test)
    return test


LIMIT, WINDOW_MS = 20, 1_000
POLICY_TEXT = f"""
margin: 0
apis:
  steady:
    lease_ttl: 5s
    limits: [{{calls: {LIMIT}, per: 1s, granularity: 100ms}}]
"""
POLICIES = parse_policies(POLICY_TEXT, "<failover>")
RECOVERY_SHARE = 0.5
RESUME_WITHIN_S = 15.0
WORKERS_PER_TENANT = 3


def wall_ms() -> float:
    return time.time() * 1000  # the clock Redis TIME reads on this machine


@dataclass
class Load:
    """What a run under load saw: every status, the 503s without Retry-After, and each
    granted call's arrival interval (from the grant's receipt to the release's sending:
    the upstream call happens in between) per tenant."""

    statuses: Counter[int] = field(default_factory=Counter)
    bare_503s: int = 0
    calls: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    grants_at: list[float] = field(default_factory=list)
    errors_at: list[float] = field(default_factory=list)
    disrupted_at: float = 0.0
    untouched: tuple[str, ...] = ()  # tenants whose shard lost nothing


async def _worker(url: str, tenant: str, load: Load, stop: asyncio.Event) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=10) as http:

        def record(response: httpx.Response) -> None:
            load.statuses[response.status_code] += 1
            if response.status_code >= 500:
                load.errors_at.append(wall_ms())
            if response.status_code == 503 and "retry-after" not in response.headers:
                load.bare_503s += 1

        while not stop.is_set():
            reply = await http.post("/v1/leases", json={"tenant": tenant, "api": "steady"})
            record(reply)
            if reply.status_code == 200:
                received = wall_ms()
                load.grants_at.append(received)
                sent = wall_ms()
                lease_id = reply.json()["lease_id"]
                record(await http.post(f"/v1/leases/{lease_id}/release", json={"outcome": "ok"}))
                load.calls.setdefault(tenant, []).append((received, sent))
            else:
                # Pacing, not waiting for a window: leave the two cores to the servers.
                await asyncio.sleep(0.05 if reply.status_code >= 500 else 0.01)


def run_load(url: str, tenants: list[str], disrupt: Callable[[], None]) -> Load:
    """Load for a second, `disrupt()`, and on until grants have flowed for two seconds
    after the last 5xx, or RESUME_WITHIN_S + 2 seconds have passed."""
    load = Load()

    async def main() -> None:
        stop = asyncio.Event()
        workers = [
            asyncio.create_task(_worker(url, tenant, load, stop))
            for tenant in tenants
            for _ in range(WORKERS_PER_TENANT)
        ]
        await asyncio.sleep(1.0)
        load.disrupted_at = wall_ms()
        await asyncio.to_thread(disrupt)
        deadline = load.disrupted_at + (RESUME_WITHIN_S + 2) * 1000
        while wall_ms() < deadline:
            await asyncio.sleep(0.1)
            last_error = max(load.errors_at, default=load.disrupted_at)
            if any(at > last_error + 2_000 for at in load.grants_at[-50:]):
                break
        stop.set()
        await asyncio.gather(*workers)

    asyncio.run(main())
    return load


def fullest_window(calls: list[tuple[float, float]], since: float = float("-inf")) -> int:
    """The most calls whose arrival interval meets one window [t, t + WINDOW_MS), over the
    windows that start at `since` or later: each of them may have arrived inside it."""
    starts = sorted(a for a, _ in calls)
    ends = sorted(b for _, b in calls)
    candidates = [b for b in ends if b >= since] + [a - WINDOW_MS + 0.001 for a in starts]
    best = 0
    for t in candidates:
        if t < since:
            continue
        best = max(best, bisect.bisect_left(starts, t + WINDOW_MS) - bisect.bisect_left(ends, t))
    return best


@dataclass(frozen=True)
class Scenario:
    name: str
    topology: str  # the session fixture
    disrupt: Callable[[Cluster | Replicated, list[str]], None]


def _tenants_on_two_shards(cluster: Cluster) -> list[str]:
    """Two tenants whose keys live on two different masters."""
    policy = POLICIES.apis["steady"]
    homes: dict[int, str] = {}
    for n in range(1000):
        tenant = f"tenant-{n}"
        home = cluster.master_of(codec.redis_keys(tenant, "steady", "", policy)[0])
        homes.setdefault(id(home), tenant)
        if len(homes) == 2:
            return list(homes.values())
    raise AssertionError("no two tenants on two shards")


def _failover(topology: Cluster | Replicated, tenants: list[str]) -> None:
    """SENTINEL FAILOVER, and wait (under load) until the sentinels name the new master."""
    assert isinstance(topology, Replicated)
    before = topology.master_port()
    topology.failover()
    until("the failover to end", lambda: topology.master_port() != before)
    topology.settle()


def _crash(topology: Cluster | Replicated, tenants: list[str]) -> None:
    """Kill the master; the sentinels promote the replica after `down-after-milliseconds`
    (1 s here); the old master comes back empty and is made a replica of the new one."""
    assert isinstance(topology, Replicated)
    victim = topology.master()
    victim.kill()
    until("the sentinels to promote the replica", lambda: topology.master_port() != victim.port)
    victim.start()
    topology.settle()


def _flush_home(topology: Cluster | Replicated, tenants: list[str]) -> None:
    """FLUSHALL on the master of the first tenant only."""
    assert isinstance(topology, Cluster)
    key = codec.redis_keys(tenants[0], "steady", "", POLICIES.apis["steady"])[0]
    with topology.master_of(key).client() as client:
        client.flushall()


SCENARIOS = [
    Scenario("sentinel-failover", "replicated", _failover),
    Scenario("sentinel-master-crash", "replicated", _crash),
    Scenario("cluster-flush-one-shard", "cluster", _flush_home),
]


@pytest.fixture(scope="module", params=SCENARIOS, ids=lambda s: s.name)
def under_load(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Scenario, Load]]:
    scenario: Scenario = request.param
    topology: Cluster | Replicated = request.getfixturevalue(scenario.topology)
    if isinstance(topology, Replicated):
        topology.ready_for_failover()
        tenants = ["tenant-a", "tenant-b"]
    else:
        tenants = _tenants_on_two_shards(topology)  # the first one's shard is flushed
    topology.wipe()
    policy_file = tmp_path_factory.mktemp("failover") / "policies.yaml"
    policy_file.write_text(POLICY_TEXT)
    settings = Settings(
        redis_url=topology.url,
        policies=policy_file,
        recovery_share=RECOVERY_SHARE,
        # The default 2 s: redis-py's own connect timeout (1 s) then ends a connect to a
        # node that is gone before the engine's deadline cancels it half-way.
        request_timeout=2.0,
    )
    app = create_app(settings)
    # On asyncio's own loop: uvloop's close waits on the sockets redis-py left open (see
    # DROPPED_BY_REDIS_PY), and then fails, long after the test.
    with serve_in_thread(app, loop="asyncio") as url:
        load = run_load(url, tenants, lambda: scenario.disrupt(topology, tenants))
        if isinstance(topology, Cluster):
            load.untouched = tuple(tenants[1:])  # only the first one's shard is flushed
    if isinstance(topology, Replicated):
        topology.settle()
    gc.collect()  # what the disruption left behind warns now (DROPPED_BY_REDIS_PY)
    yield scenario, load


@dropped_by_redis_py
def test_the_store_in_trouble_gives_503_with_retry_after_never_another_5xx(
    under_load: tuple[Scenario, Load],
) -> None:
    _, load = under_load
    print(dict(load.statuses))
    assert {status for status in load.statuses if status >= 500} <= {503}
    assert load.bare_503s == 0
    assert load.statuses[200] > 0


@dropped_by_redis_py
def test_grants_resume_within_15_s(under_load: tuple[Scenario, Load]) -> None:
    _, load = under_load
    last_error = max(load.errors_at, default=load.disrupted_at)
    later = [at for at in load.grants_at if at > last_error]
    assert later, "no grant after the last error"
    print(f"grants resumed {(later[0] - load.disrupted_at) / 1000:.2f} s after the disruption")
    assert later[0] - load.disrupted_at <= RESUME_WITHIN_S * 1000


@dropped_by_redis_py
def test_no_window_holds_more_than_the_recovery_rule_allows(
    under_load: tuple[Scenario, Load],
) -> None:
    """Before the disruption, no window holds more than the limit; a window that meets it
    holds at most the limit plus the recovery share (what was granted before a possible
    loss, and the share after it). A tenant on a shard that lost nothing keeps its limit."""
    _, load = under_load
    allowed = LIMIT + int(RECOVERY_SHARE * LIMIT)
    for tenant, calls in load.calls.items():
        before = [call for call in calls if call[1] < load.disrupted_at]
        print(tenant, "before:", fullest_window(before), "any:", fullest_window(calls))
        assert fullest_window(before) <= LIMIT
        assert fullest_window(calls) <= (LIMIT if tenant in load.untouched else allowed), tenant


async def test_a_client_on_a_replica_is_not_ready_and_its_writes_answer_503(
    replicated: Replicated,
) -> None:
    # A replica in sync, not only a master: a master that crashed in an earlier test
    # may come back as a master until the sentinels make it a replica.
    replicated.ready_for_failover()
    primary = replicated.master_port()
    replica = next(node for node in replicated.nodes if node.port != primary)
    client = connect(replica.url, timeout=1)
    engine = Engine(client, POLICIES, timeout=1)
    try:
        with pytest.raises(BackendUnavailable, match="not a writable master"):
            await engine.ready()
        with pytest.raises(BackendUnavailable):
            await engine.acquire("tenant-r", "steady")
        primary_client = connect(f"redis://127.0.0.1:{primary}/0", timeout=1)
        try:
            await Engine(primary_client, POLICIES, timeout=1).ready()
        finally:
            await primary_client.aclose()
    finally:
        await client.aclose()


async def test_a_plain_client_on_the_wrong_cluster_node_answers_503(cluster: Cluster) -> None:
    cluster.wipe()
    tenant = _tenants_on_two_shards(cluster)[0]
    key = codec.redis_keys(tenant, "steady", "", POLICIES.apis["steady"])[0]
    elsewhere = next(node for node in cluster.masters if node is not cluster.master_of(key))
    client = connect(elsewhere.url, timeout=1)
    engine = Engine(client, POLICIES, recovery_share=RECOVERY_SHARE, timeout=1)
    try:
        with pytest.raises(BackendUnavailable):  # MOVED: the plain client does not follow
            await engine.acquire(tenant, "steady")
    finally:
        await client.aclose()
    right = connect(cluster.url, timeout=1)
    try:
        engine = Engine(right, POLICIES, recovery_share=RECOVERY_SHARE, timeout=1)
        await engine.ready()
        assert isinstance(await engine.acquire(tenant, "steady"), Grant)
    finally:
        await right.aclose()


def test_the_cluster_client_follows_a_slot_that_moved(cluster: Cluster) -> None:
    """A slot migrated to another master between two decisions: the cluster client
    follows MOVED itself, and the scripts reload on the new node (NOSCRIPT)."""

    cluster.wipe()
    tenant = _tenants_on_two_shards(cluster)[0]
    key = codec.redis_keys(tenant, "steady", "", POLICIES.apis["steady"])[0]
    source = cluster.master_of(key)
    target = next(node for node in cluster.masters if node is not source)

    async def main() -> None:
        client = connect(cluster.url, timeout=1)
        engine = Engine(client, POLICIES, timeout=1)
        try:
            assert isinstance(await engine.acquire(tenant, "steady"), Grant)
            await asyncio.to_thread(cluster.move_slot_of, key, target)
            for node in cluster.masters:
                with node.client() as admin:
                    admin.script_flush()
            assert isinstance(await engine.acquire(tenant, "steady"), Grant)
            usage = await engine.usage(tenant, "steady")
            assert usage.limits[0].used == 2  # the state moved with its slot
        finally:
            await client.aclose()
            await asyncio.to_thread(cluster.move_slot_of, key, source)

    asyncio.run(main())
