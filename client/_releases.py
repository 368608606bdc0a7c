"""Releases off the caller's critical path: one background sender per client.

A lease block or a transport hands its release to the client's sender and goes on; the
sender posts it to the coordinator, in the order given. The coordinator only learns of
the outcome a little later, which rule 3 of the design allows (a call's charge counts
while its lease is in flight).

- Bounded: while `size` releases are unfinished (waiting, being sent or waiting for a
  retry), the caller sends its own release itself. Back-pressure, nothing dropped.
- A release that fails with a transport error or a 5xx is tried again after a backoff
  that doubles (`retry_delay`), each failure logged; `unknown_lease` (the lease expired
  or was released already) is logged at debug and not retried. A release that fails for
  good, or is still unsent when the sender stops, is logged at WARNING with the lease
  id's prefix: an unreleased lease expires at its time to live.
- Drained on close (within `DRAIN_TIMEOUT`): the sync sender also at interpreter exit;
  the async sender by `aclose()`, and where its event loop ends first, each release lost
  with it is logged.

`ReleaseBook` holds the state both senders share, with time passed in as `now`; the
thread and the task only do the waiting and the I/O.
"""

from __future__ import annotations

import asyncio
import atexit
import heapq
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from .exceptions import CoordinatorUnavailable, QuotaError, UnknownLease

logger = logging.getLogger("quotagate.client")

QUEUE_SIZE = 256  # unfinished releases per client before callers send their own
TRIES = 6  # tries per release, the first included
FIRST_RETRY = 0.05  # seconds before the second try; doubles each time
LAST_RETRY = 1.0  # seconds, the longest wait between two tries
DRAIN_TIMEOUT = 5.0  # seconds close() waits for unfinished releases

Body = dict[str, Any]


def lease_prefix(lease_id: str) -> str:
    """What a log line shows of a lease id: its scope and the start of its random part,
    enough to tell leases apart, too little to release one."""
    scope, dot, token = lease_id.rpartition(".")
    return f"{scope}{dot}{token[:8]}…"


def retry_delay(tries: int) -> float | None:
    """Seconds to wait after `tries` failed tries, or None to give up."""
    if tries >= TRIES:
        return None
    return min(FIRST_RETRY * 2.0 ** (tries - 1), LAST_RETRY)


def retryable(exc: Exception) -> bool:
    """Whether a failed release may pass later: the coordinator was unreachable or
    answered 5xx. Anything else would fail again the same way."""
    if isinstance(exc, CoordinatorUnavailable):
        return True
    return isinstance(exc, QuotaError) and (exc.status_code or 0) >= 500


def log_unsent(lease_id: str, exc: Exception) -> None:
    """Log a release that failed and will not be tried again."""
    if isinstance(exc, UnknownLease):
        logger.debug("lease %s was gone at release: %s", lease_prefix(lease_id), exc)
    else:
        logger.warning(
            "releasing lease %s failed: %s; it expires at its time to live",
            lease_prefix(lease_id),
            exc,
        )


@dataclass(slots=True)
class Release:
    lease_id: str
    body: Body
    tries: int = 0  # tries made so far


