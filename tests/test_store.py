"""The coordinator's Redis client: redis-py's own, bounded, and recovering."""

from __future__ import annotations

import asyncio
import re
import signal
from collections.abc import Iterator

import httpx
import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import SentinelConnectionPool

from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer, free_port
from quotagate.coordinator.engine import Engine, Grant
from quotagate.coordinator.errors import BackendUnavailable
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.settings import Settings
from quotagate.coordinator.store import StoreRefused, StoreUrlError, check_credentials, connect

from .service import serve_in_thread

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
    # Reads and writes are bounded by the engine's deadline, not by a socket timeout.
    assert options["socket_timeout"] is None
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


async def test_a_write_that_cannot_finish_is_ended_by_the_deadline_and_the_client_recovers() -> (
    None
):
    # A stopped server reads nothing: a command larger than the socket buffers can only be
    # half written, and the deadline (the engine's `asyncio.timeout`) must end it; the
    # half-written connection is dropped, so the next command starts on a clean one.
    with EmbeddedServer() as server:
        client = connect(server.url, timeout=0.3)
        try:
            assert await client.ping()
            assert server.process is not None
            server.process.send_signal(signal.SIGSTOP)
            try:
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.3):
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


@pytest.mark.parametrize(
    ("url", "nodes", "master", "db"),
    [
        (
            "redis+sentinel://s1,s2:26380,[::1]:26381/qg",
            [("s1", 26379), ("s2", 26380), ("::1", 26381)],
            "qg",
            0,
        ),
        ("redis+sentinel://user:p%40ss@s1:5000/main/3", [("s1", 5000)], "main", 3),
    ],
)
async def test_sentinel_urls_name_the_sentinels_the_master_and_the_db(
    url: str, nodes: list[tuple[str, int]], master: str, db: int
) -> None:
    client = connect(url, timeout=1.5)
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == master
    assert pool.connection_kwargs["db"] == db
    # A master that does not answer within the timeout is asked for again (a failover).
    assert pool.connection_kwargs["socket_timeout"] == 1.5
    sentinels = pool.sentinel_manager.sentinels
    # A sentinel that does not answer within the timeout is skipped for the next one.
    assert {s.connection_pool.connection_kwargs["socket_timeout"] for s in sentinels} == {1.5}
    assert [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ] == nodes
    await client.aclose()


async def test_sentinel_credentials_go_to_both_unless_the_query_says_otherwise() -> None:
    both = connect("redis+sentinel://app:secret@s1/qg")
    alone = connect("redis+sentinel://app:secret@s1/qg?sentinel_username=&sentinel_password=")
    other = connect("redis+sentinel://app:secret@s1/qg?sentinel_password=watch")
    try:
        for client, sentinel_auth in (
            (both, ("app", "secret")),
            (alone, (None, None)),
            (other, ("app", "watch")),
        ):
            kwargs = client.connection_pool.connection_kwargs
            assert (kwargs["username"], kwargs["password"]) == ("app", "secret")
            sentinel = client.connection_pool.sentinel_manager.sentinels[0]
            options = sentinel.connection_pool.connection_kwargs
            assert (options.get("username"), options.get("password")) == sentinel_auth
    finally:
        for client in (both, alone, other):
            await client.aclose()


async def test_cluster_urls_list_the_startup_nodes() -> None:
    client = connect("redis+cluster://app:pw@n1:7000,n2?ssl=true&ssl_cert_reqs=none", timeout=1)
    assert isinstance(client, RedisCluster)
    assert [(n.host, n.port) for n in client.startup_nodes] == [
        ("n1", 7000),
        ("n2", 6379),
    ]
    await client.aclose()


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("http://localhost:6379", "scheme 'http'"),
        ("redis+sentinel://s1:26379", "name the master"),
        ("redis+sentinel://s1:26379/qg/x", "db 'x'"),
        ("redis+sentinel://s1:port/qg", "port 'port'"),
        ("redis+sentinel://s1/qg?sentinel_pasword=x", "unknown option 'sentinel_pasword'"),
        ("redis+cluster://n1,/", "a host is missing"),
        ("redis+cluster://n1/0", "one database"),
        ("redis+cluster://n1?ssl_ca_certs=/ca.pem", "without ssl=true"),
        ("redis+cluster://n1?ssl=maybe", "not true or false"),
        ("redis+cluster://n1:70000", "out of range"),
    ],
)
def test_malformed_urls_are_refused_naming_the_cause(url: str, cause: str) -> None:
    with pytest.raises(StoreUrlError, match=re.escape(cause)):
        connect(url)


