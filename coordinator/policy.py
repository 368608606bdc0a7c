"""Quota policy files: YAML compiled to the policy core's values (integer milliseconds).

A policy file is YAML (see README, "Policy file"). The built-in Defender catalog
(`catalog.yaml`) is loaded first; an api named in a user file replaces the catalog's
definition of that api as a whole, and `tenants:` globs override apis per tenant. The
values, durations, names, defaults and the rules of a limit are the policy core's
(`quotagate.client.policy_core`, shared with the client's local limiter), re-exported
here; this module adds the file format and errors that name the file, api and field.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from quotagate.client.policy_core import (
    API_PATTERN,
    CLASS_PATTERN,
    CLOCK_RATE_PPM,
    DEFAULT_LEASE_TTL_MS,
    DEFAULT_RUNTIME_ESTIMATE_MS,
    KEY_PATTERN,
    MAX_BUCKETS,
    TENANT_PATTERN,
    Kind,
    Limit,
    Policy,
    PolicySet,
    PriorityClass,
    Scope,
    clock_margin_ms,
    default_aging_ms,
    default_granularity_ms,
    format_duration,
    make_limit,
    make_policy,
    parse_duration_ms,
)

__all__ = [
    "API_PATTERN",
    "CATALOG_PATH",
    "CLASS_PATTERN",
    "CLOCK_RATE_PPM",
    "DEFAULT_LEASE_TTL_MS",
    "DEFAULT_RUNTIME_ESTIMATE_MS",
    "KEY_PATTERN",
    "MAX_BUCKETS",
    "TENANT_PATTERN",
    "Kind",
    "Limit",
    "Policy",
    "PolicyError",
    "PolicySet",
    "PriorityClass",
    "Scope",
    "clock_margin_ms",
    "default_aging_ms",
    "default_granularity_ms",
    "load_catalog",
    "load_policies",
    "parse_policies",
]

CATALOG_PATH = Path(__file__).parent / "catalog.yaml"


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file, the api and the field."""


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
    assured: float | None = None  # [0, 1]: the share granted without probing

    @field_validator("assured", mode="before")
    @classmethod
    def _share(cls, value: object) -> object:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"assured must be a share in [0, 1], got {value!r}")
        return value

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
        kinds = [kind for kind in Kind if getattr(self, kind.value) is not None]
        if len(kinds) != 1:
            raise ValueError(
                "each limit needs exactly one kind: calls, runtime or concurrent"
                + (f" (got {', '.join(kinds)})" if kinds else "")
            )
        # The core checks a limit's rules; raised here, pydantic names the limit's place.
        self.compile(None)
        return self

    def compile(self, default_margin_ms: int | None) -> Limit:
        kind = next(kind for kind in Kind if getattr(self, kind.value) is not None)
        return make_limit(
            kind,
            getattr(self, kind.value),
            per_ms=self.per,
            granularity_ms=self.granularity,
            margin_ms=self.margin,
            scope=self.scope,
            default_margin_ms=default_margin_ms,
            assured=self.assured,
        )


class _ClassSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    share: float | None = None  # (0, 1]: the most of each windowed limit; None: all of it

    @field_validator("share", mode="before")
    @classmethod
    def _share(cls, value: object) -> object:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"share must be a number in (0, 1], got {value!r}")
        if not 0.001 <= value <= 1:
            raise ValueError(f"share must be in (0, 1] and at least 0.001, got {value!r}")
        return value

    def compile(self, name: str) -> PriorityClass:
        share = 1.0 if self.share is None else self.share
        return PriorityClass(name, round(share * 1000))


class _ApiSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limits: list[_LimitSpec]
    lease_ttl: int | None = None
    runtime_estimate: int | None = None
    classes: dict[str, _ClassSpec | None] | None = None  # in priority order, highest first
    default_class: str | None = None
    aging: int | None = None  # ms; None: default_aging_ms with two classes or more

    @field_validator("classes", mode="before")
    @classmethod
    def _class_names(cls, value: object) -> object:
        if isinstance(value, dict):
            if not value:
                raise ValueError("classes needs at least one class (or leave it out)")
            for name in value:
                if not isinstance(name, str) or not CLASS_PATTERN.match(name):
                    raise ValueError(f"class name {name!r} must match {CLASS_PATTERN.pattern}")
        return value

    @field_validator("lease_ttl", "runtime_estimate", "aging", mode="before")
    @classmethod
    def _durations(cls, value: object) -> object:
        return None if value is None else _duration(value)

    @field_validator("aging", mode="after")
    @classmethod
    def _positive_aging(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"aging must be a positive duration, got {format_duration(value)}")
        return value

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

    def compile(self, api: str, default_margin_ms: int | None) -> Policy:
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
        classes = tuple(
            (spec or _ClassSpec()).compile(name) for name, spec in (self.classes or {}).items()
        )
        try:
            policy = make_policy(
                api,
                limits,
                lease_ttl_ms=self.lease_ttl,
                runtime_estimate_ms=self.runtime_estimate,
                classes=classes,
                default_class=self.default_class,
                aging_ms=self.aging,
            )
        except ValueError as exc:
            raise PolicyError(str(exc)) from exc
        estimate = policy.runtime_estimate_ms
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
    spec: _FileSpec, source: str, margin_ms: int | None
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
    """Policies from one YAML document alone (no catalog); its tenant overrides may name
    apis that it does not define (`load_policies` checks them against the catalog)."""
    spec = _parse(text, source)
    apis, tenants = _compile(spec, source, spec.margin)  # None: each window's clock margin
    return PolicySet(apis=apis, tenants=tuple(tenants))


def _check_overrides(
    extra: PolicySet, known: Mapping[str, Policy], source: str, where: str
) -> None:
    """Refuse an override of an api that is defined nowhere: most often a typo."""
    for pattern, overrides in extra.tenants:
        for name in overrides:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise PolicyError(
                    f"{source}: tenants.{pattern}.{name}: overrides api {name!r}, which "
                    f"neither {where} defines{hint}"
                )


def load_catalog() -> PolicySet:
    return parse_policies(CATALOG_PATH.read_text(encoding="utf-8"), str(CATALOG_PATH.name))


def load_policies(path: Path | str | None = None, *, catalog: bool = True) -> PolicySet:
    """The built-in catalog, with the apis and tenant overrides of `path` on top.

    A tenant override must name an api of the file or of the catalog."""
    base = load_catalog() if catalog else PolicySet(apis={})
    if path is None:
        return base
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy file: {exc.strerror}") from exc
    extra = parse_policies(text, str(path))
    effective = base.updated(extra)
    where = "this file nor the catalog" if catalog else "this file (catalog not loaded)"
    _check_overrides(extra, effective.apis, str(path), where)
    return effective
