"""Waiting for a grant: the component between an acquire request and the engine.

`Waiting` is the interface the HTTP layer (and the gateway) use; `LocalLines` is the
implementation for one coordinator: waiting acquires take turns, first come, first served
per (tenant, api, key). Only the waiter at the head of a line sleeps and tries again; the
others wait behind it. Without the line, every waiter would wake at the same moment and
race for the freed budget, and the winners would be random. Nothing is reserved while
waiting, so a client that goes away leaves nothing behind.

The head sleeps to the exact retry time, or until a release on this coordinator wakes
it: a denial's retry time assumes that the leases in flight expire unreleased, and a
release usually comes much sooner. A request whose wait ends before even the soonest
grant (every lease in flight released at once) is answered at once. Releases through
another coordinator are seen by polling every `POLL` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from .engine import Denial, Engine, Grant, Outcome

Gone = Callable[[], Awaitable[bool]]  # whether the client has gone away
POLL = 0.25  # seconds between attempts while only a release can bring the grant in time


@dataclass(frozen=True)
class Ask:
    """One acquire as the caller asked for it."""

    tenant: str
    api: str
    key: str = ""
    cost: int = 1  # call units
    runtime_estimate_ms: int | None = None  # None: the policy's estimate
    wait: float = 0.0  # seconds the caller may be held, already capped by the server
    priority: int | str | None = None
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


_Line = tuple[str, str, str]


class LocalLines:
    """Lines within this coordinator process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lines: dict[_Line, tuple[asyncio.Lock, list[int]]] = {}
        self._wake: dict[tuple[str, str], asyncio.Event] = {}

    async def acquire(self, ask: Ask, gone: Gone) -> Grant | Denial | None:
        result = await self._wait_for_grant(ask, gone)
        if ask.wait > 0 and isinstance(result, Grant) and await gone():
            # Gone during the last attempt: the call will not happen, give the budget back.
            await self.engine.release(result.lease_id, Outcome.NOT_CALLED)
            return None
        return result

    def _attempt(self, ask: Ask) -> Awaitable[Grant | Denial]:
        return self.engine.acquire(ask.tenant, ask.api, ask.key, ask.cost, ask.runtime_estimate_ms)

    async def _wait_for_grant(self, ask: Ask, gone: Gone) -> Grant | Denial | None:
        """With nobody in line, the first attempt is at once, and a denial whose earliest
        grant lies beyond the wait is answered at once; otherwise the request queues
        behind the earlier waiters and sleeps to each exact retry time while it fits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ask.wait
        if ask.wait <= 0 or ask.line not in self._lines:
            result = await self._attempt(ask)
            if isinstance(result, Grant) or _hopeless(result, ask.wait):
                return result
        async with self._turn(ask.line, deadline - loop.time()) as ours:
            if not ours:  # the line did not move in time: say when to come back
                return await self._attempt(ask)
            while True:
                if await gone():
                    return None
                result = await self._attempt(ask)
                if isinstance(result, Grant):
                    return result
                left = deadline - loop.time()
                if _hopeless(result, left) or left <= 0:
                    return result
                pause = result.retry_after_ms / 1000
                await self._sleep(ask, pause if pause <= left else min(POLL, left))

    async def _sleep(self, ask: Ask, seconds: float) -> None:
        """Sleep `seconds`, or less if a lease of the same (tenant, api) is released."""
        event = self._wake.setdefault((ask.tenant, ask.api), asyncio.Event())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    def lines(self) -> dict[_Line, int]:
        """Read-only: the requests in line per (tenant, api, key) in this process, the
        one at the head included."""
        return {line: waiting[0] for line, (_, waiting) in self._lines.items()}

    def released(self, tenant: str, api: str) -> None:
        event = self._wake.pop((tenant, api), None)
        if event is not None:
            event.set()

    @asynccontextmanager
    async def _turn(self, line: _Line, timeout: float) -> AsyncIterator[bool]:
        """Wait up to `timeout` s for this line's turn; yields whether it came."""
        lock, waiting = self._lines.setdefault(line, (asyncio.Lock(), [0]))
        waiting[0] += 1
        try:
            try:
                async with asyncio.timeout(max(timeout, 0)):
                    await lock.acquire()
            except TimeoutError:
                yield False
                return
            try:
                yield True
            finally:
                lock.release()
        finally:
            waiting[0] -= 1
            if not waiting[0]:
                del self._lines[line]
                if not any(other[:2] == line[:2] for other in self._lines):
                    self._wake.pop(line[:2], None)


__all__ = ["Ask", "Gone", "LocalLines", "Waiting"]
