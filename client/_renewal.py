"""Background renewal of leases held by long calls (advanced hunting, live response).

A lease is renewed when two thirds of its time to live have passed, which leaves a third
for the round trip and for retries if the coordinator is briefly away. Renewal stops when
the lease is unwatched (the call ended), when the coordinator no longer knows the lease,
or when a failed renewal leaves too little time to try again.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ._releases import lease_prefix
from .exceptions import UnknownLease
from .lease import Lease

logger = logging.getLogger("quotagate.client")

RENEW_AT = 2 / 3  # of the time to live
MIN_RETRY = 0.02  # seconds; a lease closer than twice this to expiry is given up


def renew_delay(expires_in: float) -> float:
    return expires_in * RENEW_AT


def retry_delay(deadline: float, now: float) -> float | None:
    """Seconds until the next try after a failed renewal, or None to give up."""
    left = deadline - now
    return left / 2 if left > 2 * MIN_RETRY else None


@dataclass(slots=True)
class _Watch:
    lease: Lease
    deadline: float  # monotonic time the lease expires unless renewed


class RenewalThread:
    """One daemon thread per client renews every watched lease on time."""

    def __init__(self, renew: Callable[[Lease], float]) -> None:
        self._renew = renew
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, str]] = []  # heap of (when, tie-break, lease id)
        self._watched: dict[str, _Watch] = {}
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._sleeping_until = math.inf  # monotonic time the thread waits until

    def watch(self, lease: Lease) -> None:
        now = time.monotonic()
        with self._cond:
            if self._closed:
                return
            self._watched[lease.lease_id] = _Watch(lease, now + lease.expires_in)
            self._schedule(lease.lease_id, now + renew_delay(lease.expires_in))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="quotagate-renewal", daemon=True
                )
                self._thread.start()

    def unwatch(self, lease: Lease) -> None:
        with self._cond:
            self._watched.pop(lease.lease_id, None)
            if len(self._due) > 2 * len(self._watched) + 64:
                # Most calls end long before their renewal is due; drop what they left
                # behind so the thread does not wake up for each of them.
                self._due = [entry for entry in self._due if entry[2] in self._watched]
                heapq.heapify(self._due)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._watched.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _schedule(self, lease_id: str, when: float) -> None:
        heapq.heappush(self._due, (when, next(self._order), lease_id))
        # Wake the thread only when it would sleep past this lease: most leases of a
        # client share one time to live, so a new one is due after those before it.
        if when < self._sleeping_until:
            self._cond.notify()

    def _next_due(self) -> _Watch | None:
        """Block until a watched lease is due (it is returned) or the thread must stop."""
        with self._cond:
            while not self._closed:
                while self._due and self._due[0][2] not in self._watched:
                    heapq.heappop(self._due)  # its call ended
                if not self._due:
                    self._sleep(None)
                    continue
                delay = self._due[0][0] - time.monotonic()
                if delay <= 0:
                    return self._watched[heapq.heappop(self._due)[2]]
                self._sleep(delay)
            return None

    def _sleep(self, delay: float | None) -> None:
        self._sleeping_until = math.inf if delay is None else time.monotonic() + delay
        try:
            self._cond.wait(delay)
        finally:
            self._sleeping_until = -math.inf  # awake: no need to notify

    def _run(self) -> None:
        while (watch := self._next_due()) is not None:
            started = time.monotonic()
            lease_id = watch.lease.lease_id
            try:
                expires_in = self._renew(watch.lease)
            except UnknownLease:
                self.unwatch(watch.lease)
                continue
            except Exception as exc:  # the thread must outlive any single failure
                logger.warning("renewing lease %s failed: %s", lease_prefix(lease_id), exc)
                delay = retry_delay(watch.deadline, time.monotonic())
                with self._cond:
                    if delay is None:
                        self._watched.pop(lease_id, None)
                    elif lease_id in self._watched:
                        self._schedule(lease_id, time.monotonic() + delay)
                continue
            with self._cond:
                if lease_id in self._watched:
                    watch.deadline = started + expires_in
                    self._schedule(lease_id, started + renew_delay(expires_in))


async def renew_in_background(
    lease: Lease,
    renew: Callable[[Lease], Awaitable[float]],
    deadline: float,
    delay: float | None,
) -> None:
    """Renew `lease` (expiring at monotonic `deadline`) every time `delay` seconds have
    passed, until cancelled (the call ended) or no longer possible."""
    while delay is not None:
        await asyncio.sleep(delay)
        started = time.monotonic()
        try:
            expires_in = await renew(lease)
        except UnknownLease:
            return
        except Exception as exc:  # keep trying while the lease lives
            logger.warning("renewing lease %s failed: %s", lease_prefix(lease.lease_id), exc)
            delay = retry_delay(deadline, time.monotonic())
            continue
        deadline = started + expires_in
        delay = renew_delay(expires_in)


class AsyncRenewal:
    """Renews one lease from the event loop while its call runs. Until the first renewal
    is due it costs a timer, not a task: most calls end long before."""

    def __init__(self, lease: Lease, renew: Callable[[Lease], Awaitable[float]]) -> None:
        self._loop = asyncio.get_running_loop()
        self._lease = lease
        self._renew = renew
        self._deadline = time.monotonic() + lease.expires_in
        self._task: asyncio.Task[None] | None = None
        self._timer = self._loop.call_later(renew_delay(lease.expires_in), self._start)

    def _start(self) -> None:
        renewing = renew_in_background(self._lease, self._renew, self._deadline, 0.0)
        self._task = self._loop.create_task(renewing, name="quotagate-renewal")

    async def stop(self) -> None:
        self._timer.cancel()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # unlike `await task`, never raises
