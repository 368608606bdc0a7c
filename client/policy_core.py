"""The policy core: the rules the coordinator and the client's local limiter share.

Durations (one grammar, read as milliseconds or as seconds), the name patterns, the
defaults, the limit and policy values with the rules every limit obeys, and per-tenant
overrides. Plain Python: the client installs with httpx alone, and the coordinator's
policy file loader (`quotagate.coordinator.policy`) builds on this module.

Units: policies hold integer milliseconds, the unit Redis stores; their `describe()`
shows seconds, the unit of the HTTP API.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from fractions import Fraction
from typing import Any

# --- names ------------------------------------------------------------------------------

API_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Tenants and keys: no spaces, braces or `|`, so they fit in a hash tag `{<tenant>|<api>}`.
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,255}$")
CLASS_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # priority classes

# --- durations: `500ms`, `1.5s`, `1m`, `4h`, `1d` or plain seconds ----------------------

UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_MS = 366 * UNIT_MS["d"]  # a year: far past any upstream window, far below 2**53
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def _exact_seconds(value: object) -> Fraction:
    """Seconds in `value`, exactly: `2.007 * 1000` is 2007.0000000000002 in floats."""
    seconds: Fraction | None = None
    if isinstance(value, bool):
        pass
    elif isinstance(value, int | float):
        if (isinstance(value, float) and not math.isfinite(value)) or value < 0:
            raise ValueError(f"bad duration {value!r}: must be a finite number of seconds >= 0")
        seconds = Fraction(repr(value))
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        number, unit = match.groups()
        seconds = Fraction(number) * UNIT_MS[unit or "s"] / 1000
    if seconds is None:
        raise ValueError(
            f"bad duration {value!r}: use ms, s, m, h, d or plain seconds (e.g. 1m, 500ms)"
        )
    if seconds * 1000 > MAX_MS:
        raise ValueError(f"bad duration {value!r}: longer than a year ({MAX_MS} ms)")
    return seconds


def parse_duration_ms(value: object) -> int:
    """Milliseconds in `value`; a bare number is seconds. Fractions of a millisecond round up.

    Raises ValueError ("bad duration ...") for anything else, negative or longer than a year.
    """
    return math.ceil(_exact_seconds(value) * 1000)


def parse_duration_seconds(value: object) -> float:
    """Seconds in `value`, in the grammar of `parse_duration_ms`, without rounding."""
    return float(_exact_seconds(value))


def format_duration(ms: int) -> str:
    """The shortest exact spelling of `ms` in the units above (`60000` -> `1m`)."""
    for unit in ("d", "h", "m", "s"):
        size = UNIT_MS[unit]
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


# --- defaults ---------------------------------------------------------------------------

# The default margin of a window: what a difference in clock rate between the store's
# clock and the upstream's can add to a window of W (design rule 3 needs no margin for
# the delay between grant and arrival). 100 ppm is a generous bound for two clocks that
# are not disciplined at all: 6 ms a minute, 360 ms an hour, 8.6 s a day.
CLOCK_RATE_PPM = 100


def clock_margin_ms(window_ms: int) -> int:
    """The margin a window gets when none is set: `W * CLOCK_RATE_PPM / 10^6`, rounded up."""
    return -(-window_ms * CLOCK_RATE_PPM // 1_000_000)


DEFAULT_LEASE_TTL_MS = 60_000
DEFAULT_RUNTIME_ESTIMATE_MS = 10_000  # reserved per lease of an api with a runtime limit
AGING_FACTOR = 10  # aging hands the lower classes together about 1/AGING_FACTOR of a limit
MAX_BUCKETS = 3_600  # per window: each decision may walk the buckets of a window


def default_granularity_ms(window_ms: int) -> int:
    """`W/60`, at least 1 s (or the window, if shorter), rounded up to a divisor of `W`."""
    if window_ms <= 0:
        raise ValueError(f"a window must be positive, got {window_ms} ms")
    wanted = max(-(-window_ms // 60), min(1_000, window_ms))
    # The smallest divisor d >= wanted is W/q for the largest q <= W/wanted (<= 60) dividing W.
    for buckets in range(window_ms // wanted, 0, -1):
        if window_ms % buckets == 0:
            return window_ms // buckets
    raise AssertionError("unreachable: 1 divides every window")


# --- limits and policies ----------------------------------------------------------------


class Kind(StrEnum):
    CALLS = "calls"
    RUNTIME = "runtime"
    CONCURRENT = "concurrent"


class Scope(StrEnum):
    API = "api"
    KEY = "key"


@dataclass(frozen=True)
class Limit:
    """One limit. `amount` is call units (calls), milliseconds (runtime) or leases (concurrent).

    `window_ms`, `granularity_ms` and `margin_ms` are 0 for a concurrent limit.
    """

    kind: Kind
    amount: int
    window_ms: int = 0
    granularity_ms: int = 0
    margin_ms: int = 0
    scope: Scope = Scope.API
    # Calls limits only: the calls granted without probing (design rule 8, "probing");
    # None: the whole amount, no probing.
    assured: int | None = None

    @property
    def span_ms(self) -> int:
        """How far back a windowed limit counts: its window widened by its margin."""
        return self.window_ms + self.margin_ms

    def describe(self) -> dict[str, Any]:
        """The limit as the HTTP API shows it: seconds, and runtime amounts in seconds."""
        amount: float = self.amount / 1000 if self.kind is Kind.RUNTIME else self.amount
        window = self.window_ms / 1000 if self.kind is not Kind.CONCURRENT else None
        return {"kind": self.kind.value, "amount": amount, "window": window}


def make_limit(
    kind: Kind,
    amount: int,
    *,
    per_ms: int | None = None,
    granularity_ms: int | None = None,
    margin_ms: int | None = None,
    scope: Scope = Scope.API,
    default_margin_ms: int | None = None,
    assured: float | None = None,
) -> Limit:
    """A limit with the defaults applied (granularity `W/60`; margin `default_margin_ms`,
    else the clock-rate margin of its window), or a ValueError that names the rule it
    breaks."""
    if amount <= 0:
        raise ValueError(f"{kind} must be positive, got {amount}")
    if kind is Kind.CONCURRENT:
        for name, value in (
            ("per", per_ms),
            ("granularity", granularity_ms),
            ("margin", margin_ms),
        ):
            if value is not None:
                raise ValueError(f"{name} does not apply to a concurrent limit")
        return Limit(kind, amount, scope=scope)
    if assured is not None and kind is not Kind.CALLS:
        raise ValueError("assured applies to calls limits only")
    if assured is not None and not 0 <= assured <= 1:
        raise ValueError(f"assured must be a share in [0, 1], got {assured!r}")
    if per_ms is None:
        raise ValueError(f"a {kind} limit needs `per` (its window)")
    if per_ms <= 0:
        raise ValueError("per must be a positive duration")
    if granularity_ms is not None:
        if granularity_ms <= 0 or per_ms % granularity_ms:
            raise ValueError(
                f"granularity {format_duration(granularity_ms)} does not divide "
                f"the window {format_duration(per_ms)}"
            )
        if per_ms // granularity_ms > MAX_BUCKETS:
            raise ValueError(
                f"granularity {format_duration(granularity_ms)} makes more than "
                f"{MAX_BUCKETS} buckets in the window {format_duration(per_ms)}"
            )
    return Limit(
        kind,
        amount,
        window_ms=per_ms,
        granularity_ms=granularity_ms or default_granularity_ms(per_ms),
        margin_ms=next(
            m for m in (margin_ms, default_margin_ms, clock_margin_ms(per_ms)) if m is not None
        ),
        scope=scope,
        assured=None if assured is None or assured >= 1 else math.floor(amount * assured),
    )


@dataclass(frozen=True)
class PriorityClass:
    """A priority class of an api. `share_permille` caps how full each windowed limit may
    be for a grant of this class: a lease of the class is granted only while the limit's
    use (every class's, leases in flight included) plus its own units stays within
    `amount * share_permille // 1000`; the rest of each window is headroom that only the
    classes with a larger share can use. 1000: the whole limit. The one exception is
    aging (`Policy.aging_ms`): a lower class that has gone that long without a grant while
    it asks is served ahead of the higher classes and within the whole limit, once."""

    name: str
    share_permille: int = 1000

    def cap(self, amount: int) -> int:
        """The most of a windowed limit of `amount` this class may fill."""
        return amount * self.share_permille // 1000


@dataclass(frozen=True)
class Policy:
    api: str
    limits: tuple[Limit, ...]
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    runtime_estimate_ms: int = 0
    classes: tuple[PriorityClass, ...] = ()  # highest first; () for an api without classes
    default_class: str | None = None  # the class of a request that names none
    # Ms a lower class may go without a grant while it asks before it is served ahead of
    # the higher classes (and beyond its share) for one grant; None: no aging.
    aging_ms: int | None = None

    def priority_class(self, name: str | None) -> PriorityClass | None:
        """The class a request of priority `name` belongs to; None when the api has no
        classes (a priority is then accepted and has no effect). Raises ValueError for a
        name the api's classes do not hold."""
        if not self.classes:
            return None
        wanted = self.default_class if name is None else name
        for klass in self.classes:
            if klass.name == wanted:
                return klass
        names = ", ".join(klass.name for klass in self.classes)
        raise ValueError(f"unknown priority class {name!r}; this api has: {names}")

    def class_rank(self, name: str | None) -> int:
        """0 for the highest class, 1 for the next ...; 0 without classes."""
        klass = self.priority_class(name)
        return 0 if klass is None else self.classes.index(klass)

    @functools.cached_property
    def longest_window_ms(self) -> int:
        return max((lim.span_ms for lim in self.limits), default=0)

    @functools.cached_property
    def shortest_calls_window_ms(self) -> int:
        windows = [lim.window_ms for lim in self.limits if lim.kind is Kind.CALLS]
        return min(windows, default=60_000)

    @functools.cached_property
    def tracks_api(self) -> bool:
        """Whether leases must be registered in the api's in-flight set (an api-scoped
        concurrent limit)."""
        return any(lim.kind is Kind.CONCURRENT and lim.scope is Scope.API for lim in self.limits)

    @functools.cached_property
    def tracks_keys(self) -> bool:
        """Whether leases must also be registered per key (a key-scoped concurrent limit)."""
        return any(lim.kind is Kind.CONCURRENT and lim.scope is Scope.KEY for lim in self.limits)

    @functools.cached_property
    def releases_in_parts(self) -> bool:
        """Whether a lease of several call units may end in parts (`Engine.release`'s
        `calls` and `keep`): every limit a calls limit, none probing."""
        return all(lim.kind is Kind.CALLS and lim.assured is None for lim in self.limits)

    def impossible_cost(self, cost: int) -> Limit | None:
        """The calls limit that could never grant `cost` units, if any."""
        for lim in self.limits:
            if lim.kind is Kind.CALLS and cost > lim.amount:
                return lim
        return None

    def impossible_runtime(
        self, runtime_ms: int, klass: PriorityClass | None = None
    ) -> Limit | None:
        """The runtime limit that could never hold a reservation of `runtime_ms`, if any
        (for a lease of `klass`: within its share)."""
        for lim in self.limits:
            if lim.kind is Kind.RUNTIME and runtime_ms > _room(lim, klass):
                return lim
        return None

    def impossible_for_class(self, cost: int, klass: PriorityClass | None) -> Limit | None:
        """The calls limit whose share for `klass` could never grant `cost` units."""
        for lim in self.limits:
            if lim.kind is Kind.CALLS and cost > _room(lim, klass):
                return lim
        return None

    def describe(self) -> dict[str, Any]:
        classes: dict[str, Any] = {}
        if self.classes:
            classes = {
                "classes": [
                    {"name": klass.name, "share": klass.share_permille / 1000}
                    for klass in self.classes
                ],
                "default_class": self.default_class,
                "aging": None if self.aging_ms is None else self.aging_ms / 1000,
            }
        return {
            "api": self.api,
            "limits": [
                {
                    **lim.describe(),
                    "scope": lim.scope.value,
                    "granularity": lim.granularity_ms / 1000 if lim.window_ms else None,
                    "margin": lim.margin_ms / 1000 if lim.window_ms else None,
                    # calls granted without probing, shown only where the policy sets it
                    **({} if lim.assured is None else {"assured": lim.assured}),
                }
                for lim in self.limits
            ],
            "lease_ttl": self.lease_ttl_ms / 1000,
            "runtime_estimate": self.runtime_estimate_ms / 1000,
            **classes,
        }


def _room(lim: Limit, klass: PriorityClass | None) -> int:
    return lim.amount if klass is None else klass.cap(lim.amount)


def make_policy(
    api: str,
    limits: tuple[Limit, ...],
    *,
    lease_ttl_ms: int | None = None,
    runtime_estimate_ms: int | None = None,
    classes: tuple[PriorityClass, ...] = (),
    default_class: str | None = None,
    aging_ms: int | None = None,
) -> Policy:
    """A policy with the defaults applied: `DEFAULT_LEASE_TTL_MS`, a runtime estimate of
    `DEFAULT_RUNTIME_ESTIMATE_MS` when the api has a runtime limit (else none), the
    lowest class as the default class, and with two classes or more `default_aging_ms`.
    Raises ValueError when `default_class` names no class, a class's share leaves less
    than one call (or the runtime estimate) of a windowed limit, or `aging_ms` is given
    without two classes or is not positive."""
    if runtime_estimate_ms is None:
        has_runtime = any(lim.kind is Kind.RUNTIME for lim in limits)
        runtime_estimate_ms = DEFAULT_RUNTIME_ESTIMATE_MS if has_runtime else 0
    names = [klass.name for klass in classes]
    if default_class is not None and default_class not in names:
        if not classes:
            raise ValueError(f"default_class {default_class!r} needs `classes`")
        raise ValueError(
            f"default_class {default_class!r} is not one of the classes ({', '.join(names)})"
        )
    if classes and default_class is None:
        default_class = names[-1]
    lease_ttl_ms = lease_ttl_ms or DEFAULT_LEASE_TTL_MS
    if aging_ms is not None:
        if len(classes) < 2:
            raise ValueError("aging needs `classes` with two classes or more")
        if aging_ms <= 0:
            raise ValueError(f"aging must be a positive duration, got {aging_ms} ms")
    elif len(classes) >= 2:
        aging_ms = default_aging_ms(limits, lease_ttl_ms, runtime_estimate_ms, len(classes))
    policy = Policy(
        api,
        limits,
        lease_ttl_ms=lease_ttl_ms,
        runtime_estimate_ms=runtime_estimate_ms,
        classes=classes,
        default_class=default_class,
        aging_ms=aging_ms,
    )
    for klass in classes:
        for i, lim in enumerate(limits):
            if lim.kind is Kind.CONCURRENT:
                continue
            need = 1 if lim.kind is Kind.CALLS else max(runtime_estimate_ms, 1)
            if klass.cap(lim.amount) < need:
                raise ValueError(
                    f"classes.{klass.name}: share {klass.share_permille / 1000:g} leaves "
                    f"{klass.cap(lim.amount)} of limits[{i}] ({lim.kind.value} "
                    f"{lim.amount} per {format_duration(lim.window_ms)}), less than one "
                    + ("call" if lim.kind is Kind.CALLS else "runtime estimate")
                )
    return policy


def default_aging_ms(
    limits: tuple[Limit, ...], lease_ttl_ms: int, runtime_estimate_ms: int, classes: int
) -> int:
    """The aging of an api with `classes` classes when its policy names none: the longer
    of two spans of its shortest windowed limit (window, margin and a bucket) and
    AGING_FACTOR * (classes - 1) times the time one lease of the api's usual size (one
    call, the runtime estimate, one slot held for a lease's ttl) takes of its scarcest
    limit's rate.

    A class that the rolling window serves is granted at least once per span (its own
    units leave it), so a class that has had nothing for two has been crowded out by
    the higher classes, not by its share. Each lower class is served ahead once per aging
    at most, so all of them together take at most about 1/AGING_FACTOR of any limit that
    way."""
    per_lease = 0.0
    spans = []
    for lim in limits:
        if lim.kind is Kind.CALLS:
            per_lease = max(per_lease, lim.window_ms / lim.amount)
        elif lim.kind is Kind.RUNTIME:
            per_lease = max(per_lease, lim.window_ms * runtime_estimate_ms / lim.amount)
        else:
            per_lease = max(per_lease, lease_ttl_ms / lim.amount)
        if lim.kind is not Kind.CONCURRENT:
            spans.append(lim.span_ms + lim.granularity_ms)
    rate_bound = math.ceil(AGING_FACTOR * (classes - 1) * per_lease)
    return max(2 * min(spans, default=0), rate_bound, 1)


@dataclass(frozen=True)
class PolicySet:
    """The effective policies: apis by name, and per-tenant overrides (first glob wins).

    An override replaces the api as a whole for the tenants its glob matches (the whole
    tenant id, case-sensitively).
    """

    apis: Mapping[str, Policy]
    tenants: tuple[tuple[str, Mapping[str, Policy]], ...] = field(default=())

    def resolve(self, tenant: str, api: str) -> Policy | None:
        for pattern, overrides in self.tenants:
            if api in overrides and fnmatch.fnmatchcase(tenant, pattern):
                return overrides[api]
        return self.apis.get(api)

    def updated(self, newer: PolicySet) -> PolicySet:
        """`newer` on top of these: its apis replace, its tenant overrides come first."""
        return PolicySet({**self.apis, **newer.apis}, newer.tenants + self.tenants)

    def describe(self) -> dict[str, Any]:
        return {
            "policies": {name: pol.describe() for name, pol in sorted(self.apis.items())},
            "tenants": {
                pattern: {name: pol.describe() for name, pol in sorted(overrides.items())}
                for pattern, overrides in self.tenants
            },
        }
