"""Blocks of calls: how the gateway leases the calls of a busy (tenant, api, key).

A gateway call that takes a lease of its own costs two store scripts, an acquire on its
way and a release after it. A scope (tenant, api, key and priority class) that called
more than `1 / HOLD` times in the last second gets a block instead: one lease of several
call units, which the gateway hands to that scope's calls one at a time with no store
call in between, for `HOLD` seconds at most. The block then ends in one release, in
parts (`Engine.release`'s `calls` and `keep`): the units whose calls were made are
charged, those never handed out are refunded.

Why it stays correct (design rule 3): every unit's call is sent after the block's grant
and answered before the release that charges it, so each charge sits no earlier than
its call's arrival, as a lease of one call's would. A unit is counted in flight from the
grant until then, so no window holds more than its limit at any time in between.

What a block costs the others: while it is open, its units not yet handed out count in
flight for every coordinator. So a block is sized to what its scope asked for in the
last second over `HOLD`, holds at most 1/`SHARE` of each limit's amount and `MOST` units,
and is asked for only without waiting: denied, the call takes a lease of its own in the
line as before, and the scope takes no block for `BACKOFF` seconds. The acquire's line
rule applies to a block as to any lease: it is granted only with room for the waiters
ahead. An api with a run-time, concurrent or probing limit takes no blocks
(`Policy.releases_in_parts`): those leases end whole.

A throttled answer closes every open block of its (tenant, api) here and is released at
once, before the tool hears of it: the block's calls made so far are charged, the fleet
pauses, and the calls still in flight stay in flight under the block. A pause that
another coordinator started is seen by this one's next grant: an open block's calls go
on for `HOLD` at most.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from .engine import Engine, Grant, Outcome, Release
from .errors import BackendUnavailable, InvalidRequest, UnknownLease
from .releases import ReleaseSender
from .waiting import Ask, Gone, Waiting

log = logging.getLogger("quotagate")

HOLD = 0.1  # seconds a block hands out units
SHARE = 64  # a block holds at most 1/SHARE of each of its api's limits
MOST = 64  # units per block at most
BACKOFF = 1.0  # seconds a scope takes no block after one was denied
SCOPES = 4096  # scopes whose rate is kept at most (their names come from clients)

Scope = tuple[str, str, str, str | None]  # tenant, api, key, priority


async def keep_alive(
    engine: Engine, lease_id: str, api: str, ttl: float, *, now: bool = False
) -> None:
    """Renew a lease every half of its time to live (`now`: at once, then so), until
    cancelled or it is gone: a long call (an export, a hunting query)."""
    while True:
        if not now:
            await asyncio.sleep(ttl / 2)
        now = False
        try:
            ttl = await engine.renew(lease_id) / 1000
        except UnknownLease:
            return
        except BackendUnavailable as exc:
            log.warning("gateway: renewing a lease of %s failed: %s", api, exc)


class Block:
    """One lease of `grant.cost` call units, handed to calls one at a time."""

    def __init__(self, blocks: Blocks, scope: Scope, grant: Grant) -> None:
        self.blocks = blocks
        self.scope = scope
        self.grant = grant
        self.handed = 0  # units given to calls
        self.in_flight = 0  # of those, calls not ended yet
        self.called = 0  # units whose calls ended having been sent, not released yet
        self.open = True  # more units may be handed out
        self.ended = False  # the lease's last part is released (or on its way)
        self._releasing = 0  # throttled parts on their way: the last part waits for them
        self._lock = asyncio.Lock()  # one part at a time, in order
        loop = asyncio.get_running_loop()
        self._closing = loop.call_later(blocks.hold, self.close)
        self._renewal = asyncio.create_task(
            keep_alive(blocks.engine, grant.lease_id, grant.api, grant.expires_in_ms / 1000)
        )

    def take(self) -> bool:
        """One unit for a call, if the block is open and has one left."""
        if not self.open:
            return False
        self.handed += 1
        self.in_flight += 1
        if self.handed >= self.grant.cost:
            self.close()
        return True

    def close(self) -> None:
        """No more units are handed out; the block ends once its calls have."""
        if self.open:
            self.open = False
            self._closing.cancel()
            self.blocks.closed(self)
        self._settle()

    def end(self, outcome: str) -> None:
        """A unit's call ended, not throttled: `ok` and `failed` calls were sent and are
        charged, a `not_called` unit is refunded with those never handed out."""
        self.in_flight -= 1
        if outcome != Outcome.NOT_CALLED:
            self.called += 1
        self._settle()

    async def end_throttled(self, release: Release) -> None:
        """A unit's call was throttled: the block's calls made so far are released now as
        throttled (the fleet pauses), those in flight stay in flight."""
        self.in_flight -= 1
        self.called += 1
        self._releasing += 1
        try:
            self.blocks.close_all(self.grant.tenant, self.grant.api)
            async with self._lock:
                calls, keep = self.called, self.in_flight
                self.called = 0
                self.ended = keep == 0
                try:
                    released = await self.blocks.engine.release(
                        self.grant.lease_id,
                        Outcome.THROTTLED,
                        retry_after_ms=release.retry_after_ms,
                        named=release.named,
                        calls=calls,
                        keep=keep,
                    )
                except (UnknownLease, InvalidRequest, BackendUnavailable) as exc:
                    log.warning("gateway: releasing a block of %s failed: %s", self.grant.api, exc)
                    self.called += calls  # charged with the last part, if it can be
                    self.ended = False
                else:
                    if released.woke:
                        self.blocks.waiting.released(self.grant.tenant, self.grant.api)
        finally:
            self._releasing -= 1
            self._settle()

    def _settle(self) -> None:
        """The last part, once the block is closed and its calls (and parts) are done."""
        if self.open or self.in_flight or self._releasing or self.ended:
            return
        self.ended = True
        self._renewal.cancel()
        outcome = Outcome.OK if self.called else Outcome.NOT_CALLED
        release = Release(self.grant.lease_id, outcome, calls=self.called)
        self.blocks.releases.send(release, self.grant.tenant, self.grant.api)


class Blocks:
    """The gateway's blocks: an open one per busy scope, and each scope's recent rate."""

    def __init__(
        self,
        engine: Engine,
        waiting: Waiting,
        releases: ReleaseSender,
        *,
        hold: float = HOLD,
    ) -> None:
        self.engine = engine
        self.waiting = waiting
        self.releases = releases
        self.hold = hold  # 0: no blocks
        self._open: dict[Scope, Block] = {}
        # Per scope: [this second, its calls, the calls of the second before].
        self._rates: dict[Scope, list[int]] = {}
        self._off: dict[Scope, float] = {}  # no block until then (loop time)
        self._coming: dict[Scope, asyncio.Future[Block | None]] = {}

    @staticmethod
    def scope(ask: Ask) -> Scope:
        return (ask.tenant, ask.api, ask.key, ask.priority)

    def take(self, ask: Ask) -> Block | None:
        """The open block of the ask's scope, with a unit taken for its call; None when
        there is none (the call is counted for the scope's rate either way)."""
        scope = self.scope(ask)
        second = int(asyncio.get_running_loop().time())
        rate = self._rates.get(scope)
        if rate is None:
            if len(self._rates) >= SCOPES:
                del self._rates[next(iter(self._rates))]  # the oldest scope seen
            self._rates[scope] = [second, 1, 0]
        elif rate[0] == second:
            rate[1] += 1
        else:
            rate[:] = [second, 1, rate[1] if rate[0] == second - 1 else 0]
        block = self._open.get(scope)
        if block is not None and block.take():
            return block
        return None

    def size(self, ask: Ask) -> int:
        """Units for the scope's next lease: 1 (no block) unless it is busy."""
        scope = self.scope(ask)
        rate = self._rates.get(scope)
        if rate is None:
            return 1
        now = asyncio.get_running_loop().time()
        recent = max(rate[1], rate[2]) if rate[0] >= int(now) - 1 else 0
        units = min(MOST, int(recent * self.hold))
        if units < 2 or self._off.get(scope, 0.0) > now:
            return 1
        policy = self.engine.policy(ask.tenant, ask.api)
        if not policy.releases_in_parts:
            return 1
        return max(1, min([units, *(lim.amount // SHARE for lim in policy.limits)]))

    async def acquire(self, ask: Ask, gone: Gone) -> tuple[Grant | None, Block | None]:
        """A block with a unit taken, for a busy scope whose block could be granted at
        once; else (None, None): the call takes a lease of its own."""
        scope = self.scope(ask)
        coming = self._coming.get(scope)
        if coming is not None:  # another call of the scope is asking for a block
            block = await asyncio.shield(coming)
            if block is not None and block.take():
                return block.grant, block
            return None, None
        units = self.size(ask)
        if units < 2:
            return None, None
        coming = asyncio.get_running_loop().create_future()
        self._coming[scope] = coming
        block = None
        try:
            result = await self.waiting.acquire(replace(ask, cost=units, wait=0.0), gone)
            if isinstance(result, Grant):
                block = self._open[scope] = Block(self, scope, result)
                block.take()
            else:
                if len(self._off) >= SCOPES:
                    del self._off[next(iter(self._off))]
                self._off[scope] = asyncio.get_running_loop().time() + BACKOFF
        finally:
            del self._coming[scope]
            coming.set_result(block)
        if block is None:
            return None, None
        return block.grant, block

    def closed(self, block: Block) -> None:
        if self._open.get(block.scope) is block:
            del self._open[block.scope]

    def close_all(self, tenant: str, api: str) -> None:
        """Close every open block of (tenant, api): it was throttled."""
        for scope, block in list(self._open.items()):
            if scope[0] == tenant and scope[1] == api:
                block.close()

    def close(self) -> None:
        """Close every block: those whose calls have ended are released."""
        for block in list(self._open.values()):
            block.close()


__all__ = ["BACKOFF", "HOLD", "MOST", "SHARE", "Block", "Blocks", "keep_alive"]
