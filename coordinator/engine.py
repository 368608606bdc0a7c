"""The quota engine: one Lua script, one Redis round trip, per decision.

Times are integer milliseconds here, as in Redis; the HTTP layer converts to seconds.
Every method takes an optional `now` (ms) that only tests pass, to drive virtual time
through the scripts; without it the scripts read Redis `TIME`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, TypeVar

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
from .codec import AcquireArgs, EpochArgs, ReleaseArgs, RenewArgs, UsageArgs
from .errors import BackendUnavailable, InvalidRequest, UnknownApi, UnknownLease
from .leases import LeaseRef
from .policy import KEY_PATTERN, TENANT_PATTERN, Limit, Policy, PolicySet
from .store import StoreClient

T = TypeVar("T")

SCRIPT_ACQUIRE = codec.script_source(AcquireArgs)
SCRIPT_RELEASE = codec.script_source(ReleaseArgs)
SCRIPT_RENEW = codec.script_source(RenewArgs)
SCRIPT_USAGE = codec.script_source(UsageArgs)
SCRIPT_EPOCH = codec.script_source(EpochArgs)

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

EPOCH_KEY = "qg:epoch"
log = logging.getLogger("quotagate")


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


@dataclass(frozen=True)
class LimitUsage:
    limit: Limit
    used: int  # call units, runtime ms, or leases in flight
    resets_in_ms: int  # until `used` next drops; 0 when nothing is used

    @property
    def remaining(self) -> int:
        return max(self.limit.amount - self.used, 0)


@dataclass(frozen=True)
class Usage:
    tenant: str
    api: str
    key: str
    limits: tuple[LimitUsage, ...]
    in_flight: int
    cooldown_ms: int
    now_ms: int


def validate_scope(tenant: str, key: str) -> None:
    if not TENANT_PATTERN.match(tenant):
        raise InvalidRequest("tenant", f"must match {TENANT_PATTERN.pattern}")
    if key and not KEY_PATTERN.match(key):
        raise InvalidRequest("key", f"must match {KEY_PATTERN.pattern}")


@dataclass(frozen=True)
class Target:
    """What one (tenant, api, key) resolves to: its policy, the keys of its state, and the
    policy block that closes every script's ARGV."""

    policy: Policy
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


