"""What the httpx transports and the requests adapter share: which requests take a lease,
when a lease is too old to send on, what a denial becomes, and how an answer is released.
The transports and the adapter hold only the I/O of their library.

The outcome of a leased call, whatever library sent it:

| what happened                             | release                                        |
|-------------------------------------------|------------------------------------------------|
| the request could not connect             | `not_called` (the charge is refunded)          |
| it failed after that                      | `failed`, runtime                              |
| answer read, throttled (429 or its codes) | `throttled`, status, retry_after, limit, runtime |
| answer read, status below 400             | `ok`, status, runtime                          |
| answer read, other status                 | `failed`, status, runtime                      |
| answer's body broke off                   | `failed`, status (`throttled` if the headers say so) |

retry_after and limit are sent when the answer names them ("maximum allowed N per
hh:mm:ss" is the limit, `{amount, window}`).
runtime is `Stats.ExecutionTime` of a hunting answer, else the measured wall time.

A lease is sent on only while it has time left: the lease's `expires_in` runs from the
moment its acquire reply arrived, on the sender's own monotonic clock. One that has less
than `headroom` left (at most a quarter of its time to live) is released as `not_called`
and a new one is taken. Released rather than left to expire: a lease the coordinator
still holds is refunded at once (an expired one would be charged as if the call had
happened, design rule 7), and one it already let go answers `unknown_lease`, which
changes nothing.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from contextlib import AsyncExitStack, ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from .exceptions import QuotaError, QuotaExhausted, UnroutedRequest
from .lease import Lease
from .parsing import parse_throttle
from .routes import Route, RouteMatch, RouteTable, endpoint_key, normalise_path

if TYPE_CHECKING:
    from ._async import AsyncQuotaClient
    from ._sync import QuotaClient

logger = logging.getLogger("quotagate.client")

OnExhausted = Literal["raise", "respond"]
Unrouted = Literal["pass", "warn", "raise"]
HEADROOM = 1.0  # seconds a lease must have left when its call is sent ...
HEADROOM_SHARE = 0.25  # ... but no more than this share of its time to live
REACQUIRES = 3  # leases in a row that may turn out too old before the call gives up
#: The header of an answer that quotagate made up (`on_exhausted="respond"`): the call was
#: never sent upstream. Its value is the coordinator's error code.
DENIED_HEADER = "X-Quotagate-Denied"


def as_table(routes: RouteTable | Iterable[Route]) -> RouteTable:
    return routes if isinstance(routes, RouteTable) else RouteTable(routes, defaults=())


def clock_text(seconds: float) -> str:
    """`hh:mm:ss`, the way Microsoft writes a window."""
    whole = math.ceil(seconds)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


@dataclass(frozen=True, slots=True)
class Answer:
    """An upstream-shaped answer made without calling the upstream."""

    status_code: int
    headers: dict[str, str]
    body: bytes


def exhausted_answer(denial: QuotaExhausted) -> Answer:
    """The 429 a Defender API gives when its quota is spent, for a lease that did not come:
    `Retry-After` in whole seconds (rounded up, at least 1, the form every client reads)
    and the body of `coordinator/defender.md`, "Throttled answers", naming the limit that
    bound the denial when the coordinator said which."""
    seconds = max(1, math.ceil(denial.retry_after))
    limit = denial.limit or {}
    named = ""
    if limit.get("kind") == "calls" and limit.get("amount") and limit.get("window"):
        named = f"Maximum allowed {limit['amount']} per {clock_text(limit['window'])}. "
    message = (
        f"API calls quota exceeded! {named}quotagate granted no lease in time "
        f"({denial.code}). You can send requests again in {seconds} seconds."
    )
    body = {"error": {"code": "429", "message": message, "target": "quotagate"}}
    headers = {
        "Content-Type": "application/json",
        "Retry-After": str(seconds),
        DENIED_HEADER: denial.code or "quota_exhausted",
    }
    return Answer(429, headers, json.dumps(body).encode())


def settle_broken(
    lease: Lease, status_code: int, headers: Mapping[str, str], runtime: float
) -> None:
    """Record the outcome of an answer whose body broke off: the call failed, unless its
    status line and headers already say throttled."""
    throttle = parse_throttle(status_code, headers, b"")
    if throttle is None:
        lease.set_outcome("failed", status_code, runtime=runtime)
    else:
        lease.set_outcome("throttled", status_code, throttle.retry_after, runtime)


class Gate:
    """The policy of one transport or adapter: `routes`, `wait` (seconds the coordinator may
    hold an acquire), `priority` (a class of the api's policy, for every lease), and
    `on_exhausted`, `unrouted`, and the clock the lease age is read on."""

    def __init__(
        self,
        routes: RouteTable | Iterable[Route],
        *,
        wait: float,
        on_exhausted: OnExhausted,
        unrouted: Unrouted,
        headroom: float = HEADROOM,
        clock: Callable[[], float] = time.monotonic,
        priority: str | None = None,
    ) -> None:
        if on_exhausted not in ("raise", "respond"):
            raise ValueError(f"on_exhausted must be 'raise' or 'respond', not {on_exhausted!r}")
        if unrouted not in ("pass", "warn", "raise"):
            raise ValueError(f"unrouted must be 'pass', 'warn' or 'raise', not {unrouted!r}")
        self.routes = as_table(routes)
        self.wait = wait
        self.priority = priority
        self.on_exhausted: OnExhausted = on_exhausted
        self.unrouted: Unrouted = unrouted
        self.headroom = headroom
        self.clock = clock
        self.known_hosts = self.routes.hosts()
        self._warned: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    # -- routing ------------------------------------------------------------------------

    def route(self, method: str, host: str, path: str) -> RouteMatch | None:
        """(api, key) of a request, or None to send it without a lease. `path` is the
        URL's path, percent-encoded or not. A miss on a known host is told as
        `unrouted` says; other hosts pass."""
        path = normalise_path(path)
        host = host.lower()
        found = self.routes.match_normal(method, host, path)
        if found is None and self.unrouted != "pass" and host in self.known_hosts:
            template = endpoint_key(method, path)
            if self.unrouted == "raise":
                raise UnroutedRequest(
                    f"{template} on {host} matches no route: add one to the route table, "
                    "or build the transport with unrouted='pass' or 'warn'"
                )
            with self._lock:
                first = (host, template) not in self._warned
                self._warned.add((host, template))
            if first:
                logger.warning(
                    "%s on %s matches no route: sent without a lease (told once per host "
                    "and path template; unrouted='pass' silences it)",
                    template,
                    host,
                )
        return found

    # -- leases -------------------------------------------------------------------------

    def expiring(self, lease: Lease, acquired_at: float, now: float) -> bool:
        """Whether `lease`, whose acquire reply arrived at `acquired_at`, has too little
        time left at `now` to send its call on (both on `clock`)."""
        left = acquired_at + lease.expires_in - now
        return left <= min(self.headroom, lease.expires_in * HEADROOM_SHARE)

    def _denied(self, denial: QuotaExhausted) -> QuotaExhausted:
        if self.on_exhausted == "raise":
            raise denial
        return denial

    @contextmanager
    def held(self, client: QuotaClient, found: RouteMatch) -> Iterator[Lease | QuotaExhausted]:
        """A lease for `found` with time left to send on, released when the block ends;
        with `on_exhausted="respond"` the denial instead of raising it."""
        for _ in range(REACQUIRES):
            with ExitStack() as stack:
                denial: QuotaExhausted | None = None
                try:
                    lease = stack.enter_context(
                        client.lease(found.api, found.key, wait=self.wait, priority=self.priority)
                    )
                except QuotaExhausted as exc:
                    denial = self._denied(exc)
                if denial is not None:
                    yield denial
                    return
                acquired_at = self.clock()  # the acquire reply has just arrived
                # What follows the yield is the inner send: this is the last look.
                if not self.expiring(lease, acquired_at, self.clock()):
                    yield lease
                    return
                self._stale(lease)
        raise self._too_short(found)

    @asynccontextmanager
    async def aheld(
        self, client: AsyncQuotaClient, found: RouteMatch
    ) -> AsyncIterator[Lease | QuotaExhausted]:
        """The asyncio twin of `held`."""
        for _ in range(REACQUIRES):
            async with AsyncExitStack() as stack:
                denial = None
                try:
                    lease = await stack.enter_async_context(
                        client.lease(found.api, found.key, wait=self.wait, priority=self.priority)
                    )
                except QuotaExhausted as exc:
                    denial = self._denied(exc)
                if denial is not None:
                    yield denial
                    return
                acquired_at = self.clock()  # the acquire reply has just arrived
                # What follows the yield is the inner send: this is the last look.
                if not self.expiring(lease, acquired_at, self.clock()):
                    yield lease
                    return
                self._stale(lease)
        raise self._too_short(found)

    @staticmethod
    def _stale(lease: Lease) -> None:
        logger.info("lease of %s expires too soon to send on: released, taking another", lease.api)
        lease.set_outcome("not_called")

    @staticmethod
    def _too_short(found: RouteMatch) -> QuotaError:
        return QuotaError(
            f"{REACQUIRES} leases of {found.api} in a row expired before their call could be "
            "sent: its lease_ttl is too short for this client"
        )
