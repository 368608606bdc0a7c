"""Quota policies: the limits of each api, compiled to integer milliseconds for the scripts.

A policy file is YAML (see README, "Policy file"). The built-in Defender catalog
(`catalog.yaml`) is loaded first; an api named in a user file replaces the catalog's
definition of that api as a whole, and `tenants:` globs override apis per tenant.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from .durations import format_duration, parse_duration_ms

API_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}$")
KEY_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@/-]{0,255}$")

CATALOG_PATH = Path(__file__).parent / "catalog.yaml"

DEFAULT_MARGIN_MS = 1_000
DEFAULT_LEASE_TTL_MS = 60_000
DEFAULT_RUNTIME_ESTIMATE_MS = 10_000
MAX_BUCKETS = 3_600  # per window


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

    def describe(self) -> dict[str, Any]:
        """The limit as the HTTP API shows it: seconds, and runtime amounts in seconds."""
        amount: float = self.amount / 1000 if self.kind is Kind.RUNTIME else self.amount
        window = self.window_ms / 1000 if self.kind is not Kind.CONCURRENT else None
        return {"kind": self.kind.value, "amount": amount, "window": window}


@dataclass(frozen=True)
class Policy:
    api: str
    limits: tuple[Limit, ...]
    lease_ttl_ms: int = DEFAULT_LEASE_TTL_MS
    runtime_estimate_ms: int = 0

    @functools.cached_property
    def longest_window_ms(self) -> int:
        return max((lim.window_ms + lim.margin_ms for lim in self.limits), default=0)

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

    def impossible_cost(self, cost: int) -> Limit | None:
        """The calls limit that could never grant `cost` units, if any."""
        for lim in self.limits:
            if lim.kind is Kind.CALLS and cost > lim.amount:
                return lim
        return None

    def impossible_runtime(self, runtime_ms: int) -> Limit | None:
        """The runtime limit that could never hold a reservation of `runtime_ms`, if any."""
        for lim in self.limits:
            if lim.kind is Kind.RUNTIME and runtime_ms > lim.amount:
                return lim
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "api": self.api,
            "limits": [
                {
                    **lim.describe(),
                    "scope": lim.scope.value,
                    "granularity": lim.granularity_ms / 1000 if lim.window_ms else None,
                    "margin": lim.margin_ms / 1000 if lim.window_ms else None,
                }
                for lim in self.limits
            ],
            "lease_ttl": self.lease_ttl_ms / 1000,
            "runtime_estimate": self.runtime_estimate_ms / 1000,
        }


@dataclass(frozen=True)
class PolicySet:
    """The effective policies: apis by name, and per-tenant overrides (first glob wins)."""

    apis: Mapping[str, Policy]
    tenants: tuple[tuple[str, Mapping[str, Policy]], ...] = field(default=())

    def resolve(self, tenant: str, api: str) -> Policy | None:
        for pattern, overrides in self.tenants:
            if api in overrides and fnmatch.fnmatchcase(tenant, pattern):
                return overrides[api]
        return self.apis.get(api)

    def describe(self) -> dict[str, Any]:
        return {
            "policies": {name: pol.describe() for name, pol in sorted(self.apis.items())},
            "tenants": {
                pattern: {name: pol.describe() for name, pol in sorted(overrides.items())}
                for pattern, overrides in self.tenants
            },
        }


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file, the api and the field."""


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


# --- the file format -------------------------------------------------------------------


def _duration(value: object) -> int:
    return parse_duration_ms(value)


