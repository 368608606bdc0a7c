"""A process-local limiter that stands in for the coordinator while it cannot be reached.

It knows only this process's grants, so it is kept conservative the other way: each
limit counts grants in an exact sliding window widened by the limit's margin, a
throttled release cools the whole api down, and an api without a known policy is
refused rather than let through. Every method takes `now` (monotonic seconds), so the
arithmetic is tested without sleeping.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .exceptions import BadRequest, QuotaExhausted
from .lease import Lease
from .policy_core import Kind, Limit, Policy, PolicySet, Scope


@dataclass(slots=True)
class _Charge:
    at: float  # when it was charged
    lease_id: str
    key: str
    calls: int
    runtime: float  # seconds: the estimate, until a release reports the real one


@dataclass(slots=True)
class _Flight:
    api: str
    key: str
    expires_at: float
    ttl: float


class LocalLimiter:
    def __init__(self, tenant: str, policies: PolicySet | None = None) -> None:
        self.tenant = tenant
        self.policies = policies or PolicySet({})
        self._lock = threading.Lock()
        self._charges: dict[str, deque[_Charge]] = {}
        self._flights: dict[str, _Flight] = {}
        self._cooldowns: dict[str, float] = {}

    def knows(self, api: str) -> bool:
        return self.policies.resolve(self.tenant, api) is not None

    def acquire(
        self,
        api: str,
        key: str,
        cost: int,
        runtime_estimate: float | None,
        now: float,
        waited: float = 0.0,
    ) -> Lease:
        """A local lease, or `QuotaExhausted` with the exact time until one could pass."""
        policy = self.policies.resolve(self.tenant, api)
        if policy is None:
            raise KeyError(api)
        if runtime_estimate is None:
            runtime_estimate = policy.runtime_estimate_ms / 1000
        ttl = policy.lease_ttl_ms / 1000
        with self._lock:
            self._prune(policy, now)
            charges = self._charges.setdefault(api, deque())
            cooldown = self._cooldowns.get(api, 0.0) - now
            retry_after, bound = max(cooldown, 0.0), None
            for limit in policy.limits:
                wait = self._wait_for(limit, api, key, cost, runtime_estimate, now)
                if math.isinf(wait):
                    amount = limit.describe()["amount"]
                    raise BadRequest(f"{api}: no {limit.kind} limit of {amount} can grant this")
                if wait > retry_after:
                    retry_after, bound = wait, limit
            if retry_after > 0:
                code = "cooling_down" if bound is None else "quota_exhausted"
                raise QuotaExhausted(retry_after, code, _describe(bound), status_code=None)
            lease_id = f"local.{secrets.token_hex(16)}"
            charges.append(_Charge(now, lease_id, key, cost, runtime_estimate))
            self._flights[lease_id] = _Flight(api, key, now + ttl, ttl)
        return Lease(lease_id, self.tenant, api, key, cost, ttl, waited, local=True)

    def release(self, lease: Lease, body: Mapping[str, Any], now: float) -> bool:
        """Apply a release body (see `Lease.release_body`); False for an unknown lease."""
        outcome, retry_after, runtime = (
            body.get("outcome"),
            body.get("retry_after"),
            body.get("runtime"),
        )
        with self._lock:
            if outcome == "throttled" and retry_after:
                # Even for an expired lease: the upstream said stop, every caller must.
                until = max(self._cooldowns.get(lease.api, 0.0), now + float(retry_after))
                self._cooldowns[lease.api] = until
            if self._flights.pop(lease.lease_id, None) is None:
                return False
            charges = self._charges.get(lease.api, deque())
            charge = next((c for c in charges if c.lease_id == lease.lease_id), None)
            if charge is None:
                return True
            if outcome == "not_called":
                charges.remove(charge)
            elif runtime is not None:
                # Charged at release time like the coordinator does: the later, safer side.
                charge.runtime = 0.0
                charges.append(_Charge(now, lease.lease_id, lease.key, 0, float(runtime)))
            return True

    def renew(self, lease: Lease, now: float) -> float | None:
        """The new time to live in seconds, or None if the lease is unknown or expired."""
        with self._lock:
            flight = self._flights.get(lease.lease_id)
            if flight is None or flight.expires_at <= now:
                return None
            flight.expires_at = now + flight.ttl
            return flight.ttl

    def _wait_for(
        self, limit: Limit, api: str, key: str, cost: int, estimate: float, now: float
    ) -> float:
        """Seconds until `limit` would let this request pass; 0 now, inf never."""
        if limit.kind is Kind.CONCURRENT:
            expiries = sorted(
                f.expires_at
                for f in self._flights.values()
                if f.api == api
                and f.expires_at > now
                and (limit.scope is Scope.API or f.key == key)
            )
            over = len(expiries) + 1 - limit.amount
            return 0.0 if over <= 0 else expiries[over - 1] - now
        span = limit.span_ms / 1000
        calls = limit.kind is Kind.CALLS
        counted = [
            (c.at, c.calls if calls else c.runtime)
            for c in self._charges.get(api, ())
            if c.at > now - span and (limit.scope is Scope.API or c.key == key)
        ]
        # Run time is charged in seconds here; the policy holds milliseconds.
        need, allowed = (cost, limit.amount) if calls else (estimate, limit.amount / 1000)
        if need > allowed:
            return math.inf
        excess = sum(amount for _, amount in counted) + need - allowed
        if excess <= 0:
            return 0.0
        for at, amount in counted:  # oldest first: they leave the window first
            excess -= amount
            if excess <= 0:
                return at + span - now
        return 0.0  # not reached: need <= amount, so dropping every charge makes room

    def _prune(self, policy: Policy, now: float) -> None:
        span = policy.longest_window_ms / 1000
        charges = self._charges.get(policy.api)
        while charges and charges[0].at <= now - span:
            charges.popleft()
        for lease_id in [i for i, f in self._flights.items() if f.expires_at <= now]:
            del self._flights[lease_id]


def _describe(limit: Limit | None) -> dict[str, Any] | None:
    return None if limit is None else {**limit.describe(), "scope": limit.scope.value}
