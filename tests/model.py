"""A pure-Python reference model of the quota scripts, for one (tenant, api).

It states the rules of the design directly (conservative buckets, exact retry times,
leases with expiry, cooldown, refunds) with `now` passed in, and serves as the oracle
that the Lua engine is checked against.

Design rule 3, as the model states it: a lease that has not been released counts in the
bucket of its expiry, in full while it is in flight (whatever its age); a released lease
counts in the bucket of its release (its calls in that of its latest arrival when the
upstream reported its own processing time: the release less that time, not before the
grant), a refunded one nowhere. A denial's soonest grant is
its wait as if every lease in flight were released now: a calls lease's units then sit in
the bucket of now, a runtime lease's estimate is gone (it may have run no time).

Learned limits and probing (design rule 8), as the model states them: a throttled release
naming a calls limit's window lowers that limit to the named amount (never above the
policy's, never below 1). A calls limit with `assured` below its amount grants freely up to
its confirmed level (at first `assured`, never above the amount in force); a grant that
takes the count above it is a probe, granted only while nothing else of that counter is in
flight. A probe released `ok` confirms its units plus those of every `ok` release granted
in a whole bucket after (arrival - window + margin) and before the probe's grant bucket,
where arrival is the latest the probe can have arrived (its release, less the run time
the upstream itself reported: a measured one bounds nothing);
a named limit confirms the amount then in force.

Priority classes, as the model states them: a lease of a class with a share is granted
only while each windowed limit's use (every class's, in flight included) plus its units
stays within `amount * share_permille // 1000`; in recovery, within the recovery share of
that cap. Concurrent limits are shared alike.

Aging, as the model states it: a grant of a lower class (rank > 0) stamps its rank with
its time, and the first grant of all stamps every lower class. A lower class whose stamp
is the policy's `aging_ms` old has aged: its grant is capped by the whole limit. One not
aged yet gets a retry and soonest no later than its aging (nor before the cooldown ends).
(The model has no line; the line's order under aging is modelled in
tests/test_line_properties.py.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from quotagate.coordinator.policy import Kind, Limit, Policy, Scope


@dataclass
class ModelLease:
    key: str
    grant: int
    cost: int
    estimate: int
    expiry: int

    def units(self, lim: Limit) -> int:
        return self.cost if lim.kind is Kind.CALLS else self.estimate


@dataclass
class Decision:
    granted: bool
    retry_ms: int = 0
    bound: int = 0  # 1-based limit index, 0 = cooldown
    expiry: int = 0
    soonest: int = 0  # the wait if every lease in flight were released now


def counted(
    lim: Limit, buckets: dict[int, int], now: int, unreleased: Sequence[ModelLease] = ()
) -> list[tuple[int, int]]:
    """Buckets overlapping (now - window - margin, now], and every unreleased lease in
    flight, as (bucket index, units), oldest first."""
    horizon = now - lim.window_ms - lim.margin_ms
    found = [(i, u) for i, u in buckets.items() if (i + 1) * lim.granularity_ms > horizon]
    for lease in unreleased:
        units = lease.units(lim)
        index = lease.expiry // lim.granularity_ms
        if units > 0 and (lease.expiry > now or (index + 1) * lim.granularity_ms > horizon):
            found.append((index, units))
    return sorted(found)


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
    stamps: dict[int, int] = field(default_factory=dict)  # lower class rank -> last grant

    def aged(self, rank: int, now: int) -> bool:
        aging, stamp = self.policy.aging_ms, self.stamps.get(rank)
        return aging is not None and stamp is not None and now - stamp >= aging

    def _stamp(self, rank: int, now: int) -> None:
        if self.policy.aging_ms is None:
            return
        for lower in range(1, len(self.policy.classes)):
            if lower == rank or lower not in self.stamps:
                self.stamps[lower] = now

    learned: dict[int, int] = field(default_factory=dict)  # limit index -> amount
    confirmed: dict[int, int] = field(default_factory=dict)  # limit index -> level
    probes: dict[int, str] = field(default_factory=dict)  # limit index -> probe's token
    # (limit index, key or None) -> (grant ms, units) of each ok release while probing
    accepted: dict[tuple[int, str | None], list[tuple[int, int]]] = field(default_factory=dict)

    def in_force(self, i: int) -> int:
        lim = self.policy.limits[i]
        return min(lim.amount, self.learned.get(i, lim.amount))

    def level(self, i: int) -> int:
        """The confirmed level of limit i: the amount in force unless it probes."""
        lim = self.policy.limits[i]
        if lim.kind is not Kind.CALLS or lim.assured is None:
            return self.in_force(i)
        return min(max(lim.assured, self.confirmed.get(i, 0)), self.in_force(i))

    def _in_flight(self, lim: Limit, key: str, now: int) -> list[ModelLease]:
        """The leases still in flight in the counter (until their expiry's bucket ends)."""
        gran = lim.granularity_ms
        return [
            lease
            for lease in self._unreleased(lim, key)
            if lease.units(lim) > 0 and (lease.expiry // gran + 1) * gran > now
        ]

    def _scope(self, i: int, key: str) -> tuple[int, str | None]:
        return i, key if self.policy.limits[i].scope is Scope.KEY else None

    def _counter(self, lim: Limit, key: str) -> dict[int, int]:
        name = (
            lim.kind,
            lim.window_ms,
            lim.granularity_ms,
            key if lim.scope is Scope.KEY else None,
        )
        return self.counters.setdefault(name, {})

    def _unreleased(self, lim: Limit, key: str) -> list[ModelLease]:
        return [
            lease for lease in self.leases.values() if lim.scope is Scope.API or lease.key == key
        ]

    def _counted(self, lim: Limit, key: str, now: int) -> list[tuple[int, int]]:
        return counted(lim, self._counter(lim, key), now, self._unreleased(lim, key))

    def _charge(self, lim: Limit, key: str, at: int, units: int) -> None:
        if units > 0:
            counter = self._counter(lim, key)
            index = at // lim.granularity_ms
            counter[index] = counter.get(index, 0) + units

    def _settle(self, lease: ModelLease) -> None:
        """An expired lease leaves the books: its units stay, in the bucket of its expiry."""
        for lim in self.policy.limits:
            if lim.kind is not Kind.CONCURRENT:
                self._charge(lim, lease.key, lease.expiry, lease.units(lim))

    def _live(self, lim: Limit, key: str, now: int) -> list[int]:
        return sorted(
            lease.expiry
            for lease in self.leases.values()
            if lease.expiry > now and (lim.scope is Scope.API or lease.key == key)
        )

    def _window_wait(
        self, lim: Limit, buckets: list[tuple[int, int]], need: int, now: int, cap: int
    ) -> int:
        wait = wait_for_units(lim, buckets, need, cap, now)
        if self.recovery and now < self.recovery[0] + lim.window_ms + lim.margin_ms:
            # Until the window no longer overlaps the loss, only a share is granted.
            recovered = self.recovery[0] + lim.window_ms + lim.margin_ms
            share = cap * self.recovery[1] // 1000
            reduced = wait_for_units(lim, buckets, need, share, now)
            wait = max(recovered - now, wait)
            if 0 <= reduced < wait:
                wait = reduced
        return wait

    def _released_now(self, lim: Limit, key: str, now: int) -> list[tuple[int, int]]:
        """The counted buckets as if every lease in flight were released `ok` now: a calls
        lease's units in the bucket of now; a runtime lease having run no time (a release
        charges the run time it reports, not the estimate), so its estimate is gone; but
        not that of a lease expiring within the current bucket, which the script cannot
        tell from one that has expired (it keeps units in flight per bucket of expiry),
        and which no release ends."""
        live = [lease for lease in self._unreleased(lim, key) if lease.expiry > now]
        rest = [lease for lease in self._unreleased(lim, key) if lease.expiry <= now]
        here = now // lim.granularity_ms
        moved = [(here, lease.units(lim)) for lease in live if lease.units(lim) > 0]
        if lim.kind is Kind.RUNTIME:
            moved = []
            rest += [lease for lease in live if lease.expiry // lim.granularity_ms == here]
        return sorted(counted(lim, self._counter(lim, key), now, rest) + moved)

    def acquire(
        self,
        token: str,
        key: str,
        cost: int,
        estimate: int,
        ttl: int,
        now: int,
        class_permille: int = 1000,
        rank: int = 0,
    ) -> Decision:
        promoted = self.aged(rank, now)
        if promoted:
            class_permille = 1000
        retry, bound = max(self.cooldown_until - now, 0), 0
        soonest = retry
        probing = []
        for i, lim in enumerate(self.policy.limits, start=1):
            soon = 0  # a concurrency slot frees at once when a lease is released
            if lim.kind is Kind.CONCURRENT:
                live = self._live(lim, key, now)
                wait = 0 if len(live) < lim.amount else live[len(live) - lim.amount] - now
            else:
                need = cost if lim.kind is Kind.CALLS else estimate
                cap = self.in_force(i - 1) * class_permille // 1000
                buckets = self._counted(lim, key, now)
                wait = self._window_wait(lim, buckets, need, now, cap)
                if wait < 0:
                    return Decision(False, -1, i, soonest=-1)
                soon = self._window_wait(lim, self._released_now(lim, key, now), need, now, cap)
                level = self.level(i - 1)
                used = sum(units for _, units in buckets)
                if wait == 0 and level < self.in_force(i - 1) and used + need > level:
                    flying = self._in_flight(lim, key, now)
                    if flying:
                        wait, soon = self._probe_wait(lim, buckets, need, level, flying, now), 0
                    else:
                        probing.append(i - 1)
            if wait > retry:
                retry, bound = wait, i
            soonest = max(soonest, soon)
        stamp = self.stamps.get(rank) if self.policy.aging_ms is not None and rank else None
        if retry > 0 and stamp is not None and not promoted:
            ages_in = stamp + (self.policy.aging_ms or 0) - now
            pause = max(self.cooldown_until - now, 0)
            retry = max(min(retry, ages_in), pause)
            soonest = max(min(soonest, ages_in), pause)
        if retry > 0:
            return Decision(False, retry, bound, soonest=soonest)
        self._stamp(rank, now)
        self.leases[token] = ModelLease(key, now, cost, estimate, now + ttl)
        for i in probing:
            self.probes[i] = token
        return Decision(True, expiry=now + ttl)

    @staticmethod
    def _probe_wait(
        lim: Limit,
        buckets: list[tuple[int, int]],
        need: int,
        level: int,
        flying: list[ModelLease],
        now: int,
    ) -> int:
        """Until the count fits the confirmed level, or the last lease in flight expires."""
        wait = wait_for_units(lim, buckets, need, level, now)
        gran = lim.granularity_ms
        last = max((lease.expiry // gran + 1) * gran - now for lease in flying)
        if wait < 0 or last < wait:
            wait = last
        return max(wait, 1)

    def release(
        self,
        token: str,
        outcome: str,
        retry: int | None,
        runtime: int | None,
        now: int,
        named: tuple[int, int] | None = None,
        upstream: bool = False,
        calls: int | None = None,
        keep: int = 0,
    ) -> str:
        """`upstream`: `runtime` is the upstream's own processing time, so the call arrived
        by now - runtime (1 ms allowed for rounding up), where its calls are charged (not
        before its grant); its run time is charged now. `calls` of a calls-only lease's
        units were called (None: all), `keep` stay in flight as the same lease of that
        cost, and the rest are refunded; more than its cost changes nothing."""
        lease = self.leases.get(token)
        if lease is None:
            return "unknown"
        if lease.expiry > now and (lease.cost if calls is None else calls) + keep > lease.cost:
            return "exceeds"
        del self.leases[token]
        if lease.expiry <= now:
            self._settle(lease)
            return "expired"
        if calls is not None or keep:
            if keep:
                self.leases[token] = ModelLease(
                    lease.key, lease.grant, keep, lease.estimate, lease.expiry
                )
            lease = ModelLease(lease.key, lease.grant, calls or 0, lease.estimate, lease.expiry)
        arrived = now  # the latest the call can have arrived
        if upstream and runtime is not None and runtime > 1:
            arrived = max(lease.grant, now - runtime + 1)
        self._probing(lease, token, outcome, named, arrived)
        for lim in self.policy.limits:
            if lim.kind is Kind.CONCURRENT or outcome == "not_called":
                continue
            charged = lease.cost if lim.kind is Kind.CALLS else lease.estimate
            if lim.kind is Kind.RUNTIME and runtime is not None:
                charged = runtime
            at = now
            if lim.kind is Kind.CALLS:
                # Never before every window that still counts: at the oldest bucket that does.
                oldest = (now - lim.window_ms - lim.margin_ms) // lim.granularity_ms
                at = max(arrived, oldest * lim.granularity_ms)
            self._charge(lim, lease.key, at, charged)
        if outcome == "throttled" and retry:
            self.cooldown_until = max(self.cooldown_until, now + retry)
        return "released"

    def _probing(
        self, lease: ModelLease, token: str, outcome: str, named: tuple[int, int] | None, now: int
    ) -> None:
        """What a release does to learned limits, confirmed levels and probes; `now` is the
        latest the call can have arrived (its release, less the run time the upstream
        itself reported)."""
        levels = {i: (self.level(i), self.in_force(i)) for i in range(len(self.policy.limits))}
        for i, lim in enumerate(self.policy.limits):
            level, in_force = levels[i]
            if outcome == "ok" and lim.kind is Kind.CALLS and lim.assured is not None:
                if level < in_force:
                    self.accepted.setdefault(self._scope(i, lease.key), []).append(
                        (lease.grant, lease.cost)
                    )
        taught = None  # (limit index, the amount in force after the named limit)
        if outcome == "throttled" and named is not None:
            for i, lim in enumerate(self.policy.limits):
                if lim.kind is Kind.CALLS and lim.window_ms == named[1]:
                    before = self.in_force(i)
                    amount = max(named[0], 1)
                    if named[0] >= lim.amount:
                        amount = lim.amount
                    elif amount >= before:
                        amount = before
                    else:
                        self.learned[i] = amount
                    taught = (i, amount)
                    break
        for i, lim in enumerate(self.policy.limits):
            if lim.kind is not Kind.CALLS or lim.assured is None:
                continue
            level, in_force = levels[i]
            probe = self.probes.get(i) == token
            if probe:
                del self.probes[i]
            if taught is not None and taught[0] == i:
                if taught[1] > level:
                    self.confirmed[i] = taught[1]
            elif probe and outcome == "ok" and level < in_force:
                gran = lim.granularity_ms
                proved = lease.cost + sum(
                    units
                    for grant, units in self.accepted.get(self._scope(i, lease.key), [])
                    if (grant // gran) * gran
                    > max(now, lease.grant) - lim.window_ms + lim.margin_ms
                    and (grant // gran + 1) * gran <= lease.grant
                )
                if min(proved, in_force) > level:
                    self.confirmed[i] = min(proved, in_force)

    def renew(self, token: str, ttl: int, now: int) -> int | str:
        lease = self.leases.get(token)
        if lease is None:
            return "unknown"
        if lease.expiry <= now:
            self._settle(self.leases.pop(token))
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
                buckets = self._counted(lim, key, now)
                resets = bucket_end(lim, buckets[0][0]) - now if buckets else 0
                per_limit.append((sum(u for _, u in buckets), resets))
        in_flight = sum(1 for lease in self.leases.values() if lease.expiry > now)
        return max(self.cooldown_until - now, 0), in_flight, per_limit
