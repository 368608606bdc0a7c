"""The quota engine: one Lua script, one Redis round trip, per decision.

Times are integer milliseconds here, as in Redis; the HTTP layer converts to seconds.
Every method takes an optional `now` (ms) that only tests pass, to drive virtual time
through the scripts; without it the scripts read Redis `TIME`.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .errors import BackendUnavailable, InvalidRequest, UnknownApi, UnknownLease
from .leases import LeaseRef, policy_args, redis_keys
from .policy import KEY_PATTERN, TENANT_PATTERN, Limit, Policy, PolicySet
from .store import Script

LUA_DIR = Path(__file__).parent.parent / "lua"


def _script(name: str) -> str:
    """`lua/<name>.lua` behind the helpers of `lua/lib.lua` that it calls, directly or
    through another helper: each EVALSHA runs the whole text, and every helper defined is a
    closure made on every call."""
    body = (LUA_DIR / f"{name}.lua").read_text()
    head, *parts = re.split(r"(?m)^(?=local function )", (LUA_DIR / "lib.lua").read_text())
    helpers = {re.match(r"local function (\w+)", part)[1]: part for part in parts}  # type: ignore[index]
    wanted: set[str] = set()
    todo = [body]
    while todo:
        text = todo.pop()
        for helper, source in helpers.items():
            if helper not in wanted and re.search(rf"\b{helper}\(", text):
                wanted.add(helper)
                todo.append(source)
    return head + "".join(source for helper, source in helpers.items() if helper in wanted) + body


SCRIPT_ACQUIRE = _script("acquire")
SCRIPT_RELEASE = _script("release")
SCRIPT_RENEW = _script("renew")
SCRIPT_USAGE = _script("usage")
SCRIPT_EPOCH = _script("epoch")

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
    script arguments that its policy fixes."""

    policy: Policy
    keys: tuple[str, ...]
    args: tuple[str | int, ...]  # every script's ARGV after its per-call values


class Engine:
    """Acquire, release, renew and read usage of leases against one Redis deployment.

    With `recovery_share` set, the engine tracks the store's epoch (`lua/epoch.lua`): when
    the store loses its state, every windowed limit grants at most that share of its
    amount until its window no longer overlaps the loss. `loss_on_start` treats an empty
    store at start as a loss too. Without it (None), no epoch is tracked.
    """

    def __init__(
        self,
        redis: Redis,
        policies: PolicySet,
        *,
        recovery_share: float | None = None,
        loss_on_start: bool = False,
    ) -> None:
        self.redis = redis
        self.policies = policies
        self.recovery_share = recovery_share
        self.loss_on_start = loss_on_start
        self.epoch = ""  # start of the store's epoch (ms), as the scripts compare it
        self.recovery = ""  # "since_ms:share_permille" after a loss
        self.lua_acquire = Script(redis, SCRIPT_ACQUIRE)
        self.lua_release = Script(redis, SCRIPT_RELEASE)
        self.lua_renew = Script(redis, SCRIPT_RENEW)
        self.lua_usage = Script(redis, SCRIPT_USAGE)
        self.lua_epoch = Script(redis, SCRIPT_EPOCH)
        # Resolved once per (tenant, api, key) seen lately: a decision then costs one
        # dictionary look-up before its round trip.
        self.target = functools.lru_cache(maxsize=4096)(self._resolve)

    async def check_epoch(self, *, now: int | None = None) -> None:
        """Read (or start) the store's epoch, and enter recovery if it began with a loss."""
        known = self.epoch
        reply = await self._call(
            self.lua_epoch(
                keys=[EPOCH_KEY],
                args=["" if now is None else now, known, "1" if self.loss_on_start else ""],
            )
        )
        start, kind = str(int(reply[0])), _text(reply[1])
        self.epoch = start
        if kind == "loss" and self.recovery_share is not None:
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
        return Target(policy, redis_keys(tenant, api, key, policy), policy_args(policy))

    async def ready(self) -> None:
        """Check that Redis answers and load every script into its cache (EVALSHA reloads
        on demand anyway). Raises BackendUnavailable."""
        await self._call(self.redis.ping())
        scripts = (self.lua_acquire, self.lua_release, self.lua_renew, self.lua_usage)
        for script in (*scripts, self.lua_epoch):
            script.sha = await self._call(self.redis.script_load(script.script))

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
        if reply[0] == 2:  # this (tenant, api) carries no stamp of the epoch we know
            await self.check_epoch(now=now)
            reply = await self._acquire(ref, target, cost, estimate, now, verified=True)
        if reply[0] == 1:
            return Grant(ref.lease_id, tenant, api, key, cost, int(reply[1]), int(reply[2]))
        bound = int(reply[3])
        return Denial(
            "cooling_down" if bound == 0 else "quota_exhausted",
            int(reply[2]),
            policy.limits[bound - 1] if bound else None,
            int(reply[1]),
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
    ) -> Any:
        return await self._call(
            self.lua_acquire(
                keys=target.keys,
                args=(
                    "" if now is None else now,
                    ref.member,
                    cost,
                    estimate,
                    self.epoch,
                    "1" if verified else "",
                    self.recovery,
                    *target.args,
                ),
            )
        )

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
        reply = await self._call(
            self.lua_release(
                keys=target.keys,
                args=(
                    "" if now is None else now,
                    ref.member,
                    outcome.value,
                    "" if retry_after_ms is None else retry_after_ms,
                    "" if runtime_ms is None else runtime_ms,
                    *target.args,
                ),
            )
        )
        if reply[0] != 1:
            raise UnknownLease(_text(reply[2]))
        return ref

    async def renew(
        self, lease_id: str, ttl_ms: int | None = None, *, now: int | None = None
    ) -> int:
        """Extend a live lease; returns ms until its new expiry."""
        ref, target = self._lease(lease_id)
        ttl = target.policy.lease_ttl_ms if ttl_ms is None else ttl_ms
        reply = await self._call(
            self.lua_renew(
                keys=target.keys,
                args=("" if now is None else now, ref.member, ttl, *target.args),
            )
        )
        if reply[0] != 1:
            raise UnknownLease(_text(reply[2]))
        return int(reply[2]) - int(reply[1])

    async def usage(self, tenant: str, api: str, key: str = "", *, now: int | None = None) -> Usage:
        target = self.target(tenant, api, key)
        policy = target.policy
        reply = await self._call(
            self.lua_usage(
                keys=target.keys,
                args=("" if now is None else now, *target.args),
            )
        )
        limits = tuple(
            LimitUsage(lim, int(reply[3 + 2 * i]), int(reply[4 + 2 * i]))
            for i, lim in enumerate(policy.limits)
        )
        return Usage(tenant, api, key, limits, int(reply[2]), int(reply[1]), int(reply[0]))

    def _lease(self, lease_id: str) -> tuple[LeaseRef, Target]:
        ref = LeaseRef.parse(lease_id)
        if ref is None:
            raise UnknownLease("unknown")
        try:
            return ref, self.target(ref.tenant, ref.api, ref.key)
        except (UnknownApi, InvalidRequest):
            raise UnknownLease("unknown") from None

    @staticmethod
    async def _call(awaitable: Any) -> Any:
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise BackendUnavailable(str(exc) or type(exc).__name__) from exc
        except RedisError as exc:
            if "NOSCRIPT" in str(exc) or "LOADING" in str(exc) or "READONLY" in str(exc):
                raise BackendUnavailable(str(exc)) from exc
            raise


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


__all__ = [
    "Denial",
    "Engine",
    "Grant",
    "LimitUsage",
    "Outcome",
    "Usage",
]
