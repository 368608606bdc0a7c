"""The coordinator's Redis client: hiredis packs the commands, the bytes stay redis-py's."""

from __future__ import annotations

import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import DataError
from redis.exceptions import TimeoutError as RedisTimeoutError

from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.store import (
    PackedConnection,
    PackedSSLConnection,
    PackedUnixDomainSocketConnection,
    connect,
)

names = st.sampled_from(["EVALSHA", "SET", "get", "CONFIG RESETSTAT", "CLIENT SETNAME"])
values = st.one_of(
    st.text(),
    st.binary(),
    st.integers(),
    st.floats(allow_nan=False),
    st.binary().map(memoryview),
    st.binary().map(bytearray),
)


def _wire(connection: Connection, *args: object) -> bytes:
    return b"".join(bytes(chunk) for chunk in connection.pack_command(*args))  # type: ignore[arg-type]


@given(name=names, args=st.lists(values, max_size=20))
def test_packed_bytes_are_redis_pys(name: str, args: list[object]) -> None:
    assert _wire(PackedConnection(), name, *args) == _wire(Connection(), name, *args)


@pytest.mark.parametrize("value", [True, None, object()])
def test_what_redis_py_refuses_is_still_refused(value: object) -> None:
    with pytest.raises(DataError):
        PackedConnection().pack_command("SET", "k", value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "kind", "db"),
    [
        ("redis://127.0.0.1:6379/2", PackedConnection, 2),
        ("rediss://127.0.0.1:6380", PackedSSLConnection, None),
        ("unix:///tmp/redis.sock?db=1", PackedUnixDomainSocketConnection, 1),
    ],
)
async def test_connect_keeps_the_schemes_connection_and_options(
    url: str, kind: type, db: int | None
) -> None:
    client = connect(url, socket_timeout=1.5)
    pool = client.connection_pool
    assert pool.connection_class is kind
    assert pool.connection_kwargs["socket_timeout"] == 1.5
    assert pool.connection_kwargs.get("db") == db
    await client.aclose()


async def test_connect_talks_to_a_real_server(valkey_server: EmbeddedServer) -> None:
    client = connect(valkey_server.url)
    try:
        assert await client.set("qg:test:packed", "é" * 3, px=5_000)
        assert (await client.get("qg:test:packed")).decode() == "é" * 3
        script = client.register_script("return {KEYS[1], ARGV[1], ARGV[2]}")
        assert await script(keys=["k"], args=[42, b"\x00\xff"]) == [b"k", b"42", b"\x00\xff"]
        await client.config_resetstat()  # a command name with a space
    finally:
        await client.delete("qg:test:packed")
        await client.aclose()


async def test_a_write_that_cannot_finish_times_out_and_the_client_recovers() -> None:
    # A stopped server reads nothing: a command larger than the socket buffers can only
    # be half written, and the write timeout (not a Task's) must end it.
    with EmbeddedServer() as server:
        client = connect(server.url, socket_timeout=0.3, retry=Retry(NoBackoff(), 0))
        try:
            assert await client.ping()
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(RedisTimeoutError, match="writing"):
                    await client.set("qg:test:big", b"x" * (64 << 20))
            finally:
                server.process.send_signal(signal.SIGCONT)
            # The same connection object, connected anew (the half-written one was
            # dropped), with its own timeout again for every read.
            connection = await client.connection_pool.get_connection()
            assert connection.socket_timeout == 0.3
            await client.connection_pool.release(connection)
            assert await client.ping()
            assert await client.exists("qg:test:big") == 0
        finally:
            await client.aclose()