class Engine:
    """Acquire, release, renew and read usage of leases against one Redis deployment.

    Every store call is bounded by `timeout` seconds (None: unbounded, for tests that
    freeze time) and a store that does not answer, or answers "again" or "elsewhere",
    raises BackendUnavailable.

    With `recovery_share` set, the engine tracks the store's epoch (`lua/epoch.lua`): when
    the store loses its state, every windowed limit grants at most that share of its
    amount until its window no longer overlaps the loss. `loss_on_start` treats an empty
    store at start as a loss too. Without it (None), no epoch is tracked.
    """

    def __init__(
        self,
        redis: StoreClient,
        policies: PolicySet,
        *,
        recovery_share: float | None = None,
        loss_on_start: bool = False,
        timeout: float | None = None,
    ) -> None:
        self.redis = redis
        self.policies = policies
        self.recovery_share = recovery_share
        self.loss_on_start = loss_on_start
        self.timeout = timeout
        self.epoch = ""  # start of the store's epoch (ms), as the scripts compare it
        self.recovery = ""  # "since_ms:share_permille" after a loss
        self.lua_acquire = redis.register_script(SCRIPT_ACQUIRE)
        self.lua_release = redis.register_script(SCRIPT_RELEASE)
        self.lua_renew = redis.register_script(SCRIPT_RENEW)
        self.lua_usage = redis.register_script(SCRIPT_USAGE)
        self.lua_epoch = redis.register_script(SCRIPT_EPOCH)
        # Resolved once per (tenant, api, key) seen lately: a decision then costs one
        # dictionary look-up before its round trip.
        self.target = functools.lru_cache(maxsize=4096)(self._resolve)

    async def check_epoch(self, *, now: int | None = None) -> None:
        """Read (or start) the store's epoch, and enter recovery if it began with a loss."""
        known = self.epoch
        args = EpochArgs(now_ms=now, known=known, loss_on_start=self.loss_on_start)
        reply = codec.decode_epoch(
            await self._call(self.lua_epoch(keys=[EPOCH_KEY], args=args.argv()))
        )
        start = str(reply.start_ms)
        self.epoch = start
        if reply.kind == "loss" and self.recovery_share is not None:
            if start != known:
                log.warning(
                    "the quota store lost its state at %s ms: granting %.0f%% of each limit "
                    "until its window no longer overlaps the loss",
                    start,
                    self.recovery_share * 100,
                )
            self.recovery = f"{start}:{round(self.recovery_share * 1000)}"

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
            policy, codec.redis_keys(tenant, api, key, policy), codec.policy_block(policy)
        )

    async def ready(self) -> None:
        """Check that Redis answers, that the node it writes to is a writable master, and
        load every script into its cache (EVALSHA reloads on demand anyway). Raises
        BackendUnavailable."""
        await self._call(self.redis.ping())
        await self._call(self._writable())
        scripts = (self.lua_acquire, self.lua_release, self.lua_renew, self.lua_usage)
        for script in (*scripts, self.lua_epoch):
            await self._call(self.redis.script_load(script.script))

    async def acquire(
        self,
        tenant: str,
        api: str,
        key: str = "",
        cost: int = 1,
        runtime_estimate_ms: int | None = None,
        *,
        now: int | None = None,
    ) -> Grant | Denial:
        target = self.target(tenant, api, key)
        policy = target.policy
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise InvalidRequest("cost", "must be a whole number >= 1")
        too_big = policy.impossible_cost(cost)
        if too_big is not None:
            raise InvalidRequest(
                "cost", f"{cost} can never be granted: the limit is {too_big.amount} calls"
            )
        estimate = (
            policy.runtime_estimate_ms if runtime_estimate_ms is None else runtime_estimate_ms
        )
        if estimate < 0:
            raise InvalidRequest("runtime_estimate", "must be >= 0")
        too_long = policy.impossible_runtime(estimate)
        if too_long is not None:
            raise InvalidRequest(
                "runtime_estimate",
                f"{estimate / 1000:g} s can never be granted: the limit is "
                f"{too_long.amount / 1000:g} s",
            )
        ref = LeaseRef.new(tenant, api, key)
        tracked = self.recovery_share is not None
        if tracked and not self.epoch:
            await self.check_epoch(now=now)
        reply = await self._acquire(ref, target, cost, estimate, now, verified=False)
        if isinstance(reply, codec.CheckEpoch):
            await self.check_epoch(now=now)
            reply = await self._acquire(ref, target, cost, estimate, now, verified=True)
        if isinstance(reply, codec.Granted):
            return Grant(ref.lease_id, tenant, api, key, cost, reply.now_ms, reply.expiry_ms)
        if isinstance(reply, codec.CheckEpoch):  # a verified acquire never asks again
            raise BackendUnavailable("the store's epoch changed during the acquire")
        return Denial(
            "cooling_down" if reply.bound == 0 else "quota_exhausted",
            reply.retry_ms,
            policy.limits[reply.bound - 1] if reply.bound else None,
            reply.now_ms,
            reply.soonest_ms,
        )

    async def _acquire(
        self,
        ref: LeaseRef,
        target: Target,
        cost: int,
        estimate: int,
        now: int | None,
        *,
        verified: bool,
    ) -> codec.Granted | codec.Denied | codec.CheckEpoch:
        args = AcquireArgs(
            now_ms=now,
            token=ref.member,
            cost=cost,
            estimate_ms=estimate,
            epoch=self.epoch,
            verified=verified,
            recovery=self.recovery,
        )
        reply = await self._call(self.lua_acquire(keys=target.keys, args=args.argv(target.args)))
        return codec.decode_acquire(reply)

    async def release(
        self,
        lease_id: str,
        outcome: Outcome | str,
        *,
        retry_after_ms: int | None = None,
        runtime_ms: int | None = None,
        now: int | None = None,
    ) -> LeaseRef:
        """End a lease; raises UnknownLease when it is unknown, expired or released."""
        ref, target = self._lease(lease_id)
        policy = target.policy
        outcome = Outcome(outcome)
        if outcome is Outcome.THROTTLED and retry_after_ms is None:
            # Upstream said 429 without a time: pause for its shortest window, the
            # span after which Defender's own counters have certainly moved on.
            retry_after_ms = policy.shortest_calls_window_ms
        args = ReleaseArgs(
            now_ms=now,
            token=ref.member,
            outcome=outcome.value,
            retry_ms=retry_after_ms,
            runtime_ms=runtime_ms,
        )
        reply = codec.decode_release(
            await self._call(self.lua_release(keys=target.keys, args=args.argv(target.args)))
        )
        if not reply.found:
            raise UnknownLease(reply.reason)
        return ref

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
            LimitUsage(lim, used, resets)
            for lim, (used, resets) in zip(target.policy.limits, reply.limits, strict=True)
        )
        return Usage(tenant, api, key, limits, reply.in_flight, reply.cooldown_ms, reply.now_ms)

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
            raise BackendUnavailable(f"no answer from Redis within {self.timeout:g} s") from exc
        except TRANSIENT as exc:
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
    "Usage",
]
