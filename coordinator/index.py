"""The fleet index: which (tenant, api, key) are active, who holds their leases, which
fleets are pausing, the recent upstream 429s and the waiting lines, kept in the store for
every coordinator replica to read.

None of it decides anything, so none of it is on a decision's path: the HTTP layer notes
what it saw in memory (a dictionary write), and a background task writes the notes in
one pipeline at most every `FLUSH` seconds. The quota scripts in `lua/` do not know these
keys. Times here are this coordinator's wall clock (ms since the epoch): they are shown
to people, never used to grant.

    qg:active                sorted set "tenant|api|key", scored by last seen; entries older
                             than `ttl` are removed, at most `max_entries` kept
    qg:holders:{tenant|api}  hash: lease token's first 16 hex -> {"holder", "key",
                             "expires_at"}; the lease's own hash tag, so it sits in the
                             same Cluster slot; expires with the longest lease
    qg:pauses                sorted set "tenant|api", scored by the pause's end
    qg:throttles             list of the latest upstream 429s (JSON), newest first
    qg:instances             sorted set of coordinator processes, scored by last flush
    qg:waiting:<instance>    hash "tenant|api|key" -> requests waiting in line there

Holders live here rather than in the lease record of the scripts (`grant:cost:estimate:
expiry` in Lua state) so that the scripts and their one round trip stay as they are;
the price is that a holder shows up to `FLUSH` seconds after its grant. On a Redis
Cluster the global keys are separate commands of their own slot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from redis.exceptions import RedisError

from .leases import LeaseRef
from .store import StoreClient

FLUSH = 1.0  # seconds between two writes of the notes at most
ACTIVE = "qg:active"
PAUSES = "qg:pauses"
THROTTLES = "qg:throttles"
INSTANCES = "qg:instances"
THROTTLES_KEPT = 50
# Every key of the index starts with one of these: none holds quota state.
PREFIXES = (ACTIVE, "qg:holders:", PAUSES, THROTTLES, INSTANCES, "qg:waiting:")
INSTANCE_TTL_MS = 3 * int(FLUSH * 1000)  # a replica that stopped flushing is gone
MEMBER_CHARS = 16  # of the lease token: tells leases apart, cannot release one
NOTES_MAX = 100_000  # notes kept while the store does not answer, at most

log = logging.getLogger("quotagate")
Line = tuple[str, str, str]


def now_ms() -> int:
    return int(time.time() * 1000)


def is_index_key(name: str | bytes) -> bool:
    return _text(name).startswith(PREFIXES)


def holders_key(tenant: str, api: str) -> str:
    return f"qg:holders:{{{tenant}|{api}}}"


@dataclass(frozen=True)
class Holding:
    """A lease in flight as the index knows it."""

    lease: str  # the token's first MEMBER_CHARS hex digits
    key: str
    holder: str | None
    expires_at_ms: int


@dataclass(frozen=True)
class Pause:
    tenant: str
    api: str
    ends_at_ms: int


@dataclass
class _Notes:
    """What this process noted since the last flush: one write's worth."""

    seen: dict[Line, None] = field(default_factory=dict)
    # (tenant, api) -> lease member -> (holder, key, expires_at ms)
    granted: dict[tuple[str, str], dict[str, tuple[str | None, str, int]]] = field(
        default_factory=dict
    )
    ended: dict[tuple[str, str], set[str]] = field(default_factory=dict)
    pauses: dict[tuple[str, str], int] = field(default_factory=dict)  # -> the pause's end
    throttles: list[str] = field(default_factory=list)  # JSON, oldest first


