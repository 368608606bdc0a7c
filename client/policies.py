"""The coordinator's policies as the local limiter needs them, read leniently.

The shape is the reply of `GET /v1/policies`:
`{"policies": {"<api>": {"api", "limits": [{"kind", "amount", "window", "scope",
"granularity", "margin"}], "lease_ttl", "runtime_estimate"}}, "tenants": {"<glob>": {...}}}`.
Also accepted: the mapping of apis alone, one policy (`GET /v1/policies/{api}`), and the
policy-file spelling of a limit (`{calls: 50, per: 1m}`). A limit that cannot be read
is dropped; an api left with no limit is not known, so the limiter refuses it.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .parsing import parse_duration

KINDS = ("calls", "runtime", "concurrent")
DEFAULT_LEASE_TTL = 60.0
DEFAULT_MARGIN = 1.0
DEFAULT_RUNTIME_ESTIMATE = 10.0  # the coordinator's default for apis with a runtime limit


@dataclass(frozen=True, slots=True)
class LocalLimit:
    kind: str  # "calls" | "runtime" | "concurrent"
    amount: float  # call units, seconds of run time, or leases in flight
    window: float = 0.0  # seconds; 0 for a concurrent limit
    scope: str = "api"  # "api": shared by every key; "key": one counter per key
    margin: float = 0.0  # seconds the window is widened by


@dataclass(frozen=True, slots=True)
class LocalPolicy:
    api: str
    limits: tuple[LocalLimit, ...]
    lease_ttl: float = DEFAULT_LEASE_TTL  # seconds
    runtime_estimate: float = 0.0  # seconds reserved per lease when none is given


@dataclass(frozen=True, slots=True)
class PolicyBook:
    """Policies by api, and per-tenant overrides (first matching glob wins)."""

    apis: Mapping[str, LocalPolicy] = field(default_factory=dict)
    tenants: tuple[tuple[str, Mapping[str, LocalPolicy]], ...] = ()

    def resolve(self, tenant: str, api: str) -> LocalPolicy | None:
        for pattern, overrides in self.tenants:
            if api in overrides and fnmatch.fnmatchcase(tenant, pattern):
                return overrides[api]
        return self.apis.get(api)

    def updated(self, newer: PolicyBook) -> PolicyBook:
        """`newer` on top of these: its apis replace, its tenant overrides come first."""
        return PolicyBook({**self.apis, **newer.apis}, newer.tenants + self.tenants)


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        parsed = parse_duration(value)
        if parsed is None:
            return None
        seconds = parsed
    else:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _limit(raw: object) -> LocalLimit | None:
    if not isinstance(raw, Mapping):
        return None
    kind = raw.get("kind") or next((k for k in KINDS if k in raw), None)
    if kind not in KINDS:
        return None
    amount = _seconds(raw.get("amount", raw.get(kind)))
    if not amount:
        return None
    scope = "key" if raw.get("scope") == "key" else "api"
    if kind == "concurrent":
        return LocalLimit(kind, amount, scope=scope)
    window = _seconds(raw.get("window", raw.get("per")))
    if not window:
        return None
    margin = _seconds(raw.get("margin"))
    return LocalLimit(kind, amount, window, scope, DEFAULT_MARGIN if margin is None else margin)


def _policy(name: str, raw: object) -> LocalPolicy | None:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("limits"), list):
        return None
    limits = tuple(lim for lim in map(_limit, raw["limits"]) if lim is not None)
    if not limits:
        return None
    has_runtime = any(lim.kind == "runtime" for lim in limits)
    ttl = _seconds(raw.get("lease_ttl"))
    estimate = _seconds(raw.get("runtime_estimate"))
    if estimate is None:
        estimate = DEFAULT_RUNTIME_ESTIMATE if has_runtime else 0.0
    api = raw.get("api")
    return LocalPolicy(
        api if isinstance(api, str) else name, limits, ttl or DEFAULT_LEASE_TTL, estimate
    )


def _apis(raw: object) -> dict[str, LocalPolicy]:
    if isinstance(raw, Mapping) and "limits" in raw:
        raw = [raw]
    if isinstance(raw, list):
        found = (_policy("", item) for item in raw)
    elif isinstance(raw, Mapping):
        found = (_policy(str(name), item) for name, item in raw.items())
    else:
        return {}
    return {pol.api: pol for pol in found if pol is not None and pol.api}


def parse_policies(data: object) -> PolicyBook:
    """A `PolicyBook` from the coordinator's policies reply (or a similar shape)."""
    if isinstance(data, Mapping) and "policies" in data:
        tenants = data.get("tenants")
        overrides = tuple(
            (str(glob), _apis(apis))
            for glob, apis in (tenants.items() if isinstance(tenants, Mapping) else ())
        )
        return PolicyBook(_apis(data["policies"]), overrides)
    return PolicyBook(_apis(data))
