"""A pure-Python reference model of the quota scripts, for one (tenant, api).

It states the rules of the design directly (conservative buckets, exact retry times,
leases with expiry, cooldown, refunds) with `now` passed in, and serves as the oracle
that the Lua engine is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from quotagate.coordinator.policy import Kind, Limit, Policy, Scope


@dataclass
class ModelLease:
    key: str
    grant: int
    cost: int
    estimate: int
    expiry: int


@dataclass
class Decision:
    granted: bool
    retry_ms: int = 0
    bound: int = 0  # 1-based limit index, 0 = cooldown
    expiry: int = 0


def counted(lim: Limit, buckets: dict[int, int], now: int) -> list[tuple[int, int]]:
    """Buckets overlapping (now - window - margin, now], oldest first."""
    horizon = now - lim.window_ms - lim.margin_ms
    return sorted((i, u) for i, u in buckets.items() if (i + 1) * lim.granularity_ms > horizon)


def bucket_end(lim: Limit, index: int) -> int:
    return (index + 1) * lim.granularity_ms + lim.window_ms + lim.margin_ms


def wait_for_units(
    lim: Limit, buckets: list[tuple[int, int]], need: int, amount: int, now: int
) -> int:
    """Ms until `need` more units fit under `amount`; -1 if they never can."""
    over = sum(u for _, u in buckets) + need - amount
    wait = 0
    for index, units in buckets:
        if over <= 0:
            break
        over -= units
        wait = bucket_end(lim, index) - now
    return -1 if over > 0 else wait


@dataclass
class Model:
    policy: Policy
    counters: dict[tuple[object, ...], dict[int, int]] = field(default_factory=dict)
    leases: dict[str, ModelLease] = field(default_factory=dict)
    cooldown_until: int = 0
    recovery: tuple[int, int] | None = None  # (loss at ms, share in permille)

    def _counter(self, lim: Limit, key: str) -> dict[int, int]:
        name = (
            lim.kind,
            lim.window_ms,
            lim.granularity_ms,
            key if lim.scope is Scope.KEY else None,
        )
        return self.counters.setdefault(name, {})

    def _live(self, lim: Limit, key: str, now: int) -> list[int]:
        return sorted(
            lease.expiry
            for lease in self.leases.values()
            if lease.expiry > now and (lim.scope is Scope.API or lease.key == key)
        )

    def acquire(
        self, token: str, key: str, cost: int, estimate: int, ttl: int, now: int
    ) -> Decision:
        retry, bound = max(self.cooldown_until - now, 0), 0
        for i, lim in enumerate(self.policy.limits, start=1):
            if lim.kind is Kind.CONCURRENT:
                live = self._live(lim, key, now)
                wait = 0 if len(live) < lim.amount else live[len(live) - lim.amount] - now
            else:
                need = cost if lim.kind is Kind.CALLS else estimate
                buckets = counted(lim, self._counter(lim, key), now)
                wait = wait_for_units(lim, buckets, need, lim.amount, now)
                if self.recovery and now < self.recovery[0] + lim.window_ms + lim.margin_ms:
                    # Until the window no longer overlaps the loss, only a share is granted.
                    recovered = self.recovery[0] + lim.window_ms + lim.margin_ms
                    share = lim.amount * self.recovery[1] // 1000
                    reduced = wait_for_units(lim, buckets, need, share, now)
                    wait = max(recovered - now, wait)
                    if 0 <= reduced < wait:
                        wait = reduced
                if wait < 0:
                    return Decision(False, -1, i)
            if wait > retry:
                retry, bound = wait, i
        if retry > 0:
            return Decision(False, retry, bound)
        for lim in self.policy.limits:
            if lim.kind is not Kind.CONCURRENT:
                units = cost if lim.kind is Kind.CALLS else estimate
                if units > 0:
                    counter = self._counter(lim, key)
                    index = now // lim.granularity_ms
                    counter[index] = counter.get(index, 0) + units
        self.leases[token] = ModelLease(key, now, cost, estimate, now + ttl)
        return Decision(True, expiry=now + ttl)

    def _uncharge(self, lim: Limit, key: str, at: int, units: int) -> None:
        counter = self._counter(lim, key)
        index = at // lim.granularity_ms
        if units > 0 and index in counter:
            counter[index] -= units
            if counter[index] <= 0:
                del counter[index]

    def release(
        self, token: str, outcome: str, retry: int | None, runtime: int | None, now: int
    ) -> str:
        lease = self.leases.pop(token, None)
        if lease is None:
            return "unknown"
        if lease.expiry <= now:
            return "expired"
        for lim in self.policy.limits:
            if lim.kind is Kind.CALLS and outcome == "not_called":
                self._uncharge(lim, lease.key, lease.grant, lease.cost)
            elif lim.kind is Kind.RUNTIME and (outcome == "not_called" or runtime is not None):
                self._uncharge(lim, lease.key, lease.grant, lease.estimate)
                if runtime is not None and runtime > 0 and outcome != "not_called":
                    counter = self._counter(lim, lease.key)
                    index = now // lim.granularity_ms
                    counter[index] = counter.get(index, 0) + runtime
        if outcome == "throttled" and retry:
            self.cooldown_until = max(self.cooldown_until, now + retry)
        return "released"

    def renew(self, token: str, ttl: int, now: int) -> int | str:
        lease = self.leases.get(token)
        if lease is None:
            return "unknown"
        if lease.expiry <= now:
            del self.leases[token]
            return "expired"
        lease.expiry = max(lease.expiry, now + ttl)
        return lease.expiry - now

    def usage(self, key: str, now: int) -> tuple[int, int, list[tuple[int, int]]]:
        """(cooldown ms, in flight, [(used, resets_in) per limit])."""
        per_limit = []
        for lim in self.policy.limits:
            if lim.kind is Kind.CONCURRENT:
                live = self._live(lim, key, now)
                per_limit.append((len(live), live[0] - now if live else 0))
            else:
                buckets = counted(lim, self._counter(lim, key), now)
                resets = bucket_end(lim, buckets[0][0]) - now if buckets else 0
                per_limit.append((sum(u for _, u in buckets), resets))
        in_flight = sum(1 for lease in self.leases.values() if lease.expiry > now)
        return max(self.cooldown_until - now, 0), in_flight, per_limit
