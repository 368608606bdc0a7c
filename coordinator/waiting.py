"""Waiting for a grant: the component between an acquire request and the engine.

`Waiting` is the interface the HTTP layer (and the gateway) use; `FleetLines` is the
implementation: one line per (tenant, api, key) in the store, shared by every
coordinator replica (acquire.lua: tickets ordered by priority class, then arrival). A
request is granted only when every limit has room for the waiters ahead of it and for
itself, so a newcomer never overtakes a waiter, whichever replica either came through,
and capacity that falls short goes to the head of the line.

A waiting request holds a ticket and tries again: at its exact retry time, when a
release on this coordinator wakes it, and at least every `HEARTBEAT` seconds, each try
refreshing its ticket (a ticket not refreshed for `TICKET_TTL_MS` leaves the line, so a
waiter whose coordinator died loses its place within two seconds). A waiter whose client
went away leaves the line at once. A request whose soonest grant (every lease in flight
released at once, the waiters ahead served first) lies beyond its wait is answered at
once: the script keeps no ticket for it. Nothing is reserved while waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from redis.exceptions import RedisError

from .engine import Denial, Engine, Grant, Outcome

log = logging.getLogger("quotagate")

Gone = Callable[[], Awaitable[bool]]  # whether the client has gone away
HEARTBEAT = 0.5  # seconds between a waiter's attempts at most: each refreshes its ticket


@dataclass(frozen=True)
class Ask:
    """One acquire as the caller asked for it."""

    tenant: str
    api: str
    key: str = ""
    cost: int = 1  # call units
    runtime_estimate_ms: int | None = None  # None: the policy's estimate
    wait: float = 0.0  # seconds the caller may be held, already capped by the server
    priority: str | None = None  # a class of the api's policy; None: its default
    holder: str | None = None

    @property
    def line(self) -> tuple[str, str, str]:
        return (self.tenant, self.api, self.key)


class Waiting(Protocol):
    async def acquire(self, ask: Ask, gone: Gone) -> Grant | Denial | None:
        """A grant, or the denial to answer with once the wait cannot end in a grant;
        None when the client went away (nothing is left reserved for it)."""

    def released(self, tenant: str, api: str) -> None:
        """A lease of (tenant, api) was released: its waiters may be granted now."""


def _hopeless(denial: Denial, left: float) -> bool:
    """Whether no release could bring a grant within `left` seconds."""
    return denial.soonest_ms < 0 or denial.soonest_ms / 1000 > left


WAKE_CHANNELS = "qg:*:w"  # release.lua publishes on qg:{<tenant>|<api>}:w
_CHANNEL = re.compile(r"^qg:\{(?P<tenant>[^|{}]+)\|(?P<api>[^|{}]+)\}:w$")


class FleetLines:
    """Lines in the store, shared by every coordinator replica.

    While any request of this coordinator waits, it listens to the releases published
    for waiters (release.lua), so a release through any replica wakes its waiters at
    once; without pub/sub (e.g. a Cluster client) they notice at the next heartbeat."""

    def __init__(self, engine: Engine, *, heartbeat: float = HEARTBEAT) -> None:
        self.engine = engine
        self.heartbeat = heartbeat
        self._wake: dict[tuple[str, str], asyncio.Event] = {}
        self._waiters = 0
        self._in_lines: dict[tuple[str, str, str], int] = {}  # this process's waiters
        self._listener: asyncio.Task[None] | None = None

    async def acquire(self, ask: Ask, gone: Gone) -> Grant | Denial | None:
        if ask.wait <= 0:
            return await self._attempt(ask, None, None)
        ticket = secrets.token_hex(12)
        deadline = asyncio.get_running_loop().time() + ask.wait
        result = await self._wait_for_grant(ask, gone, ticket, deadline)
        if isinstance(result, Grant) and await gone():
            # Gone during the last attempt: the call will not happen, give the budget back.
            await self.engine.release(result.lease_id, Outcome.NOT_CALLED)
            return None
        return result

    def _attempt(
        self, ask: Ask, ticket: str | None, left: float | None
    ) -> Awaitable[Grant | Denial]:
        return self.engine.acquire(
            ask.tenant,
            ask.api,
            ask.key,
            ask.cost,
            ask.runtime_estimate_ms,
            priority=ask.priority,
            ticket=ticket,
            line_wait_ms=None if left is None or left <= 0 else int(left * 1000),
        )

    async def _wait_for_grant(
        self, ask: Ask, gone: Gone, ticket: str, deadline: float
    ) -> Grant | Denial | None:
        self._waiters += 1
        self._in_lines[ask.line] = self._in_lines.get(ask.line, 0) + 1
        try:
            return await self._in_line(ask, gone, ticket, deadline)
        finally:
            self._waiters -= 1
            left = self._in_lines.pop(ask.line) - 1
            if left:
                self._in_lines[ask.line] = left
            if not self._waiters and self._listener is not None:
                listener, self._listener = self._listener, None
                listener.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await listener

    async def _in_line(
        self, ask: Ask, gone: Gone, ticket: str, deadline: float
    ) -> Grant | Denial | None:
        loop = asyncio.get_running_loop()
        queued = False
        while True:
            left = deadline - loop.time()
            result = await self._attempt(ask, ticket, left)
            if isinstance(result, Grant):
                return result
            if left <= 0 or _hopeless(result, left):
                if queued:  # the script keeps no ticket for it; this makes sure of it
                    await self.engine.leave(ask.tenant, ask.api, ask.key, ticket)
                return result
            queued = True
            if self._listener is None and hasattr(self.engine.redis, "pubsub"):
                self._listener = asyncio.create_task(self._listen())
            pause = min(
                result.retry_after_ms / 1000, self.heartbeat, max(deadline - loop.time(), 0)
            )
            await self._sleep(ask, pause)
            if await gone():
                await self.engine.leave(ask.tenant, ask.api, ask.key, ticket)
                return None

    async def _sleep(self, ask: Ask, seconds: float) -> None:
        """Sleep `seconds`, or less if a lease of the same (tenant, api) is released."""
        event = self._wake.setdefault((ask.tenant, ask.api), asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    def lines(self) -> dict[tuple[str, str, str], int]:
        """Read-only: the requests of this process waiting per (tenant, api, key)."""
        return dict(self._in_lines)

    def released(self, tenant: str, api: str) -> None:
        event = self._wake.pop((tenant, api), None)
        if event is not None:
            event.set()

    async def _listen(self) -> None:
        """Wake the waiters of each (tenant, api) whose release is published, until
        cancelled; a store error ends the listening (the heartbeat still serves)."""
        pubsub = self.engine.redis.pubsub()
        try:
            await pubsub.psubscribe(WAKE_CHANNELS)
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None:
                    continue
                channel = message["channel"]
                found = _CHANNEL.match(channel.decode() if isinstance(channel, bytes) else channel)
                if found:
                    self.released(found["tenant"], found["api"])
        except Exception as exc:  # no pub/sub here (or the store failed): poll instead
            log.info(
                "not listening for releases (%s): waiters poll every %g s", exc, self.heartbeat
            )
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


__all__ = ["Ask", "FleetLines", "Gone", "Waiting"]