class ReleaseBook:
    """The releases of one sender: waiting, due for a retry later, and being sent.

    Not thread-safe: the thread sender holds its lock around every call.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.unfinished = 0  # waiting, being sent, or waiting for a retry
        self.stopped = False  # no retries any more; add() refuses
        self._waiting: deque[Release] = deque()
        self._retries: list[tuple[float, int, Release]] = []  # heap of (due, tie, release)
        self._order = itertools.count()

    def add(self, lease_id: str, body: Body) -> bool:
        """Take a release to send; False when full or stopped (the caller sends it)."""
        if self.stopped or self.unfinished >= self.size:
            return False
        self._waiting.append(Release(lease_id, body))
        self.unfinished += 1
        return True

    def take(self, now: float) -> Release | float | None:
        """The next release to send now; else the seconds until a retry is due; else
        None, when nothing is left to send."""
        if self._waiting:
            release = self._waiting.popleft()
        elif self._retries and self._retries[0][0] <= now:
            release = heapq.heappop(self._retries)[2]
        elif self._retries:
            return self._retries[0][0] - now
        else:
            return None
        release.tries += 1
        return release

    def sent(self, release: Release) -> None:
        self.unfinished -= 1

    def failed(self, release: Release, exc: Exception, now: float) -> None:
        """Schedule a retry of a failed release, or give it up; either is logged."""
        delay = retry_delay(release.tries) if retryable(exc) and not self.stopped else None
        if delay is None:
            self.unfinished -= 1
            log_unsent(release.lease_id, exc)
            return
        logger.info(
            "releasing lease %s failed (try %d): %s; trying again in %.2f s",
            lease_prefix(release.lease_id),
            release.tries,
            exc,
            delay,
        )
        heapq.heappush(self._retries, (now + delay, next(self._order), release))

    def stop(self, why: str) -> int:
        """Give up every release not being sent, each logged; how many there were."""
        self.stopped = True
        left = [*self._waiting, *(entry[2] for entry in self._retries)]
        self._waiting.clear()
        self._retries.clear()
        for release in left:
            logger.warning(
                "lease %s not released: %s; it expires at its time to live",
                lease_prefix(release.lease_id),
                why,
            )
        self.unfinished -= len(left)
        return len(left)


SyncSend = Callable[[str, Body], None]
AsyncSend = Callable[[str, Body], Awaitable[None]]

_live: weakref.WeakSet[ReleaseThread | AsyncReleaseSender] = weakref.WeakSet()


@atexit.register
def _at_exit() -> None:
    for sender in list(_live):
        sender.at_exit()


class ReleaseThread:
    """The sync client's sender: one daemon thread, started with the first release."""

    def __init__(self, send: SyncSend, size: int = QUEUE_SIZE) -> None:
        self._send = send
        self._book = ReleaseBook(size)
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        _live.add(self)

    def put(self, lease_id: str, body: Body) -> bool:
        """Queue a release; False when the caller must send it itself."""
        with self._cond:
            if not self._book.add(lease_id, body):
                return False
            if self._thread is None or not self._thread.is_alive():  # first, or forked
                self._thread = threading.Thread(
                    target=self._run, name="quotagate-release", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
            return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until no release is left unfinished (each sent, or given up and logged);
        False when `timeout` seconds passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: self._book.unfinished == 0, timeout)

    def close(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Send what is queued (retries included, within `timeout` seconds), then stop."""
        self.flush(timeout)
        with self._cond:
            self._book.stop("the client closed before the coordinator took it")
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        _live.discard(self)

    def at_exit(self) -> None:
        self.close()

    def _next(self) -> Release | None:
        with self._cond:
            while True:
                due = self._book.take(time.monotonic())
                if isinstance(due, Release):
                    return due
                if due is None and self._book.stopped:
                    return None
                self._cond.wait(due)

    def _run(self) -> None:
        while (release := self._next()) is not None:
            try:
                self._send(release.lease_id, release.body)
            except Exception as exc:  # the thread must outlive any single failure
                with self._cond:
                    self._book.failed(release, exc, time.monotonic())
                    self._cond.notify_all()
                continue
            with self._cond:
                self._book.sent(release)
                self._cond.notify_all()


class AsyncReleaseSender:
    """The async client's sender: one task on the loop of the first release."""

    def __init__(self, send: AsyncSend, size: int = QUEUE_SIZE) -> None:
        self._send = send
        self._book = ReleaseBook(size)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._wake = asyncio.Event()  # something to send, or stop
        self._idle = asyncio.Event()  # nothing unfinished
        self._idle.set()
        _live.add(self)

    def put(self, lease_id: str, body: Body) -> bool:
        """Queue a release; False when the caller must send it itself."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop and not self._move_to(loop):
            return False
        if not self._book.add(lease_id, body):
            return False
        if self._task is None:
            self._task = loop.create_task(self._run(), name="quotagate-release")
        self._idle.clear()
        self._wake.set()
        return True

    def _move_to(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Serve `loop` from now on, unless the loop served so far still runs."""
        if self._closed or (self._loop is not None and not self._loop.is_closed()):
            return False  # closed, or used from two loops at once: callers send their own
        if self._book.unfinished:
            self._book.stop("its event loop closed before aclose()")
        self._book = ReleaseBook(self._book.size)
        self._loop, self._task = loop, None
        self._wake, self._idle = asyncio.Event(), asyncio.Event()
        self._idle.set()
        return True

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until no release is left unfinished (each sent, or given up and logged);
        False when `timeout` seconds passed first."""
        if self._loop is not asyncio.get_running_loop():
            return self._book.unfinished == 0
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self, timeout: float = DRAIN_TIMEOUT) -> None:
        """Send what is queued (retries included, within `timeout` seconds), then stop."""
        await self.flush(timeout)
        self._closed = True
        self._book.stop("the client closed before the coordinator took it")
        self._wake.set()
        task = self._task
        if task is not None and self._loop is asyncio.get_running_loop():
            await asyncio.wait([task])
        _live.discard(self)

    def at_exit(self) -> None:
        if self._book.unfinished:
            self._book.stop("the interpreter exited before aclose()")

    async def _run(self) -> None:
        book = self._book
        try:
            while True:
                due = book.take(time.monotonic())
                if isinstance(due, Release):
                    try:
                        await self._send(due.lease_id, due.body)
                    except asyncio.CancelledError:
                        book.failed(due, CoordinatorUnavailable("the event loop ended"), 0.0)
                        raise
                    except Exception as exc:  # the task must outlive any single failure
                        book.failed(due, exc, time.monotonic())
                    else:
                        book.sent(due)
                    if book.unfinished == 0:
                        self._idle.set()
                    continue
                if due is None and book.stopped:
                    return
                self._wake.clear()
                try:
                    async with asyncio.timeout(due):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        except asyncio.CancelledError:
            # The loop is ending (asyncio.run cancels what is left) without aclose().
            book.stop("its event loop ended before aclose()")
            raise
        finally:
            self._idle.set()
