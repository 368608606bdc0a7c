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
from .policies import LocalLimit, LocalPolicy, PolicyBook


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
    def __init__(self, tenant: str, policies: PolicyBook | None = None) -> None:
        self.tenant = tenant
        self.policies = policies or PolicyBook()
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
        estimate = policy.runtime_estimate if runtime_estimate is None else runtime_estimate
        with self._lock:
            self._prune(policy, now)
            charges = self._charges.setdefault(api, deque())
            cooldown = self._cooldowns.get(api, 0.0) - now
            retry_after, bound = max(cooldown, 0.0), None
            for limit in policy.limits:
                wait = self._wait_for(limit, api, key, cost, estimate, now)
                if math.isinf(wait):
                    raise BadRequest(
                        f"{api}: no {limit.kind} limit of {limit.amount} can grant this"
                    )
                if wait > retry_after:
                    retry_after, bound = wait, limit
            if retry_after > 0:
                code = "cooling_down" if bound is None else "quota_exhausted"
                raise QuotaExhausted(retry_after, code, _describe(bound), status_code=None)
            lease_id = f"local.{secrets.token_hex(16)}"
            charges.append(_Charge(now, lease_id, key, cost, estimate))
            self._flights[lease_id] = _Flight(api, key, now + policy.lease_ttl, policy.lease_ttl)
        return Lease(lease_id, self.tenant, api, key, cost, policy.lease_ttl, waited, local=True)

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
        self, limit: LocalLimit, api: str, key: str, cost: int, estimate: float, now: float
    ) -> float:
        """Seconds until `limit` would let this request pass; 0 now, inf never."""
        if limit.kind == "concurrent":
            expiries = sorted(
                f.expires_at
                for f in self._flights.values()
                if f.api == api and f.expires_at > now and (limit.scope == "api" or f.key == key)
            )
            over = len(expiries) + 1 - int(limit.amount)
            return 0.0 if over <= 0 else expiries[over - 1] - now
        span = limit.window + limit.margin
        counted = [
            (c.at, c.calls if limit.kind == "calls" else c.runtime)
            for c in self._charges.get(api, ())
            if c.at > now - span and (limit.scope == "api" or c.key == key)
        ]
        need = cost if limit.kind == "calls" else estimate
        if need > limit.amount:
            return math.inf
        excess = sum(amount for _, amount in counted) + need - limit.amount
        if excess <= 0:
            return 0.0
        for at, amount in counted:  # oldest first: they leave the window first
            excess -= amount
            if excess <= 0:
                return at + span - now
        return 0.0  # not reached: need <= amount, so dropping every charge makes room

    def _prune(self, policy: LocalPolicy, now: float) -> None:
        span = max((lim.window + lim.margin for lim in policy.limits), default=0.0)
        charges = self._charges.get(policy.api)
        while charges and charges[0].at <= now - span:
            charges.popleft()
        for lease_id in [i for i, f in self._flights.items() if f.expires_at <= now]:
            del self._flights[lease_id]


def _describe(limit: LocalLimit | None) -> dict[str, Any] | None:
    if limit is None:
        return None
    window = limit.window if limit.kind != "concurrent" else None
    return {"kind": limit.kind, "amount": limit.amount, "window": window, "scope": limit.scope}
