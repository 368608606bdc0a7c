"""The quota engine: one Lua script, one Redis round trip, per decision.

Times are integer milliseconds here, as in Redis; the HTTP layer converts to seconds.
Every method takes an optional `now` (ms) that only tests pass, to drive virtual time
through the scripts; without it the scripts read Redis `TIME`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import (
    AskError,
    ClusterError,
    NoScriptError,
    ReadOnlyError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from . import codec
from .codec import (
    AcquireArgs,
    ForgetArgs,
    Learned,
    LeaveArgs,
    ReleaseArgs,
    RenewArgs,
    UsageArgs,
)
from .errors import BackendUnavailable, InvalidRequest, UnknownApi, UnknownLease
from .leases import LeaseRef
from .logs import event
from .policy import KEY_PATTERN, TENANT_PATTERN, Limit, Policy, PolicySet, PriorityClass
from .store import StoreClient

T = TypeVar("T")

SCRIPT_ACQUIRE = codec.script_source(AcquireArgs)
SCRIPT_RELEASE = codec.script_source(ReleaseArgs)
SCRIPT_RENEW = codec.script_source(RenewArgs)
SCRIPT_USAGE = codec.script_source(UsageArgs)
SCRIPT_FORGET = codec.script_source(ForgetArgs)
SCRIPT_LEAVE = codec.script_source(LeaveArgs)
TICKET_TTL_MS = 2_000  # a waiter that stops refreshing its ticket loses its place after this
KNOWN_STATES = 100_000  # (tenant, api) states an engine remembers, for loss detection

# Store errors that mean "again" or "elsewhere" (a failover, a restart, a resharding):
# the caller gets 503 and tries again; anything else is a bug and is not hidden.
TRANSIENT = (
    RedisConnectionError,  # includes BusyLoadingError (LOADING), MaxConnectionsError and
    # Sentinel's MasterNotFoundError; the Sentinel client turns READONLY into one too
    RedisTimeoutError,
    OSError,
    TimeoutError,
    ReadOnlyError,  # a plain client still on a master that was demoted
    NoScriptError,  # the reload itself raced a flush
    ClusterError,  # includes ClusterDownError and MasterDownError
    TryAgainError,  # a slot in migration, on a cluster
    AskError,  # includes MovedError: a plain client on a cluster node, or redirects exhausted
    RedisClusterException,  # no node reachable, a slot not covered (SlotNotCoveredError)
)
# Replies redis-py knows no class for (its parser keeps their code at the start), e.g.
# MASTERDOWN from a replica that lost its master (replica-serve-stale-data no) on some
# versions, NOREPLICAS from a master short of `min-replicas-to-write`, BUSY from a server
# still running a script.
TRANSIENT_CODES = (
    "MASTERDOWN",
    "LOADING",
    "READONLY",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "MOVED",
    "ASK",
    "NOREPLICAS",
    "BUSY",
)


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    THROTTLED = "throttled"
    NOT_CALLED = "not_called"


@dataclass(frozen=True)
class Grant:
    lease_id: str
    tenant: str
    api: str
    key: str
    cost: int
    granted_at_ms: int  # Redis time of the grant
    expires_at_ms: int

    @property
    def expires_in_ms(self) -> int:
        return self.expires_at_ms - self.granted_at_ms


@dataclass(frozen=True)
class Denial:
    reason: Literal["quota_exhausted", "cooling_down"]
    retry_after_ms: int  # exact: the earliest time the same request passes, if nothing changes
    limit: Limit | None  # the limit that bound the wait; None for the cooldown
    now_ms: int
    # The earliest it could pass if every lease in flight were released at once: a waiter
    # whose wait ends before this cannot be granted, one whose wait ends after may be.
    soonest_ms: int = -1
    amount: int = 0  # the bound limit's amount in force (learned limits may lower it)


@dataclass(frozen=True)
class Release:
    """One release of `release_many`, with the arguments of `release`."""

    lease_id: str
    outcome: Outcome | str
    retry_after_ms: int | None = None
    runtime_ms: int | None = None
    named: tuple[int, int] | None = None
    runtime_upstream: bool = False  # runtime_ms is the upstream's own processing time
    # A lease of several call units ended in parts (`Engine.release`): those called,
    # and those that stay in flight; None and 0: the whole lease was called and ends.
    calls: int | None = None
    keep: int = 0


@dataclass(frozen=True)
class Released:
    """A release that took effect, what became of the limit its answer named, and
    whether it woke the waiters of its (tenant, api): it freed something (a slot, a
    refund, run time below the estimate) or moved the pause or a learned limit while
    its key's line held waiters (release.lua)."""

    ref: LeaseRef
    learned: Learned | None
    woke: bool = False


