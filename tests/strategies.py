"""Hypothesis strategies for random policies and random schedules of engine operations.

Virtual time starts at a fixed epoch and only moves forward. Every duration that becomes a
Redis TTL (windows, lease TTLs, cooldowns) is at least 10 s, so no key expires in real
time while one example runs in virtual time.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import strategies as st

from quotagate.coordinator.policy import Kind, Limit, Policy, PriorityClass, Scope

EPOCH_MS = 1_700_000_000_000
KEYS = ("", "a", "b")
OUTCOMES = ("ok", "failed", "throttled", "not_called")


@st.composite
def windowed_limits(draw: st.DrawFn, kind: Kind) -> Limit:
    window = draw(st.sampled_from([10_000, 20_000, 30_000, 60_000]))
    granularity = draw(
        st.sampled_from([g for g in (1_000, 2_500, 5_000, 10_000) if window % g == 0])
    )
    margin = draw(st.sampled_from([0, 0, 500, 1_000]))
    scope = draw(st.sampled_from([Scope.API, Scope.KEY]))
    if kind is Kind.CALLS:
        amount = draw(st.integers(1, 8))
    else:
        amount = draw(st.integers(5_000, 60_000))
    return Limit(kind, amount, window, granularity, margin, scope)


@st.composite
def policies(draw: st.DrawFn, calls_only: bool = False) -> Policy:
    """A policy of one to four limits; `calls_only`: calls limits alone (whose leases may
    end in parts)."""
    kinds = [windowed_limits(Kind.CALLS)]
    if not calls_only:
        kinds += [
            windowed_limits(Kind.RUNTIME),
            st.builds(
                Limit,
                st.just(Kind.CONCURRENT),
                st.integers(1, 3),
                scope=st.sampled_from([Scope.API, Scope.KEY]),
            ),
        ]
    limits = draw(
        st.lists(
            st.one_of(*kinds),
            min_size=1,
            max_size=4,
            # A policy file refuses two windowed limits that would share one counter.
            unique_by=lambda lim: (
                lim.kind,
                lim.window_ms,
                lim.granularity_ms,
                lim.scope,
                lim.amount if lim.kind is Kind.CONCURRENT else 0,
            ),
        ).filter(lambda ls: any(lim.kind is Kind.CALLS for lim in ls))
    )
    ttl = draw(st.sampled_from([10_000, 15_000, 40_000]))
    classes: tuple[PriorityClass, ...] = ()
    aging: int | None = None
    if draw(st.booleans()):
        # A share may leave less than a call of some limit: that class is then refused.
        lower = draw(st.sampled_from([100, 250, 500, 700, 1000]))
        classes = (PriorityClass("hi"), PriorityClass("lo", lower))
        aging = draw(st.sampled_from([None, 1_000, 5_000, 30_000]))
    return Policy(
        "p",
        tuple(limits),
        lease_ttl_ms=ttl,
        runtime_estimate_ms=draw(st.sampled_from([0, 3_000])),
        classes=classes,
        default_class="lo" if classes else None,
        aging_ms=aging,
    )


@dataclass(frozen=True)
class Acquire:
    key: str
    cost: int
    estimate: int | None
    priority: str | None = None  # a class of the policy ("hi", "lo"), None: the default


@dataclass(frozen=True)
class Release:
    lease: int  # index into the leases granted so far (modulo their number)
    outcome: str
    retry_ms: int | None
    runtime_ms: int | None
    upstream: bool = False  # runtime_ms is the upstream's own processing time
    parts: tuple[int, int] | None = None  # (calls, keep): a lease ended in parts


@dataclass(frozen=True)
class Renew:
    lease: int
    ttl_ms: int


@dataclass(frozen=True)
class Advance:
    ms: int


@dataclass(frozen=True)
class Look:
    key: str


Op = Acquire | Release | Renew | Advance | Look

PRIORITIES = st.sampled_from([None, "hi", "lo"])

# A lease ended in parts: some of its units called, some kept in flight, the rest refunded
# (more than its cost is refused).
PARTS = st.builds(
    Release,
    st.integers(0, 50),
    st.sampled_from(["ok", "ok", "failed", "throttled", "not_called"]),
    st.none(),
    st.one_of(st.none(), st.integers(0, 3_000)),
    st.booleans(),
    st.tuples(st.integers(0, 4), st.integers(0, 3)),
)

operations = st.lists(
    st.one_of(
        st.builds(
            Acquire,
            st.sampled_from(KEYS),
            st.integers(1, 4),
            st.one_of(st.none(), st.integers(0, 20_000)),
            PRIORITIES,
        ),
        st.builds(Acquire, st.sampled_from(KEYS), st.just(1), st.none(), PRIORITIES),
        st.builds(Acquire, st.sampled_from(KEYS), st.integers(1, 2), st.just(0)),
        st.builds(
            Release,
            st.integers(0, 50),
            st.sampled_from(OUTCOMES),
            st.one_of(st.none(), st.integers(10_000, 90_000)),
            st.one_of(st.none(), st.integers(0, 30_000)),
            st.booleans(),
        ),
        PARTS,
        st.builds(Renew, st.integers(0, 50), st.sampled_from([10_000, 30_000])),
        st.builds(Advance, st.integers(0, 15_000)),
        st.builds(Advance, st.integers(0, 1_500)),
        st.builds(Look, st.sampled_from(KEYS)),
    ),
    min_size=20,
    max_size=80,
)

# Schedules that hold leases long and release them late: calls that reach the upstream
# long after their grant, the case design rule 3 is for.
late_operations = st.lists(
    st.one_of(
        st.builds(Acquire, st.sampled_from(KEYS), st.integers(1, 2), st.just(None), PRIORITIES),
        st.builds(Acquire, st.sampled_from(KEYS), st.just(1), st.just(None)),
        st.builds(
            Release,
            st.integers(0, 50),
            st.sampled_from(["ok", "ok", "failed", "not_called"]),
            st.none(),
            st.one_of(st.none(), st.integers(0, 30_000)),
            st.booleans(),
        ),
        PARTS,
        st.builds(Renew, st.integers(0, 50), st.sampled_from([10_000, 30_000])),
        st.builds(Advance, st.integers(5_000, 15_000)),
        st.builds(Advance, st.integers(0, 1_500)),
    ),
    min_size=20,
    max_size=80,
)