async def test_a_malformed_url_stops_the_service_at_start() -> None:
    app = create_app(Settings(redis_url="redis+sentinel://s1:26379"), policies=POLICIES)
    with pytest.raises(StoreUrlError, match="name the master"):
        async with app.router.lifespan_context(app):
            pass


@pytest.fixture(scope="module")
def guarded() -> Iterator[EmbeddedServer]:
    """A server with an ACL user `app` (password `right`) and no default user."""
    with EmbeddedServer() as server:
        with redis.Redis(port=server.port) as admin:
            admin.acl_setuser("app", enabled=True, passwords=["+right"], keys=["~*"],
                              channels=["&*"], commands=["+@all"])  # fmt: skip
            admin.acl_setuser("default", enabled=False)
        yield server


@pytest.mark.parametrize(
    ("credentials", "refused"),
    [("app:right@", False), ("app:wrong@", True), ("", True), ("nobody:right@", True)],
)
async def test_credentials_are_checked_at_start(
    guarded: EmbeddedServer, credentials: str, refused: bool
) -> None:
    client = connect(f"redis://{credentials}127.0.0.1:{guarded.port}/0", timeout=1)
    try:
        if refused:
            with pytest.raises(StoreRefused, match="refused the credentials"):
                await check_credentials(client)
        else:
            await check_credentials(client)
    finally:
        await client.aclose()


async def test_a_store_that_is_down_is_no_reason_to_refuse() -> None:
    for url in (
        f"redis://127.0.0.1:{free_port()}/0",
        f"redis+sentinel://127.0.0.1:{free_port()}/qg",
        f"redis+cluster://127.0.0.1:{free_port()}",
    ):
        client = connect(url, timeout=0.5)
        try:
            await check_credentials(client, timeout=2)
        finally:
            await client.aclose()


async def test_wrong_credentials_stop_the_service_at_start(guarded: EmbeddedServer) -> None:
    url = f"redis://app:wrong@127.0.0.1:{guarded.port}/0"
    app = create_app(Settings(redis_url=url), policies=POLICIES)
    with pytest.raises(StoreRefused, match="invalid username-password pair"):
        async with app.router.lifespan_context(app):
            pass


def test_a_store_down_at_start_is_waited_for() -> None:
    port = free_port()
    settings = Settings(redis_url=f"redis://127.0.0.1:{port}/0", request_timeout=0.5)
    lease = {"tenant": "t", "api": "fast"}
    with serve_in_thread(create_app(settings, policies=POLICIES)) as url, httpx.Client() as http:
        assert http.get(f"{url}/readyz").status_code == 503
        assert http.post(f"{url}/v1/leases", json=lease).status_code == 503
        with EmbeddedServer(port=port):
            assert http.get(f"{url}/readyz").status_code == 200
            assert http.post(f"{url}/v1/leases", json=lease).status_code == 200


@pytest.mark.parametrize("topology", ["cluster", "replicated"])
async def test_wrong_credentials_on_a_topology_are_refused(
    request: pytest.FixtureRequest, topology: str
) -> None:
    url = request.getfixturevalue(topology).url.replace("://", "://nobody:wrong@")
    client = connect(url, timeout=1)
    try:
        with pytest.raises(StoreRefused, match="invalid username-password pair"):
            await check_credentials(client)
    finally:
        await client.aclose()