@dataclass(frozen=True)
class LimitUsage:
    limit: Limit
    used: int  # call units, runtime ms, or leases in flight
    resets_in_ms: int  # until `used` next drops; 0 when nothing is used
    amount: int  # in force: the policy's, or lower while a learned limit holds

    @property
    def remaining(self) -> int:
        return max(self.amount - self.used, 0)


@dataclass(frozen=True)
class Usage:
    tenant: str
    api: str
    key: str
    limits: tuple[LimitUsage, ...]
    in_flight: int
    cooldown_ms: int
    now_ms: int
    waiting: int = 0  # tickets in the key's line


def _bytes(value: str | int) -> bytes:
    return value.encode() if isinstance(value, str) else b"%d" % value


def _ids(info: Any) -> list[str]:
    """The run and replication ids in an INFO reply (one node's, or a cluster's per node)."""
    if "run_id" in info or "master_replid" in info:
        return [f"{name}={info[name]}" for name in ("run_id", "master_replid") if name in info]
    return [
        f"{node}:{found}"
        for node, part in info.items()
        if isinstance(part, dict)
        for found in _ids(part)
    ]


def check_whole(field: str, value: object, least: int) -> None:
    """InvalidRequest naming `field` unless `value` is a whole number >= `least`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise InvalidRequest(field, f"must be a whole number >= {least}")


def validate_scope(tenant: str, key: str) -> None:
    if not TENANT_PATTERN.match(tenant):
        raise InvalidRequest("tenant", f"must match {TENANT_PATTERN.pattern}")
    if key and not KEY_PATTERN.match(key):
        raise InvalidRequest("key", f"must match {KEY_PATTERN.pattern}")


@dataclass(frozen=True)
class Target:
    """What one (tenant, api, key) resolves to: its policy, the keys of its state, and the
    policy block that closes every script's ARGV (one packed argument). Both are encoded
    once, here: redis-py packs bytes as they are, two and a half times faster than strings
    and numbers."""

    policy: Policy
    keys: tuple[bytes, ...]
    args: tuple[bytes, ...]


class Engine:
    """Acquire, release, renew and read usage of leases against one Redis deployment.

    Every store call is bounded by `timeout` seconds (None: unbounded, for tests that
    freeze time) and a store that does not answer, or answers "again" or "elsewhere",
    raises BackendUnavailable.

    With `recovery_share` set, the engine tracks losses of state (design rule 9): per hash
    tag, the scripts compare each (tenant, api)'s state with what this engine last saw of
    it (`acquire.lua`), and a failover or restart of the store it talks to (a new run or
    replication id) counts as a loss of what was not yet written through; after a loss
    every windowed limit grants at most that share of its amount until its window no
    longer overlaps the loss. The engine counts its own grants in each state it writes
    (as writer `writer`, random per engine), so that a state that comes back without
    grants it saw written (a replica promoted before it received them) counts as a loss
    too. `loss_on_start` treats state missing at start as lost too.
    Without `recovery_share` (None), no loss is tracked.
    """

    def __init__(
        self,
        redis: StoreClient,
        policies: PolicySet,
        *,
        recovery_share: float | None = None,
        loss_on_start: bool = False,
        timeout: float | None = None,
        learned_ttl_ms: int = 86_400_000,
    ) -> None:
        self.redis = redis
        self.policies = policies
        self.recovery_share = recovery_share
        self.loss_on_start = loss_on_start
        self.timeout = timeout
        self.learned_ttl_ms = learned_ttl_ms
        self._hinted: set[tuple[str, str, int, int]] = set()  # named limits logged once
        # What this engine last saw of each (tenant, api)'s state: (epoch, sure to live
        # until, both Redis ms; how many of this engine's grants it holds in the epoch);
        # bounded, the oldest forgotten first (a forgotten state only loses its loss
        # detection here, other coordinators may still know it).
        self._known: OrderedDict[tuple[str, str], tuple[int, int, int]] = OrderedDict()
        self.writer = secrets.token_hex(6)  # this engine among the writers of a state
        self._started_ms: int | None = None  # Redis time of the first decision
        self.recovery: int | None = None  # Redis ms of the last failover or restart seen
        self._store_id: frozenset[str] | None = None  # the run and replication ids
        self._suspect = False  # a store error since the ids were last read
        self.lua_acquire = redis.register_script(SCRIPT_ACQUIRE)
        self.lua_release = redis.register_script(SCRIPT_RELEASE)
        self.lua_renew = redis.register_script(SCRIPT_RENEW)
        self.lua_usage = redis.register_script(SCRIPT_USAGE)
        self.lua_forget = redis.register_script(SCRIPT_FORGET)
        self.lua_leave = redis.register_script(SCRIPT_LEAVE)
        # Resolved once per (tenant, api, key) seen lately: a decision then costs one
        # dictionary look-up before its round trip.
        self.target = functools.lru_cache(maxsize=4096)(self._resolve)

    async def check_store(self) -> None:
        """Read the store's run and replication ids; when they changed since the last
        read (a failover, or a restart), enter recovery from now: the writes not yet
        replicated or persisted may be gone."""
        info = await self._call(self.redis.info())
        ids = frozenset(_ids(info))
        self._suspect = False
        if self._store_id is not None and ids != self._store_id and self.recovery_share:
            now = await self._call(self.redis.time())
            self.recovery = int(now[0]) * 1000 + int(now[1]) // 1000
            event(
                logging.WARNING,
                "store_changed",
                f"the quota store changed (failover or restart): granting "
                f"{self.recovery_share:.0%} of each limit until its window no longer "
                f"overlaps {self.recovery} ms",
                since=self.recovery,
            )
        self._store_id = ids

    def policy(self, tenant: str, api: str) -> Policy:
        policy = self.policies.resolve(tenant, api)
        if policy is None:
            raise UnknownApi(api)
        return policy

    def _resolve(self, tenant: str, api: str, key: str) -> Target:
        """Raises InvalidRequest for a malformed tenant or key, UnknownApi for an api
        without a policy (neither is cached)."""
        validate_scope(tenant, key)
        policy = self.policy(tenant, api)
        return Target(
            policy,
            tuple(_bytes(name) for name in codec.redis_keys(tenant, api, key, policy)),
            (codec.packed_policy_block(policy),),
        )

    async def ready(self) -> None:
        """Check that Redis answers, that the node it writes to is a writable master, and
        load every script into its cache (EVALSHA reloads on demand anyway). Raises
        BackendUnavailable."""
        await self._call(self.redis.ping())
        await self._call(self._writable())
        await self.check_store()
        scripts = (
            self.lua_acquire,
            self.lua_release,
            self.lua_renew,
            self.lua_usage,
            self.lua_forget,
            self.lua_leave,
        )
        for script in scripts:
            await self._call(self.redis.script_load(script.script))

    async def acquire(
        self,
        tenant: str,
        api: str,
        key: str = "",
        cost: int = 1,
        runtime_estimate_ms: int | None = None,
        *,
        priority: str | None = None,
        ticket: str | None = None,
        line_wait_ms: int | None = None,
        now: int | None = None,
    ) -> Grant | Denial:
        """`priority` names a class of the api's policy (None: its default class); an api
        without classes accepts any priority and gives it no effect.

        The request takes its place in the line of its key (fleet-wide, in the store): it
        is granted only when every limit has room for the waiters ahead of it and for
        itself. With a `ticket`, a denial whose soonest grant lies within `line_wait_ms`
        joins the line (or keeps its place, refreshed for `TICKET_TTL_MS`); any other
        answer takes the ticket out of line."""
        target = self.target(tenant, api, key)
        policy = target.policy
        klass = self.priority_class(policy, priority)
        check_whole("cost", cost, 1)
        too_big = policy.impossible_cost(cost)
        if too_big is not None:
            raise InvalidRequest(
                "cost", f"{cost} can never be granted: the limit is {too_big.amount} calls"
            )
        too_big = policy.impossible_for_class(cost, klass)
        if too_big is not None and klass is not None:
            raise InvalidRequest(
                "cost",
                f"{cost} can never be granted to class {klass.name!r}: its share of the "
                f"limit is {klass.cap(too_big.amount)} calls",
            )
        estimate = (
            policy.runtime_estimate_ms if runtime_estimate_ms is None else runtime_estimate_ms
        )
        if estimate < 0:
            raise InvalidRequest("runtime_estimate", "must be >= 0")
        too_long = policy.impossible_runtime(estimate, klass)
        if too_long is not None:
            raise InvalidRequest(
                "runtime_estimate",
                f"{estimate / 1000:g} s can never be granted: the limit is "
                f"{too_long.amount / 1000:g} s",
            )
        ref = LeaseRef.new(tenant, api, key)
        if self._suspect and now is None and self.recovery_share is not None:
            await self.check_store()  # after a store error: was it a failover?
        permille = None if klass is None or klass.share_permille >= 1000 else klass.share_permille
        line = (ticket, 0 if klass is None else policy.classes.index(klass), line_wait_ms)
        reply = await self._acquire(ref, target, cost, estimate, permille, line, now)
        self._remember(tenant, api, reply)
        if isinstance(reply, codec.Granted):
            return Grant(ref.lease_id, tenant, api, key, cost, reply.now_ms, reply.expiry_ms)
        return Denial(
            "cooling_down" if reply.bound == 0 else "quota_exhausted",
            reply.retry_ms,
            policy.limits[reply.bound - 1] if reply.bound else None,
            reply.now_ms,
            reply.soonest_ms,
            reply.amount,
        )

    @staticmethod
    def priority_class(policy: Policy, priority: str | None) -> PriorityClass | None:
        """The class of `priority` in `policy`; raises InvalidRequest (field `priority`)
        for a class the policy does not have."""
        try:
            return policy.priority_class(priority)
        except ValueError as exc:
            raise InvalidRequest("priority", str(exc)) from None

    async def _acquire(
        self,
        ref: LeaseRef,
        target: Target,
        cost: int,
        estimate: int,
        class_permille: int | None,
        line: tuple[str | None, int, int | None],
        now: int | None,
    ) -> codec.Granted | codec.Denied:
        share = self.recovery_share
        known = self._known.get((ref.tenant, ref.api)) if share is not None else None
        if self.loss_on_start and self._started_ms is None:
            self._started_ms = now if now is not None else await self._redis_ms()
        args = AcquireArgs(
            now_ms=now,
            token=ref.member,
            cost=cost,
            estimate_ms=estimate,
            known_epoch=None if known is None else known[0],
            known_until=None if known is None else known[1],
            writer=None if share is None else self.writer,
            known_written=None if known is None else known[2],
            loss_on_start=self._started_ms,
            recovery=self.recovery,
            share_permille=None if share is None else round(share * 1000),
            class_permille=class_permille,
            ticket=line[0],
            rank=line[1],
            classes=len(target.policy.classes),
            aging_ms=target.policy.aging_ms,
            line_wait_ms=line[2],
            ticket_ttl_ms=TICKET_TTL_MS,
        )
        reply = await self._call(self.lua_acquire(keys=target.keys, args=args.argv(target.args)))
        return codec.decode_acquire(reply)

    def _remember(self, tenant: str, api: str, reply: codec.Granted | codec.Denied) -> None:
        if not reply.epoch_ms:
            return
        scope = (tenant, api)
        before = self._known.get(scope)
        if before is not None and before[0] != reply.epoch_ms and before[1] > reply.now_ms:
            event(
                logging.WARNING,
                "store_loss",
                f"the quota store lost the state of tenant {tenant} api {api}: granting "
                f"{self.recovery_share or 0:.0%} of each limit until its window no longer "
                f"overlaps {reply.epoch_ms} ms",
                tenant=tenant,
                api=api,
                since=reply.epoch_ms,
            )
        written = reply.written
        if before is not None and before[0] == reply.epoch_ms:
            # Replies to concurrent grants may come back out of order: the count only grows.
            written = max(written, before[2])
        self._known[scope] = (reply.epoch_ms, reply.until_ms, written)
        self._known.move_to_end(scope)
        if len(self._known) > KNOWN_STATES:
            self._known.popitem(last=False)

    async def _redis_ms(self) -> int:
        seconds, micros = await self._call(self.redis.time())
        return int(seconds) * 1000 + int(micros) // 1000

    async def release(
        self,
        lease_id: str,
        outcome: Outcome | str,
        *,
        retry_after_ms: int | None = None,
        runtime_ms: int | None = None,
        named: tuple[int, int] | None = None,
        runtime_upstream: bool = False,
        calls: int | None = None,
        keep: int = 0,
        now: int | None = None,
    ) -> Released:
        """End a lease; raises UnknownLease when it is unknown, expired or released.

        `named` is the limit a throttled answer named, (calls, window ms): the tenant
        learns it when it is below the policy's calls limit of that window.
        `runtime_upstream`: `runtime_ms` is the upstream's own report of how long it
        processed the call (Stats.ExecutionTime), not a time the client measured; the call
        then reached the upstream at least that long before the release, and its calls
        are charged that much earlier (never before the grant). A measured time gives no
        such bound (the request's way out is inside it), so it is charged at release.

        A lease of several call units (a block of calls, as the gateway takes them) may
        end in parts, on an api whose limits are all calls limits without probing:
        `calls` of its units were called (charged as a whole lease's are), `keep` stay in
        flight under the same lease, to be released later, and the rest were never
        called (refunded). InvalidRequest when calls + keep exceed the lease's cost;
        nothing changes then."""
        release = Release(
            lease_id, outcome, retry_after_ms, runtime_ms, named, runtime_upstream, calls, keep
        )
        ref, target, argv = self._release_argv(release, now)
        reply = await self._call(self.lua_release(keys=target.keys, args=argv))
        return self._released(ref, target.policy, named, reply)

    async def release_many(
        self, releases: Sequence[Release], *, now: int | None = None
    ) -> list[Released | UnknownLease | InvalidRequest]:
        """End several leases in one round trip: a pipeline, not a transaction, so each
        release is its own script, as atomic as `release` alone. Per release, in order,
        what it got: Released, UnknownLease for one unknown, expired or released, or
        InvalidRequest for one `release` would refuse (nothing changed for it). A
        store failure (BackendUnavailable) fails them all; a release sent twice changes
        nothing the second time, so the whole batch may be sent again."""
        results: list[Released | UnknownLease | InvalidRequest | None] = [None] * len(releases)
        sent: list[tuple[int, LeaseRef, Target, list[str | int | bytes]]] = []
        for at, release in enumerate(releases):
            try:
                ref, target, argv = self._release_argv(release, now)
            except (UnknownLease, InvalidRequest) as exc:
                results[at] = exc
            else:
                sent.append((at, ref, target, argv))
        if isinstance(self.redis, RedisCluster) or len(sent) < 2:
            # A cluster pipeline splits by node anyway: one script call each, at once.
            replies: list[Any] = list(
                await asyncio.gather(
                    *(self._call(self.lua_release(keys=t.keys, args=a)) for _, _, t, a in sent),
                    return_exceptions=True,
                )
            )
        else:
            replies = await self._call(self._pipelined([(t, a) for _, _, t, a in sent]))
        for (at, ref, target, _), reply in zip(sent, replies, strict=True):
            if isinstance(reply, BaseException):
                raise reply  # as `_call` raised it
            try:
                results[at] = self._released(ref, target.policy, releases[at].named, reply)
            except (UnknownLease, InvalidRequest) as exc:
                results[at] = exc
        return [result for result in results if result is not None]

    async def _pipelined(self, calls: list[tuple[Target, list[str | int | bytes]]]) -> list[Any]:
        """The release script for each (target, argv), in one pipeline; a reply that is an
        error is raised (the first), for `_call` to tell a store in trouble from a bug."""
        pipe = self.redis.pipeline(transaction=False)
        sha = self.lua_release.sha
        for target, argv in calls:
            pipe.evalsha(sha, len(target.keys), *target.keys, *argv)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        for n, reply in enumerate(replies):
            if isinstance(reply, NoScriptError):  # the store lost its scripts: reload
                target, argv = calls[n]
                replies[n] = await self.lua_release(keys=target.keys, args=argv)
            elif isinstance(reply, BaseException):
                raise reply
        return replies

    def _release_argv(
        self, release: Release, now: int | None
    ) -> tuple[LeaseRef, Target, list[str | int | bytes]]:
        ref, target = self._lease(release.lease_id)
        outcome = Outcome(release.outcome)
        retry_after_ms = release.retry_after_ms
        if outcome is Outcome.THROTTLED and retry_after_ms is None:
            # Upstream said 429 without a time: pause for its shortest window, the
            # span after which Defender's own counters have certainly moved on.
            retry_after_ms = target.policy.shortest_calls_window_ms
        named = release.named
        calls, keep = release.calls, release.keep
        if calls is not None or keep != 0:
            if calls is not None:
                check_whole("calls", calls, 0)
            check_whole("keep", keep, 0)
            if not target.policy.releases_in_parts:
                raise InvalidRequest(
                    "calls",
                    f"{ref.api} has a limit that is not a calls limit, or one that probes:"
                    " its leases end whole",
                )
        args = ReleaseArgs(
            now_ms=now,
            token=ref.member,
            outcome=outcome.value,
            retry_ms=retry_after_ms,
            runtime_ms=release.runtime_ms,
            named_amount=None if named is None else named[0],
            named_window_ms=None if named is None else named[1],
            learn_ttl_ms=self.learned_ttl_ms,
            ran_ms=release.runtime_ms if release.runtime_upstream else None,
            calls=calls,
            keep=keep or None,
        )
        return ref, target, args.argv(target.args)

    def _released(
        self, ref: LeaseRef, policy: Policy, named: tuple[int, int] | None, raw: Any
    ) -> Released:
        """What one release script answered; UnknownLease when nothing changed."""
        reply = codec.decode_release(raw)
        if reply.reason == "exceeds":
            raise InvalidRequest("calls", "calls and keep add up to more than the lease's cost")
        if not reply.found:
            raise UnknownLease(reply.reason)
        if reply.learned is not None and named is not None:
            self._log_learned(ref, policy, reply.learned, named)
        return Released(ref, reply.learned, reply.woke)

    def _log_learned(
        self, ref: LeaseRef, policy: Policy, learned: Learned, named: tuple[int, int]
    ) -> None:
        window = named[1] / 1000
        if learned.code == "LOWERED":
            configured = policy.limits[learned.index - 1].amount
            event(
                logging.WARNING,
                "learned_limit",
                f"learned limit: tenant {ref.tenant} api {ref.api} now grants "
                f"{learned.amount} calls per {window:g} s (was {learned.before}, the policy "
                f"says {configured}), as the upstream's 429 named; it holds "
                f"{self.learned_ttl_ms / 3_600_000:g} h or until forgotten",
                tenant=ref.tenant,
                api=ref.api,
                kind="calls",
                window=window,
                amount=learned.amount,
                configured=configured,
            )
            return
        hint = (ref.tenant, ref.api, named[0], named[1])
        if learned.code in ("HIGHER", "NO_LIMIT") and hint not in self._hinted:
            self._hinted.add(hint)
            why = (
                "allows no more than that"
                if learned.code == "HIGHER"
                else "has no calls limit of that window"
            )
            event(
                logging.INFO,
                "limit_hint",
                f"hint: the upstream named {named[0]} calls per {window:g} s for tenant "
                f"{ref.tenant} api {ref.api}; the policy {why}, so nothing changes",
                tenant=ref.tenant,
                api=ref.api,
                window=window,
                amount=named[0],
            )

    async def leave(
        self, tenant: str, api: str, key: str, ticket: str, *, now: int | None = None
    ) -> bool:
        """Take `ticket` out of the line of (tenant, api, key); whether it was in line."""
        target = self.target(tenant, api, key)
        args = LeaveArgs(now_ms=now, ticket=ticket)
        reply = await self._call(self.lua_leave(keys=target.keys, args=args.argv(target.args)))
        return codec.decode_leave(reply)

    async def forget(self, tenant: str, api: str, *, now: int | None = None) -> int:
        """Forget the limits (tenant, api) learned; returns how many were in force."""
        target = self.target(tenant, api, "")
        args = ForgetArgs(now_ms=now)
        reply = await self._call(self.lua_forget(keys=target.keys, args=args.argv(target.args)))
        forgotten = codec.decode_forget(reply)
        if forgotten:
            event(
                logging.WARNING,
                "learned_forgotten",
                f"learned limits forgotten: tenant {tenant} api {api} ({forgotten})",
                tenant=tenant,
                api=api,
            )
        return forgotten

    async def renew(
        self, lease_id: str, ttl_ms: int | None = None, *, now: int | None = None
    ) -> int:
        """Extend a live lease; returns ms until its new expiry."""
        ref, target = self._lease(lease_id)
        ttl = target.policy.lease_ttl_ms if ttl_ms is None else ttl_ms
        args = RenewArgs(now_ms=now, token=ref.member, renew_ttl_ms=ttl)
        reply = codec.decode_renew(
            await self._call(self.lua_renew(keys=target.keys, args=args.argv(target.args)))
        )
        if not reply.found or reply.expiry_ms is None:
            raise UnknownLease(reply.reason)
        return reply.expiry_ms - reply.now_ms

    async def usage(self, tenant: str, api: str, key: str = "", *, now: int | None = None) -> Usage:
        target = self.target(tenant, api, key)
        args = UsageArgs(now_ms=now)
        reply = codec.decode_usage(
            await self._call(self.lua_usage(keys=target.keys, args=args.argv(target.args)))
        )
        limits = tuple(
            LimitUsage(lim, used, resets, amount)
            for lim, (used, resets, amount) in zip(target.policy.limits, reply.limits, strict=True)
        )
        return Usage(
            tenant,
            api,
            key,
            limits,
            reply.in_flight,
            reply.cooldown_ms,
            reply.now_ms,
            reply.waiting,
        )

    def _lease(self, lease_id: str) -> tuple[LeaseRef, Target]:
        ref = LeaseRef.parse(lease_id)
        if ref is None:
            raise UnknownLease("unknown")
        try:
            return ref, self.target(ref.tenant, ref.api, ref.key)
        except (UnknownApi, InvalidRequest):
            raise UnknownLease("unknown") from None

    async def _writable(self) -> None:
        """Raise BackendUnavailable while the store cannot take writes: a cluster whose
        state is not `ok` (a slot uncovered, a master failing over), or a node (named by
        the URL or by the sentinels) that is a replica."""
        if isinstance(self.redis, RedisCluster):
            for node in self.redis.get_primaries():
                info = await self.redis.cluster_info(target_nodes=node)
                if info.get("cluster_state") != "ok":
                    raise BackendUnavailable(
                        f"the cluster node {node.name} reports cluster_state "
                        f"{info.get('cluster_state')}"
                    )
            return
        try:
            role = await self.redis.role()
        except ResponseError:
            return  # ROLE refused to this user (ACL): the writes themselves will tell
        name = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        if name != "master":
            raise BackendUnavailable(f"the store node is a {name}, not a writable master")

    async def _call(self, awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self.timeout):
                return await awaitable
        except TimeoutError as exc:
            self._suspect = True
            raise BackendUnavailable(f"no answer from Redis within {self.timeout:g} s") from exc
        except TRANSIENT as exc:
            self._suspect = True
            raise BackendUnavailable(str(exc) or type(exc).__name__) from exc
        except RedisError as exc:
            if str(exc).startswith(TRANSIENT_CODES):
                raise BackendUnavailable(str(exc)) from exc
            raise


__all__ = [
    "Denial",
    "Engine",
    "Grant",
    "LimitUsage",
    "Outcome",
    "Release",
    "Released",
    "Usage",
]