class _LimitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)

    calls: int | None = None
    runtime: int | None = None
    concurrent: int | None = None
    per: int | None = None
    granularity: int | None = None
    margin: int | None = None
    scope: Scope = Scope.API

    @field_validator("runtime", "per", "granularity", "margin", mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return None if value is None else _duration(value)

    @field_validator("calls", "concurrent", mode="before")
    @classmethod
    def _whole(cls, value: object) -> object:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be a whole number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _check(self) -> _LimitSpec:
        kinds = [k for k in ("calls", "runtime", "concurrent") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "each limit needs exactly one kind: calls, runtime or concurrent"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        kind = kinds[0]
        amount = getattr(self, kind)
        if amount <= 0:
            raise ValueError(f"{kind} must be positive, got {amount}")
        if kind == "concurrent":
            for name in ("per", "granularity", "margin"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name} does not apply to a concurrent limit")
            return self
        if self.per is None:
            raise ValueError(f"a {kind} limit needs `per` (its window)")
        if self.per <= 0:
            raise ValueError("per must be a positive duration")
        if self.granularity is not None and (self.granularity <= 0 or self.per % self.granularity):
            raise ValueError(
                f"granularity {format_duration(self.granularity)} does not divide "
                f"the window {format_duration(self.per)}"
            )
        if self.granularity is not None and self.per // self.granularity > MAX_BUCKETS:
            # Each decision may walk the buckets of a window: keep that walk short.
            raise ValueError(
                f"granularity {format_duration(self.granularity)} makes more than "
                f"{MAX_BUCKETS} buckets in the window {format_duration(self.per)}"
            )
        return self

    def compile(self, default_margin_ms: int) -> Limit:
        if self.concurrent is not None:
            return Limit(Kind.CONCURRENT, self.concurrent, scope=self.scope)
        assert self.per is not None
        kind, amount = (
            (Kind.CALLS, self.calls) if self.calls is not None else (Kind.RUNTIME, self.runtime)
        )
        assert amount is not None
        return Limit(
            kind,
            amount,
            window_ms=self.per,
            granularity_ms=self.granularity or default_granularity_ms(self.per),
            margin_ms=default_margin_ms if self.margin is None else self.margin,
            scope=self.scope,
        )


class _ApiSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: list[_LimitSpec]
    lease_ttl: int | None = None
    runtime_estimate: int | None = None

    @field_validator("lease_ttl", "runtime_estimate", mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return None if value is None else _duration(value)

    @field_validator("limits", mode="after")
    @classmethod
    def _not_empty(cls, value: list[_LimitSpec]) -> list[_LimitSpec]:
        if not value:
            raise ValueError("an api needs at least one limit")
        return value

    @model_validator(mode="after")
    def _check(self) -> _ApiSpec:
        if self.lease_ttl is not None and self.lease_ttl <= 0:
            raise ValueError("lease_ttl must be positive")
        return self

    def compile(self, api: str, default_margin_ms: int) -> Policy:
        limits = tuple(spec.compile(default_margin_ms) for spec in self.limits)
        seen: dict[tuple[Kind, int, int, Scope], int] = {}
        for i, lim in enumerate(limits):
            if lim.kind is Kind.CONCURRENT:
                continue
            # One counter per kind, window, granularity and scope: two such limits would
            # share it (and each charge it), so only the smaller one can mean anything.
            first = seen.setdefault((lim.kind, lim.window_ms, lim.granularity_ms, lim.scope), i)
            if first != i:
                raise PolicyError(
                    f"limits[{i}] counts the same {lim.kind.value} per "
                    f"{format_duration(lim.window_ms)} as limits[{first}] (same granularity "
                    "and scope): keep the smaller one"
                )
        has_runtime = any(lim.kind is Kind.RUNTIME for lim in limits)
        estimate = self.runtime_estimate
        if estimate is None:
            estimate = DEFAULT_RUNTIME_ESTIMATE_MS if has_runtime else 0
        policy = Policy(
            api,
            limits,
            lease_ttl_ms=self.lease_ttl or DEFAULT_LEASE_TTL_MS,
            runtime_estimate_ms=estimate,
        )
        too_big = policy.impossible_runtime(estimate)
        if too_big is not None:
            raise PolicyError(
                f"runtime_estimate {format_duration(estimate)} is larger than the runtime "
                f"limit {format_duration(too_big.amount)} per {format_duration(too_big.window_ms)}"
            )
        return policy


def _check_api_name(name: object) -> str:
    if not isinstance(name, str) or not API_PATTERN.match(name):
        raise ValueError(f"api name {name!r} must match {API_PATTERN.pattern}")
    return name


class _FileSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    margin: int | None = None
    apis: dict[str, _ApiSpec] = {}
    tenants: dict[str, dict[str, _ApiSpec]] = {}

    @field_validator("margin", mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return None if value is None else _duration(value)

    @field_validator("apis", mode="before")
    @classmethod
    def _api_names(cls, value: object) -> object:
        if isinstance(value, dict):
            for name in value:
                _check_api_name(name)
        return value


_PYDANTIC_TAG = re.compile(r"^(function-(after|before|wrap|plain)(\[.*\])?|\[key\])$")


def _where(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif _PYDANTIC_TAG.match(item):
            continue
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "(top level)"


def _parse(text: str, source: str) -> _FileSpec:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"{source}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise PolicyError(f"{source}: the top level must be a mapping with `apis:`")
    try:
        return _FileSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_where(tuple(err['loc']))}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise PolicyError(f"{source}: {problems}") from exc


def _compile(
    spec: _FileSpec, source: str, margin_ms: int
) -> tuple[dict[str, Policy], list[tuple[str, dict[str, Policy]]]]:
    apis: dict[str, Policy] = {}
    for name, api_spec in spec.apis.items():
        try:
            apis[name] = api_spec.compile(name, margin_ms)
        except PolicyError as exc:
            raise PolicyError(f"{source}: apis.{name}: {exc}") from exc
    tenants: list[tuple[str, dict[str, Policy]]] = []
    for pattern, overrides in spec.tenants.items():
        compiled: dict[str, Policy] = {}
        for name, api_spec in overrides.items():
            try:
                compiled[_check_api_name(name)] = api_spec.compile(name, margin_ms)
            except (PolicyError, ValueError) as exc:
                raise PolicyError(f"{source}: tenants.{pattern}.{name}: {exc}") from exc
        tenants.append((pattern, compiled))
    return apis, tenants


def parse_policies(text: str, source: str = "<policies>") -> PolicySet:
    """Policies from one YAML document alone (no catalog)."""
    spec = _parse(text, source)
    margin_ms = DEFAULT_MARGIN_MS if spec.margin is None else spec.margin
    apis, tenants = _compile(spec, source, margin_ms)
    return PolicySet(apis=apis, tenants=tuple(tenants))


def load_catalog() -> PolicySet:
    return parse_policies(CATALOG_PATH.read_text(encoding="utf-8"), str(CATALOG_PATH.name))


def load_policies(path: Path | str | None = None, *, catalog: bool = True) -> PolicySet:
    """The built-in catalog, with the apis and tenant overrides of `path` on top."""
    base = load_catalog() if catalog else PolicySet(apis={})
    if path is None:
        return base
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror}") from exc
    extra = parse_policies(text, str(path))
    return PolicySet(apis={**base.apis, **extra.apis}, tenants=base.tenants + extra.tenants)
