"""The coordinator's Redis client: redis-py's own, bounded, and recovering."""

from __future__ import annotations

import signal

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Engine, Grant
from quotagate.coordinator.errors import BackendUnavailable
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.store import connect

POLICIES = parse_policies("apis: {fast: {limits: [{calls: 5, per: 1s}]}}", "<store>")


@pytest.mark.parametrize(
    ("url", "db"),
    [
        ("redis://127.0.0.1:6379/2", 2),
        ("rediss://127.0.0.1:6380", 0),
        ("unix:///tmp/r.sock?db=1", 1),
    ],
)
async def test_connect_keeps_the_urls_options_and_sets_the_timeouts(url: str, db: int) -> None:
    client = connect(url, timeout=1.5)
    options = client.connection_pool.connection_kwargs
    assert options["socket_timeout"] == 1.5
    assert options["socket_connect_timeout"] == 1.0
    assert options.get("db", 0) == db
    await client.aclose()


async def test_connect_talks_to_a_real_server(valkey_server: EmbeddedServer) -> None:
    client = connect(valkey_server.url, timeout=2.0)
    try:
        assert await client.set("qg:test:plain", "é" * 3, px=5_000)
        assert (await client.get("qg:test:plain")).decode() == "é" * 3
        script = client.register_script("return {KEYS[1], ARGV[1], ARGV[2]}")
        assert await script(keys=["k"], args=[42, b"\x00\xff"]) == [b"k", b"42", b"\x00\xff"]
        await client.config_resetstat()  # a command name with a space
    finally:
        await client.delete("qg:test:plain")
        await client.aclose()


async def test_a_write_that_cannot_finish_times_out_and_the_client_recovers() -> None:
    # A stopped server reads nothing: a command larger than the socket buffers can only be
    # half written, and the timeouts must end it; the half-written connection is dropped.
    with EmbeddedServer() as server:
        client = connect(server.url, timeout=0.3)
        try:
            assert await client.ping()
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(RedisTimeoutError):
                    await client.set("qg:test:big", b"x" * (64 << 20))
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert await client.ping()
            assert await client.exists("qg:test:big") == 0
        finally:
            await client.aclose()


async def test_a_frozen_store_makes_the_engine_unavailable_within_its_deadline() -> None:
    with EmbeddedServer() as server:
        client = connect(server.url, timeout=0.3)
        engine = Engine(client, POLICIES, timeout=0.5)
        try:
            assert isinstance(await engine.acquire("t", "fast"), Grant)
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(BackendUnavailable):
                    await engine.acquire("t", "fast")
            finally:
                server.process.send_signal(signal.SIGCONT)
            assert isinstance(await engine.acquire("t", "fast"), Grant)
        finally:
            await client.aclose()