class FleetIndex:
    def __init__(
        self,
        redis: StoreClient,
        *,
        ttl: float = 3600.0,
        max_entries: int = 10_000,
        lease_ttl_ms: int = 60_000,
        waiting: Callable[[], dict[Line, int]] = dict,
    ) -> None:
        self.redis = redis
        self.ttl_ms = int(ttl * 1000)
        self.max_entries = max_entries
        self.lease_ttl_ms = lease_ttl_ms  # the longest lease: how long a holders hash lives
        self.waiting = waiting  # this process's lines and their lengths
        self.instance = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._notes = _Notes()
        # The notes of the flush on its way: reads still see them until the store has them.
        self._writing = _Notes()
        self._task: asyncio.Task[None] | None = None
        self._was_waiting = False
        self._holders: dict[str, str | None] = {}  # lease member -> holder, granted here

    # Notes, from the HTTP layer: memory only.

    def seen(self, tenant: str, api: str, key: str) -> None:
        self._notes.seen[(tenant, api, key)] = None

    def granted(
        self, tenant: str, api: str, key: str, lease_id: str, holder: str | None, expires_in_ms: int
    ) -> None:
        member = _member(lease_id)
        entry = (holder, key, now_ms() + expires_in_ms)
        pending = self._notes.granted.get((tenant, api))
        if pending is None:
            pending = self._notes.granted[(tenant, api)] = {}
        pending[member] = entry
        if holder is not None:
            if len(self._holders) > NOTES_MAX:
                self._holders.clear()
            self._holders[member] = holder

    def holder(self, ref: LeaseRef) -> str | None:
        """The holder of a lease granted by this process, if it named one."""
        return self._holders.get(_member(ref.lease_id))

    async def stored_holder(self, ref: LeaseRef) -> str | None:
        """The holder of a lease granted by any replica (a store read: for rare events)."""
        found = self.holder(ref)
        if found is None:
            raw = await self.redis.hget(holders_key(ref.tenant, ref.api), _member(ref.lease_id))
            if raw is not None:
                found = json.loads(_text(raw))["holder"]
        return found

    def renewed(self, ref: LeaseRef, expires_in_ms: int) -> None:
        """A renewal moves the lease's expiry; its holder is known to the process that
        granted it (a lease renewed through another replica shows no holder from then)."""
        self.granted(ref.tenant, ref.api, ref.key, ref.lease_id, self.holder(ref), expires_in_ms)

    def ended(self, ref: LeaseRef) -> None:
        pair = (ref.tenant, ref.api)
        member = _member(ref.lease_id)
        pending = self._notes.granted.get(pair)
        if pending is not None and pending.pop(member, None) is not None:
            self._holders.pop(member, None)
            return  # granted and ended within one flush: the store never hears of it
        self._notes.ended.setdefault(pair, set()).add(member)
        self._holders.pop(member, None)

    def throttled(
        self,
        ref: LeaseRef,
        *,
        holder: str | None,
        status: int | None,
        retry_after: float,
    ) -> None:
        """An upstream 429: the fleet of (tenant, api) pauses `retry_after` seconds."""
        at = now_ms()
        ends = at + int(retry_after * 1000)
        pair = (ref.tenant, ref.api)
        pauses = self._notes.pauses
        pauses[pair] = max(pauses.get(pair, 0), ends)
        note = {
            "at": at,
            "tenant": ref.tenant,
            "api": ref.api,
            "key": ref.key,
            "holder": holder,
            "status": status,
            "retry_after": retry_after,
        }
        self._notes.throttles.append(json.dumps(note))
        del self._notes.throttles[:-THROTTLES_KEPT]

    # The background writer.

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fleet-index")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            async with asyncio.timeout(FLUSH):
                await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH)
            try:
                async with asyncio.timeout(FLUSH * 2):
                    await self.flush()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("the fleet index was not written: %s", exc)

    async def flush(self) -> None:
        """Write the notes taken since the last flush, in one pipeline."""
        notes, self._notes = self._notes, _Notes()
        seen, granted, ended = notes.seen, notes.granted, notes.ended
        pauses, throttles = notes.pauses, notes.throttles
        lines = {line: n for line, n in self.waiting().items() if n > 0}
        at = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        if seen:
            pipe.zadd(ACTIVE, {"|".join(line): at for line in seen})
            pipe.zremrangebyscore(ACTIVE, "-inf", at - self.ttl_ms)
            pipe.zremrangebyrank(ACTIVE, 0, -self.max_entries - 1)
            pipe.pexpire(ACTIVE, self.ttl_ms)
        for (tenant, api), entries in granted.items():
            if entries:
                key = holders_key(tenant, api)
                pipe.hset(key, mapping={m: _entry(*e) for m, e in entries.items()})
                # As long as its longest lease (a renewal may go past the policies' ttl):
                # set when the hash has no expiry yet, else only ever lengthened.
                last = max(self.lease_ttl_ms, *(e[2] - at for e in entries.values()))
                pipe.pexpire(key, last + int(FLUSH * 1000), nx=True)
                pipe.pexpire(key, last + int(FLUSH * 1000), gt=True)
        for (tenant, api), members in ended.items():
            pipe.hdel(holders_key(tenant, api), *members)
        if pauses:
            pipe.zadd(PAUSES, {f"{t}|{a}": ends for (t, a), ends in pauses.items()}, gt=True)
            pipe.zremrangebyscore(PAUSES, "-inf", at - self.ttl_ms)
            pipe.pexpire(PAUSES, self.ttl_ms)
        if throttles:
            pipe.lpush(THROTTLES, *throttles)
            pipe.ltrim(THROTTLES, 0, THROTTLES_KEPT - 1)
            pipe.pexpire(THROTTLES, self.ttl_ms)
        if lines or self._was_waiting:
            waiting_key = f"qg:waiting:{self.instance}"
            pipe.delete(waiting_key)
            if lines:
                pipe.hset(waiting_key, mapping={"|".join(k): n for k, n in lines.items()})
                pipe.pexpire(waiting_key, INSTANCE_TTL_MS)
            pipe.zadd(INSTANCES, {self.instance: at})
            pipe.zremrangebyscore(INSTANCES, "-inf", at - INSTANCE_TTL_MS)
            pipe.pexpire(INSTANCES, INSTANCE_TTL_MS)
        self._was_waiting = bool(lines)
        if len(pipe):
            self._writing = notes
            try:
                await pipe.execute()
            finally:
                self._writing = _Notes()

    # Reads, for usage lists and the dashboard.

    async def active(self) -> list[Line]:
        """Every (tenant, api, key) seen within the index's ttl, by name."""
        since = now_ms() - self.ttl_ms
        members = cast(list[bytes], await self.redis.zrangebyscore(ACTIVE, since, "+inf"))
        found = []
        for member in members:
            parts = _text(member).split("|")
            if len(parts) == 3:
                found.append((parts[0], parts[1], parts[2]))
        # This process's own notes, not written yet, count too.
        noted = (*self._writing.seen, *self._notes.seen)
        found.extend(line for line in noted if line not in found)
        return sorted(set(found))

    async def holdings(
        self, pairs: Iterable[tuple[str, str]]
    ) -> dict[tuple[str, str], list[Holding]]:
        """The leases in flight of each (tenant, api), soonest expiry first."""
        pairs = list(dict.fromkeys(pairs))
        if not pairs:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for tenant, api in pairs:
            pipe.hgetall(holders_key(tenant, api))
        replies = await pipe.execute()
        at = now_ms()
        found: dict[tuple[str, str], list[Holding]] = {}
        for pair, entries in zip(pairs, replies, strict=True):
            merged = {_text(k): _text(v) for k, v in entries.items()}
            # This process's notes, those of a flush on its way included: a read between
            # the swap of the notes and the end of their write would miss them otherwise.
            noted = (self._writing, self._notes)
            for notes in noted:
                merged.update({m: _entry(*e) for m, e in notes.granted.get(pair, {}).items()})
            for notes in noted:
                for member in notes.ended.get(pair, ()):
                    merged.pop(member, None)
            items = []
            for member, raw in merged.items():
                value: dict[str, Any] = json.loads(raw)
                if value["expires_at"] > at:
                    items.append(
                        Holding(member, value["key"], value["holder"], value["expires_at"])
                    )
            found[pair] = sorted(items, key=lambda h: h.expires_at_ms)
        return found

    async def pauses(self) -> list[Pause]:
        """The fleets pausing now, soonest end first."""
        at = now_ms()
        scored = await self.redis.zrangebyscore(PAUSES, at, "+inf", withscores=True)
        raw = cast(list[tuple[bytes, float]], scored)
        found = {}
        for member, score in raw:
            tenant, _, api = _text(member).rpartition("|")
            found[(tenant, api)] = int(score)
        # This process's notes too, those of a flush on its way included.
        for pair, ends in (*self._writing.pauses.items(), *self._notes.pauses.items()):
            if ends > at:
                found[pair] = max(found.get(pair, 0), ends)
        return sorted((Pause(t, a, e) for (t, a), e in found.items()), key=lambda p: p.ends_at_ms)

    async def throttles(self) -> list[dict[str, Any]]:
        """The latest upstream 429s, newest first."""
        raw = await self.redis.lrange(THROTTLES, 0, THROTTLES_KEPT - 1)
        noted = (*self._writing.throttles, *self._notes.throttles)  # oldest first
        notes = [json.loads(item) for item in reversed(noted)]
        notes += [json.loads(_text(item)) for item in raw]
        return notes[:THROTTLES_KEPT]

    async def waiting_lines(self) -> dict[Line, int]:
        """Requests waiting in line per (tenant, api, key), over every replica."""
        at = now_ms()
        since = at - INSTANCE_TTL_MS
        instances = cast(list[bytes], await self.redis.zrangebyscore(INSTANCES, since, "+inf"))
        others = [_text(i) for i in instances if _text(i) != self.instance]
        totals: dict[Line, int] = {k: v for k, v in self.waiting().items() if v > 0}
        if others:
            pipe = self.redis.pipeline(transaction=False)
            for instance in others:
                pipe.hgetall(f"qg:waiting:{instance}")
            for entries in await pipe.execute():
                for member, count in entries.items():
                    parts = _text(member).split("|")
                    if len(parts) == 3:
                        line = (parts[0], parts[1], parts[2])
                        totals[line] = totals.get(line, 0) + int(count)
        return totals


def _member(lease_id: str) -> str:
    return lease_id.rpartition(".")[2][:MEMBER_CHARS]


def _entry(holder: str | None, key: str, expires_at: int) -> str:
    return json.dumps({"holder": holder, "key": key, "expires_at": expires_at})


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = ["FleetIndex", "Holding", "Pause", "holders_key", "is_index_key"]
