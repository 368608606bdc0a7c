"""The coordinator's Redis client, on redis-py's public API.

One place turns a store URL into a client: redis-py's plain client for `redis://`,
`rediss://` and `unix://`, its Sentinel-managed client for `redis+sentinel://` and its
cluster client for `redis+cluster://`. Every command is bounded by the engine's deadline
for the whole decision (`Engine(timeout=...)`), which also covers a reconnect, a
re-discovery of the master and a script reload; redis-py drops a connection whose command
was cancelled half-way, so the bound leaves no half-read reply behind. Connects end by
redis-py's connect timeout. Socket timeouts on reads and writes are kept only where the
client itself acts on them: the queries to the sentinels (a sentinel that does not answer
is skipped for the next), the master found through them (a read that times out drops
the connection, and the retry asks the sentinels for the master again: during a failover
the old master pauses its clients, and a call left hanging there until the engine's
deadline got no retry on the new one) and the cluster's nodes (a node that does not
answer sends the client back to the slot map). On the connection to a single node they
would only repeat the engine's deadline, at the price of a task per write
(`asyncio.wait_for`).

URLs (values in the query are URL-encoded; ports default to 6379, sentinels' to 26379):

- `redis://[user:pass@]host[:port][/db][?option=...]`: `Redis`; `rediss://` the same over TLS;
- `unix://[user:pass@]/path/to/socket[?db=N]`: `Redis` on a Unix socket;
- `redis+sentinel://[user:pass@]host[:port][,host[:port]...]/<master>[/db]`:
  `Sentinel([...]).master_for(master)`, which asks the sentinels for the master on every
  new connection, so a failover moves the client to the new master;
- `redis+cluster://[user:pass@]host[:port][,host[:port]...]`:
  `RedisCluster(startup_nodes=[...])`, which follows MOVED and ASK itself.

TLS options, in the query of every scheme: `ssl_ca_certs` (CA bundle file),
`ssl_certfile` and `ssl_keyfile` (client certificate and its key), `ssl_cert_reqs`
(`required`, the default, `optional` or `none`), `ssl_check_hostname` (`true`/`false`).
`rediss://` is TLS by itself; the Sentinel and Cluster schemes take `ssl=true`.

Sentinel credentials: the URL's `user:pass` authenticate to the master (and its replicas)
and to the sentinels alike; `sentinel_username=` and `sentinel_password=` in the query
replace them for the sentinels only (`sentinel_password=` empty: sentinels without AUTH).
With `ssl=true` the sentinels are reached over TLS as well.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import parse_qs, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
)

# What the engine runs its scripts on: one node (plain or Sentinel-managed) or a cluster.
StoreClient: TypeAlias = Redis | RedisCluster

SENTINEL_PORT = 26379
REDIS_PORT = 6379
_BOOLEANS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
# Refusals of the credentials themselves, as opposed to a store that is down; the cluster
# and Sentinel clients wrap them into errors of their own, keeping the server's words.
_REFUSALS = (
    "WRONGPASS",
    "NOAUTH",
    "NOPERM",
    "invalid password",
    "invalid username-password pair",
    "Authentication required",
    "without any password configured",
    "no permissions",
)


class StoreUrlError(ValueError):
    """A store URL that cannot be used; the message names the cause, never the password."""


class StoreRefused(RuntimeError):
    """The store answered and refused the configured credentials."""


def connect(url: str, *, timeout: float | None = None) -> StoreClient:
    """A client for `url` (see the module's table). A connect takes at most one second
    or two thirds of `timeout`; `timeout` seconds bound each read and write to the
    sentinels, the master found through them and the nodes of a cluster (see above).
    Raises StoreUrlError for a URL that is malformed or names an unknown scheme or
    option."""
    # A connect ends by redis-py's own timeout, before the engine's deadline (the same
    # `timeout`) can cancel it half-way: a connect cancelled between the socket and the
    # handshake can leave the socket open.
    connect_timeout = None if timeout is None else min(timeout * 2 / 3, 1.0)
    # None, not omitted: redis-py's own default is a socket timeout of 5 s.
    bounds: dict[str, Any] = {"socket_timeout": None, "socket_connect_timeout": connect_timeout}
    moving_on = {**bounds, "socket_timeout": timeout}  # for clients that try another node
    scheme, _, _ = url.partition("://")
    if scheme == "redis+sentinel":
        return _sentinel(url, moving_on)
    if scheme == "redis+cluster":
        return _cluster(url, moving_on)
    if scheme not in ("redis", "rediss", "unix"):
        raise StoreUrlError(
            f"store URL scheme {scheme!r} is not one of redis, rediss, unix, "
            "redis+sentinel, redis+cluster"
        )
    try:
        return Redis.from_url(url, retry=_retry(), **bounds)
    except ValueError as exc:  # redis-py names the part it could not read
        raise StoreUrlError(f"store URL: {exc}") from None


def _retry() -> Retry:
    """Reconnect at once (to a re-discovered master, for Sentinel) a few times within the
    engine's deadline, rather than fail the decision on the first dropped connection."""
    return Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), retries=3)


@dataclass(frozen=True)
class _Parts:
    username: str | None
    password: str | None
    nodes: list[tuple[str, int]]
    path: list[str]
    options: dict[str, str]


