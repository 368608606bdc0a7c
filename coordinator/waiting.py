"""Waiting acquires take turns: first come, first served per (tenant, api, key) within one
coordinator.

Only the waiter at the head of a line sleeps to the exact retry time and tries again; the
others wait behind it. Without the line, every waiter would wake at the same moment and
race for the freed budget, and the winners would be random.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class WaitLines:
    def __init__(self) -> None:
        self._lines: dict[tuple[str, str, str], tuple[asyncio.Lock, list[int]]] = {}

    def busy(self, scope: tuple[str, str, str]) -> bool:
        return scope in self._lines

    @asynccontextmanager
    async def turn(self, scope: tuple[str, str, str], timeout: float) -> AsyncIterator[bool]:
        """Wait up to `timeout` s for this scope's turn; yields whether it came."""
        lock, waiting = self._lines.setdefault(scope, (asyncio.Lock(), [0]))
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
                del self._lines[scope]
