"""Waiting for a grant: the component between an acquire request and the engine.

`Waiting` is the interface the HTTP layer (and the gateway) use; `LocalLines` is the
implementation for one coordinator: waiting acquires take turns, first come, first served
per (tenant, api, key). Only the waiter at the head of a line sleeps to the exact retry
time and tries again; the others wait behind it. Without the line, every waiter would wake
at the same moment and race for the freed budget, and the winners would be random.
Nothing is reserved while waiting, so a client that goes away leaves nothing behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from .engine import Denial, Engine, Grant, Outcome

Gone = Callable[[], Awaitable[bool]]  # whether the client has gone away


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


class LocalLines:
    """Lines within this coordinator process."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lines: dict[tuple[str, str, str], tuple[asyncio.Lock, list[int]]] = {}

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
            if isinstance(result, Grant) or result.retry_after_ms / 1000 > ask.wait:
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
                pause = result.retry_after_ms / 1000
                if pause > deadline - loop.time():
                    return result
                await asyncio.sleep(pause)

    @asynccontextmanager
    async def _turn(self, line: tuple[str, str, str], timeout: float) -> AsyncIterator[bool]:
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


__all__ = ["Ask", "Gone", "LocalLines", "Waiting"]
