"""The gateway's releases off the critical path: one background sender per gateway.

A call whose answer has gone out hands its release here and the request ends. The
sender sends what has come in while the last batch was on its way as one batch: one
pipeline to the store, one round trip (`Engine.release_many`; not a transaction, each
release is its own script). Under load a release costs a fraction of a round trip,
alone it costs what it did. The store learns of an outcome a little later, which rule 3
of the design allows: a call's charge counts while its lease is in flight.

Nothing is lost silently: a batch the store did not take (BackendUnavailable) is sent
again after a backoff that doubles, each failure logged; one that fails `TRIES` times
is logged at WARNING with its count, and its leases expire at their time to live. A
release sent twice changes nothing the second time, so a batch is resent whole.
`aclose` drains what is queued, within `DRAIN_TIMEOUT`, and logs what it could not.
A throttled answer does not come here: its release, which pauses the fleet, is awaited
before the tool hears of the 429.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass

from .engine import Engine, Release
from .errors import BackendUnavailable, InvalidRequest, UnknownLease
from .waiting import Waiting

log = logging.getLogger("quotagate")

BATCH = 256  # releases per round trip at most
TRIES = 6  # tries per batch, the first included
FIRST_RETRY = 0.05  # seconds before the second try; doubles each time
LAST_RETRY = 1.0  # seconds, the longest wait between two tries
DRAIN_TIMEOUT = 5.0  # seconds `aclose` waits for the releases queued


@dataclass(frozen=True)
class Pending:
    release: Release
    tenant: str
    api: str


class ReleaseSender:
    def __init__(self, engine: Engine, waiting: Waiting) -> None:
        self.engine = engine
        self.waiting = waiting
        self._queue: deque[Pending] = deque()
        self._more = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._task: asyncio.Task[None] | None = None

    def send(self, release: Release, tenant: str, api: str) -> None:
        """Queue `release` (of a lease of tenant and api); it goes out with the next batch."""
        self._queue.append(Pending(release, tenant, api))
        self._drained.clear()
        self._more.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())

    async def aclose(self) -> None:
        """Send what is queued (within DRAIN_TIMEOUT), then stop the sender."""
        try:
            await asyncio.wait_for(self._drained.wait(), DRAIN_TIMEOUT)
        except TimeoutError:
            log.warning(
                "gateway: %d releases unsent at shutdown; their leases expire at their"
                " time to live",
                len(self._queue),
            )
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                # `aclose` itself cancelled: pass it on; the sender's own cancel: done.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
            self._task = None

    async def _run(self) -> None:
        while True:
            await self._more.wait()
            self._more.clear()
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                await self._send(batch)
            self._drained.set()

    async def _send(self, batch: list[Pending]) -> None:
        tries = 0
        while True:
            try:
                results = await self.engine.release_many([p.release for p in batch])
            except BackendUnavailable as exc:
                tries += 1
                if tries >= TRIES:
                    log.warning(
                        "gateway: releasing %d leases failed %d times (%s); they expire at"
                        " their time to live",
                        len(batch),
                        tries,
                        exc,
                    )
                    break
                delay = min(FIRST_RETRY * 2.0 ** (tries - 1), LAST_RETRY)
                log.warning(
                    "gateway: releasing %d leases failed: %s; trying again in %g s",
                    len(batch),
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            except Exception:  # a bug, not the store: said loudly, the sender goes on
                log.exception("gateway: releasing %d leases failed", len(batch))
                break
            for pending, result in zip(batch, results, strict=True):
                if isinstance(result, (UnknownLease, InvalidRequest)):
                    log.warning("gateway: releasing a lease of %s failed: %s", pending.api, result)
                elif result.woke:  # it freed something while its key's line held waiters
                    self.waiting.released(pending.tenant, pending.api)
            break


__all__ = ["BATCH", "DRAIN_TIMEOUT", "ReleaseSender"]
