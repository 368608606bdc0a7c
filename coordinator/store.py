"""The coordinator's Redis client, on redis-py's public API.

One place turns a store URL into a client, so that redis-py's Sentinel and Cluster clients
can stand beside the plain one. Every command is bounded twice: redis-py's own socket
timeouts, and the engine's deadline for the whole decision (`Engine(timeout=...)`), which
also covers a reconnect and a script reload. redis-py drops a connection whose command was
cancelled half-way, so neither bound leaves a half-read reply behind.
"""

from __future__ import annotations

from redis.asyncio import Redis


def connect(url: str, *, timeout: float | None = None) -> Redis:
    """A client for `url` (`redis://`, `rediss://` or `unix://`, with redis-py's query
    options: `?ssl_ca_certs=...`, `?db=...`); `timeout` seconds bound each socket
    operation, and a connect at most one second of it."""
    connect_timeout = None if timeout is None else min(timeout, 1.0)
    return Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=connect_timeout)


__all__ = ["connect"]
