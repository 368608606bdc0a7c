"""The asyncio Redis client the coordinator talks to its store with.

redis-py's asyncio connections build every command in Python, at about a microsecond per
argument; its sync connections hand the same work to hiredis's C packer. An acquire sends
some twenty arguments, so the asyncio connections here use hiredis's packer too, and fall
back to redis-py's own for anything hiredis does not take (a command name with a space,
a memoryview, a bool to be refused). The bytes on the wire are the same.
"""

from __future__ import annotations

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


class PackedConnection(Connection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _pack(self, args) or super().pack_command(*args)


class PackedSSLConnection(SSLConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _pack(self, args) or super().pack_command(*args)


class PackedUnixDomainSocketConnection(UnixDomainSocketConnection):
    def pack_command(self, *args: EncodableT) -> list[bytes]:
        return _pack(self, args) or super().pack_command(*args)


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
