"""The asyncio Redis client the coordinator talks to its store with.

Two costs of redis-py's asyncio connections, per command, taken off here:

- Packing: they build every command in Python, at about a microsecond per argument; the
  sync connections hand the same work to hiredis's C packer. An acquire sends some twenty
  arguments, so the connections here use hiredis's packer too, and fall back to redis-py's
  own for anything hiredis does not take (a command name with a space, a memoryview, a
  bool to be refused). The bytes on the wire are the same.
- The write timeout: with a socket timeout set (as the coordinator always sets one, so
  that nothing hangs when Redis is gone), every write runs under `asyncio.wait_for`,
  which on Python 3.11 wraps it in a new Task: about 35 µs a command on a small machine.
  Here the write runs under `asyncio.timeout` instead, which only arms a timer (Python
  3.12 does the same inside `wait_for`). Same bound, same error: redis-py's
  `TimeoutError("Timeout writing to socket")`, and the connection is dropped.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import hiredis
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.connection import (
    AbstractConnection,
    Connection,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT


def _pack(connection: AbstractConnection, args: tuple[EncodableT, ...]) -> list[bytes] | None:
    """The command packed by hiredis, or None where redis-py's packer must decide."""
    head = args[0]
    if not isinstance(head, str) or " " in head or connection.encoder.encoding != "utf-8":
        return None
    try:
        # hiredis's stub types the tuple as one element long; any length is taken.
        return [hiredis.pack_command(args)]  # type: ignore[arg-type]
    except TypeError:
        return None


class _Lean(AbstractConnection):
    """hiredis packing and a write timeout without a Task (see the module's text)."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _pack(self, args) or super().pack_command(*args)

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        timeout = self.socket_timeout
        if not timeout:
            await super().send_packed_command(command, check_health)
            return
        # redis-py's own write, with its error handling, minus its wait_for: this
        # connection serves one command at a time, so its timeout is ours for the write.
        self.socket_timeout = None
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)
        except TimeoutError:
            await self.disconnect(nowait=True)
            raise RedisTimeoutError("Timeout writing to socket") from None
        finally:
            if self.socket_timeout is None:  # unless redis-py changed it meanwhile
                self.socket_timeout = timeout


class PackedConnection(_Lean, Connection):
    pass


class PackedSSLConnection(_Lean, SSLConnection):
    pass


class PackedUnixDomainSocketConnection(_Lean, UnixDomainSocketConnection):
    pass


_PACKED: dict[type[AbstractConnection], type[AbstractConnection]] = {
    Connection: PackedConnection,
    SSLConnection: PackedSSLConnection,
    UnixDomainSocketConnection: PackedUnixDomainSocketConnection,
}


def connect(url: str, **options: Any) -> Redis:
    """A client for `url` (`redis://`, `rediss://` or `unix://`, as redis-py reads them),
    whose connections pack commands with hiredis. `options` go to the connection pool,
    as with `Redis.from_url`; the URL's own options win, as there."""
    options.update(parse_url(url))
    kind = options.get("connection_class", Connection)
    options["connection_class"] = _PACKED.get(kind, kind)
    return Redis.from_pool(ConnectionPool(**options))


class Script:
    """A Lua script run by EVALSHA, loaded again when the server has lost it (NOSCRIPT):
    what redis-py's `AsyncScript` does, minus its per-call import and pipeline check
    (about 14 µs a call here; the engine never runs scripts in a pipeline)."""

    def __init__(self, redis: Redis, script: str) -> None:
        self.redis = redis
        self.script = script
        self.sha = hashlib.sha1(script.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str], args: Sequence[EncodableT]) -> Any:
        run = self.redis.execute_command
        try:
            return await run("EVALSHA", self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
        except NoScriptError:
            self.sha = await self.redis.script_load(self.script)
            return await run("EVALSHA", self.sha, len(keys), *keys, *args)  # type: ignore[no-untyped-call]