def _split(url: str, default_port: int, allowed: tuple[str, ...]) -> _Parts:
    scheme = url.partition("://")[0]
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise StoreUrlError(f"{scheme} URL: {exc}") from None
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username: str | None = None
    password: str | None = None
    if userinfo:
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    nodes = [_node(scheme, host, default_port) for host in hosts.split(",")]
    options: dict[str, str] = {}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name not in allowed:
            raise StoreUrlError(
                f"{scheme} URL: unknown option {name!r} (known: {', '.join(allowed)})"
            )
        options[name] = values[-1]
    path = [unquote(p) for p in parts.path.split("/") if p]
    return _Parts(username, password, nodes, path, options)


def _node(scheme: str, text: str, default_port: int) -> tuple[str, int]:
    if text.startswith("["):  # an IPv6 literal: [::1]:26379
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise StoreUrlError(f"{scheme} URL: a host is missing in {text!r}")
    try:
        port = int(port_text) if port_text else default_port
    except ValueError:
        raise StoreUrlError(f"{scheme} URL: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise StoreUrlError(f"{scheme} URL: port {port} is out of range")
    return host, port


def _flag(scheme: str, options: dict[str, str], name: str, default: bool) -> bool:
    text = options.get(name)
    if text is None:
        return default
    if text.lower() not in _BOOLEANS:
        raise StoreUrlError(f"{scheme} URL: {name}={text!r} is not true or false")
    return _BOOLEANS[text.lower()]


def _tls(scheme: str, options: dict[str, str]) -> dict[str, Any]:
    if not _flag(scheme, options, "ssl", False):
        given = [name for name in (*_TLS_OPTIONS, "ssl_check_hostname") if name in options]
        if given:
            raise StoreUrlError(f"{scheme} URL: {', '.join(given)} given without ssl=true")
        return {}
    tls: dict[str, Any] = {"ssl": True}
    tls.update({name: options[name] for name in _TLS_OPTIONS if name in options})
    if "ssl_check_hostname" in options:
        tls["ssl_check_hostname"] = _flag(scheme, options, "ssl_check_hostname", True)
    return tls


def _sentinel(url: str, bounds: dict[str, Any]) -> Redis:
    """`bounds` (a socket timeout included) for the sentinels and the master alike."""
    allowed = ("ssl", *_TLS_OPTIONS, "ssl_check_hostname", *_SENTINEL_OPTIONS)
    parts = _split(url, SENTINEL_PORT, allowed)
    if not parts.path or len(parts.path) > 2:
        raise StoreUrlError("redis+sentinel URL: name the master: .../<master>[/db]")
    master, *rest = parts.path
    try:
        db = int(rest[0]) if rest else 0
    except ValueError:
        raise StoreUrlError(f"redis+sentinel URL: db {rest[0]!r} is not a number") from None
    tls = _tls("redis+sentinel", parts.options)
    sentinel_credentials = {"username": parts.username, "password": parts.password}
    for name in _SENTINEL_OPTIONS:
        if name in parts.options:
            sentinel_credentials[name.removeprefix("sentinel_")] = parts.options[name] or None
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        parts.nodes,
        sentinel_kwargs={**bounds, **tls, **sentinel_credentials},
        **bounds,
    )
    client: Redis = sentinel.master_for(
        master,
        connection_pool_class=_SentinelPool,
        db=db,
        retry=_retry(),
        username=parts.username,
        password=parts.password,
        **tls,
    )
    return client


class _SentinelPool(SentinelConnectionPool):
    """The master's pool, which also closes the sentinels' clients when it closes:
    `connect` returns one client, and closing it releases everything it opened."""

    async def aclose(self) -> None:
        try:
            await super().aclose()  # re-raises the first error of closing a connection
        finally:
            await self.sentinel_manager.aclose()


def _cluster(url: str, bounds: dict[str, Any]) -> RedisCluster:
    parts = _split(url, REDIS_PORT, ("ssl", *_TLS_OPTIONS, "ssl_check_hostname"))
    if parts.path:
        raise StoreUrlError("redis+cluster URL: a cluster has one database; remove the path")
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in parts.nodes],
        username=parts.username,
        password=parts.password,
        retry=_retry(),
        **bounds,
        **_tls("redis+cluster", parts.options),
    )


async def check_credentials(client: StoreClient, *, timeout: float | None = None) -> None:
    """Raise StoreRefused when the store (or a sentinel) answers and refuses the
    credentials; return when it accepts them, or cannot be reached within `timeout`
    seconds: a store that is down at start is waited for (`/readyz` answers 503 until it
    comes)."""
    try:
        async with asyncio.timeout(timeout):
            if isinstance(client, Redis) and isinstance(
                client.connection_pool, SentinelConnectionPool
            ):
                for sentinel in client.connection_pool.sentinel_manager.sentinels:
                    await _probe(sentinel, "a sentinel")
            await _probe(client, "the store")
    except TimeoutError:
        return


async def _probe(client: StoreClient, what: str) -> None:
    try:
        await client.ping()
    except Exception as exc:  # RedisCluster's "cannot be connected" is no RedisError
        refused = isinstance(exc, (AuthenticationError, AuthenticationWrongNumberOfArgsError))
        if refused or any(words in str(exc) for words in _REFUSALS):
            raise StoreRefused(f"{what} refused the credentials of the store URL: {exc}") from None
        # Down, unreachable, or an error that the first decision will show in full.


__all__ = ["StoreClient", "StoreRefused", "StoreUrlError", "check_credentials", "connect"]
