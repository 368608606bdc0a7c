"""Waiting for a grant: the component between an acquire request and the engine.

`Waiting` is the interface the HTTP layer (and the gateway) use; `FleetLines` is the
implementation: one line per (tenant, api, key) in the store, shared by every
coordinator replica (acquire.lua: tickets ordered by priority class, then arrival). A
request is granted only when every limit has room for the waiters ahead of it and for
itself, so a newcomer never overtakes a waiter, whichever replica either came through,
and capacity that falls short goes to the head of the line.

A waiting request holds a ticket and tries again: at its exact retry time, when a
wake-up of its (tenant, api) reaches this coordinator, and at least every `HEARTBEAT`
seconds, each try refreshing its ticket (a ticket not refreshed for `TICKET_TTL_MS`
leaves the line, so a waiter whose coordinator died loses its place within two seconds).
Wake-ups: a release that may let a waiter in (release.lua: a slot freed, units given
back, the pause or a learned limit moved; forget.lua) publishes on the (tenant, api)'s
shard channel, which every coordinator with waiters there subscribes to (`WakeUps`). A
waiter whose client went away leaves the line at once. A request whose soonest grant
(every lease in flight released at once, the waiters ahead served first) lies beyond
its wait is answered at once: the script keeps no ticket for it. Nothing is reserved
while waiting.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio.client import PubSub
from redis.asyncio.cluster import ClusterPubSub, RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from . import codec
from .engine import Denial, Engine, Grant, Outcome
from .store import StoreClient

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


_CHANNEL = re.compile(r"^qg:\{(?P<tenant>[^|{}]+)\|(?P<api>[^|{}]+)\}:w$")  # wake_channel
READ_TIMEOUT = 1.0  # seconds a read of a pub/sub connection waits for a message
REOPEN = 1.0  # seconds before a pub/sub connection that failed is opened again
LINGER = 5.0  # seconds a pub/sub connection stays open with no subscription
# What a store in trouble raises here (RedisClusterException: no node for a slot).
STORE_ERRORS = (RedisError, RedisClusterException, OSError)


class WakeUps:
    """Subscriptions to the wake-up channels (codec.wake_channel) of the (tenant, api)s
    this process has waiters on: SSUBSCRIBE when the first waiter of a (tenant, api)
    joins, SUNSUBSCRIBE when its last leaves. The scripts SPUBLISH on the channel, whose
    name carries the keys' hash tag: on a Cluster it lives on the master of the keys'
    slot, so there is one pub/sub connection per master that owns such a channel, and a
    read of one never delays another's wake-ups; on a single server or behind Sentinel,
    one connection.

    `wake(tenant, api)` is called for every publication heard, and once when a
    subscription is confirmed: a release between a waiter's last try and that moment was
    not heard. A connection that fails (a failover, a restart) is opened again after
    `REOPEN` seconds with its subscriptions, each confirmed (so woken) anew; until then
    the waiters try at their retry time and heartbeat."""

    def __init__(self, redis: StoreClient, wake: Callable[[str, str], None]) -> None:
        self.redis = redis
        self.wake = wake
        self._waiters: dict[tuple[str, str], int] = {}
        self._live: set[str] = set()  # channels whose subscription is confirmed
        self._nodes: dict[str, _Node] = {}  # by node name ("" off a Cluster)
        self._node_of: dict[str, str] = {}  # channel -> the node it was subscribed on

    def listening(self, tenant: str, api: str) -> bool:
        """Whether a publication for (tenant, api) reaches this process now."""
        return codec.wake_channel(tenant, api) in self._live

    def channels(self) -> frozenset[str]:
        """Read-only: the channels subscribed to (confirmed or not yet)."""
        return frozenset(self._node_of)

    def join(self, tenant: str, api: str) -> None:
        scope = (tenant, api)
        count = self._waiters.get(scope, 0)
        self._waiters[scope] = count + 1
        if count:
            return
        channel = codec.wake_channel(tenant, api)
        name = ""
        if isinstance(self.redis, RedisCluster):
            with contextlib.suppress(*STORE_ERRORS):  # then with the others: still heard
                found = self.redis.get_node_from_key(channel)
                name = "" if found is None else found.name
        self._node_of[channel] = name
        node = self._nodes.get(name)
        if node is None:
            node = self._nodes[name] = _Node(self)
        node.add(channel)

    def leave(self, tenant: str, api: str) -> bool:
        """Whether that was the last waiter of (tenant, api) here."""
        scope = (tenant, api)
        count = self._waiters.pop(scope) - 1
        if count:
            self._waiters[scope] = count
            return False
        channel = codec.wake_channel(tenant, api)
        self._live.discard(channel)
        node = self._nodes.get(self._node_of.pop(channel))
        if node is not None:  # (none once closed)
            node.remove(channel)
        return True

    async def aclose(self) -> None:
        nodes = list(self._nodes.values())
        self._nodes.clear()
        for node in nodes:
            await node.aclose()


class _Node:
    """One pub/sub connection of WakeUps (on a Cluster: to one master) and the task that
    opens it, subscribes its channels and reads it; it closes after `LINGER` seconds
    without a channel, and opens again for the next."""

    def __init__(self, owner: WakeUps) -> None:
        self.owner = owner
        self.channels: set[str] = set()
        self.pubsub: PubSub | ClusterPubSub | None = None  # while open and read
        self.task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._failed = False  # since the last success: log a failure once

    def add(self, channel: str) -> None:
        self.channels.add(channel)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())  # it subscribes every channel
        elif self.pubsub is not None:
            self._send(self.pubsub.ssubscribe(channel))
        # else: the task is opening the connection again, with every channel

    def remove(self, channel: str) -> None:
        self.channels.discard(channel)
        if self.pubsub is not None:
            self._send(self.pubsub.sunsubscribe(channel))

    def _send(self, command: Awaitable[Any]) -> None:
        """Send a (un)subscription without waiting for it; a failure shows in the read."""

        async def send() -> None:
            with contextlib.suppress(*STORE_ERRORS):
                await command

        task = asyncio.create_task(send())
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def _run(self) -> None:
        while self.channels:
            pubsub = self.owner.redis.pubsub()
            failed = False
            try:
                # This task alone sends on the pub/sub until its connection is open:
                # redis-py's PubSub opens it in whichever command comes first, and two
                # at once would each open one, leaving one unowned.
                subscribed: set[str] = set()
                while waiting := self.channels - subscribed:
                    for channel in waiting:
                        await pubsub.ssubscribe(channel)
                        subscribed.add(channel)
                self.pubsub = pubsub  # add() and remove() send on it from now on
                for channel in subscribed - self.channels:  # left while subscribing
                    self._send(pubsub.sunsubscribe(channel))
                await self._read(pubsub)  # until idle for LINGER seconds
            except STORE_ERRORS as exc:
                failed = True
                if not self._failed:
                    log.warning(
                        "not hearing wake-ups (%s): waiters try at their retry time and "
                        "heartbeat until the store's pub/sub answers again",
                        exc,
                    )
                self._failed = True
            finally:
                self.pubsub = None
                self.owner._live.difference_update(self.channels)
                # A (un)subscription still on its way would open the closed pub/sub's
                # connection again, owned by no one.
                sends = list(self._sends)
                for task in sends:
                    task.cancel()
                await asyncio.gather(*sends, return_exceptions=True)
                with contextlib.suppress(*STORE_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            if failed and self.channels:
                await asyncio.sleep(REOPEN)
        self.task = None  # no await since the check: an add() from now on starts a task

    async def _read(self, pubsub: PubSub | ClusterPubSub) -> None:
        loop = asyncio.get_running_loop()
        idle_since: float | None = None
        while True:
            now = loop.time()
            if self.channels:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= LINGER:
                return
            if isinstance(pubsub, ClusterPubSub):
                message = await pubsub.get_sharded_message(timeout=READ_TIMEOUT)
            else:
                message = await pubsub.get_message(timeout=READ_TIMEOUT)
            if message is None:
                if loop.time() - now < READ_TIMEOUT / 20:
                    # A Cluster pub/sub that holds no subscription yet answers at once.
                    await asyncio.sleep(READ_TIMEOUT / 20)
                continue
            self._failed = False
            self._heard(message)

    def _heard(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind not in ("smessage", "ssubscribe"):
            return
        channel = message["channel"]
        channel = channel.decode() if isinstance(channel, bytes) else str(channel)
        found = _CHANNEL.match(channel)
        if found is None or channel not in self.channels:
            return
        if kind == "ssubscribe":
            self.owner._live.add(channel)
        self.owner.wake(found["tenant"], found["api"])

    async def aclose(self) -> None:
        self.channels.clear()
        for task in (self.task, *self._sends):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task


@dataclass(eq=False)
class _Waiter:
    """A request of this process in a line, and what wakes it."""

    # Its place in the line, as the store orders it (acquire.lua): class rank, then the
    # store's time when it joined, then its ticket.
    place: tuple[int, int, str]
    event: asyncio.Event = field(default_factory=asyncio.Event)
    woken: bool = False  # its last sleep was ended by a wake-up


class FleetLines:
    """Lines in the store, shared by every coordinator replica.

    While a request of this coordinator waits in a line, it listens to the wake-ups of
    its (tenant, api) (WakeUps), so a release through any replica that may let a waiter
    in wakes it at once, on every kind of store. A wake-up wakes, in each line of the
    (tenant, api), the waiter of this process that is furthest ahead: those behind it
    cannot be granted before it. When a woken waiter leaves the line (granted, or
    answered), the next one of this process is woken in turn, as the release may have
    freed more than one place; when it stays, so do they."""

    def __init__(self, engine: Engine, *, heartbeat: float = HEARTBEAT) -> None:
        self.engine = engine
        self.heartbeat = heartbeat
        # This process's waiters, per (tenant, api) and key, in their order in line.
        self._waiters: dict[tuple[str, str], dict[str, list[_Waiter]]] = {}
        # Wake-ups heard per (tenant, api) with waiters here: a waiter that was trying
        # while one came tries again at once instead of sleeping through it.
        self._heard: dict[tuple[str, str], int] = {}
        self._in_lines: dict[tuple[str, str, str], int] = {}  # this process's waiters
        self.wakeups = WakeUps(engine.redis, self._woken)

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
        self._in_lines[ask.line] = self._in_lines.get(ask.line, 0) + 1
        me: list[_Waiter] = []  # once in line
        try:
            return await self._in_line(ask, gone, ticket, deadline, me)
        finally:
            left = self._in_lines.pop(ask.line) - 1
            if left:
                self._in_lines[ask.line] = left
            if me:
                self._leave(ask, me[0])

    def _join(self, ask: Ask, ticket: str, denial: Denial) -> _Waiter:
        policy = self.engine.target(ask.tenant, ask.api, ask.key).policy
        klass = self.engine.priority_class(policy, ask.priority)
        rank = 0 if klass is None else policy.classes.index(klass)
        waiter = _Waiter((rank, denial.now_ms, ticket))
        line = self._waiters.setdefault((ask.tenant, ask.api), {}).setdefault(ask.key, [])
        bisect.insort(line, waiter, key=lambda w: w.place)
        self._heard.setdefault((ask.tenant, ask.api), 0)
        self.wakeups.join(ask.tenant, ask.api)
        return waiter

    def _leave(self, ask: Ask, waiter: _Waiter) -> None:
        scope = (ask.tenant, ask.api)
        lines = self._waiters[scope]
        line = lines[ask.key]
        line.remove(waiter)
        if waiter.woken and line:
            self._wake(line[0])  # the next one here may fit too
        if not line:
            del lines[ask.key]
        if not lines:
            del self._waiters[scope]
        if self.wakeups.leave(ask.tenant, ask.api):
            self._heard.pop(scope, None)

    async def _in_line(
        self, ask: Ask, gone: Gone, ticket: str, deadline: float, me: list[_Waiter]
    ) -> Grant | Denial | None:
        loop = asyncio.get_running_loop()
        queued = False
        scope = (ask.tenant, ask.api)
        while True:
            left = deadline - loop.time()
            heard = self._heard.get(scope, 0)
            result = await self._attempt(ask, ticket, left)
            if isinstance(result, Grant):
                return result
            if left <= 0 or _hopeless(result, left):
                if queued:  # the script keeps no ticket for it; this makes sure of it
                    await self.engine.leave(ask.tenant, ask.api, ask.key, ticket)
                return result
            queued = True
            if not me:
                me.append(self._join(ask, ticket, result))
            if self._heard.get(scope, 0) != heard:
                continue  # woken while trying: the try may have come before the change
            pause = min(
                result.retry_after_ms / 1000, self.heartbeat, max(deadline - loop.time(), 0)
            )
            await self._sleep(me[0], pause)
            if await gone():
                await self.engine.leave(ask.tenant, ask.api, ask.key, ticket)
                return None

    @staticmethod
    async def _sleep(waiter: _Waiter, seconds: float) -> None:
        """Sleep `seconds`, or less if the waiter is woken."""
        waiter.event.clear()
        waiter.woken = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await waiter.event.wait()
        waiter.woken = waiter.event.is_set()

    @staticmethod
    def _wake(waiter: _Waiter) -> None:
        waiter.woken = True
        waiter.event.set()

    def lines(self) -> dict[tuple[str, str, str], int]:
        """Read-only: the requests of this process waiting per (tenant, api, key)."""
        return dict(self._in_lines)

    def released(self, tenant: str, api: str) -> None:
        """A release through this coordinator woke (tenant, api)'s waiters: when its
        publication reaches this process, that wakes them; otherwise, now."""
        if not self.wakeups.listening(tenant, api):
            self._woken(tenant, api)

    def _woken(self, tenant: str, api: str) -> None:
        scope = (tenant, api)
        if scope in self._heard:
            self._heard[scope] += 1
        for line in self._waiters.get(scope, {}).values():
            self._wake(line[0])

    async def aclose(self) -> None:
        """Stop listening (at shutdown)."""
        await self.wakeups.aclose()


__all__ = ["Ask", "FleetLines", "Gone", "Waiting", "WakeUps"]
