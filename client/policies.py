"""The coordinator's policies as the local limiter needs them, read leniently.

The shape is the reply of `GET /v1/policies`:
`{"policies": {"<api>": {"api", "limits": [{"kind", "amount", "window", "scope",
"granularity", "margin"}], "lease_ttl", "runtime_estimate"}}, "tenants": {"<glob>": {...}}}`.
Also accepted: the mapping of apis alone, one policy (`GET /v1/policies/{api}`), and the
policy-file spelling of a limit (`{calls: 50, per: 1m}`). Values become the policy core's
(`policy_core`), with its defaults and rules: a limit that cannot be read or breaks a rule
is dropped; an api left with no limit is not known, so the limiter refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping

from .policy_core import (
    Kind,
    Limit,
    Policy,
    PolicySet,
    Scope,
    make_limit,
    make_policy,
    parse_duration_ms,
)


def _ms(value: object) -> int | None:
    """Milliseconds in a duration (seconds or the policy grammar), None if there is none."""
    try:
        return None if value is None else parse_duration_ms(value)
    except ValueError:
        return None


def _whole(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return int(value) if isinstance(value, float) and value.is_integer() else None


def _limit(raw: object) -> Limit | None:
    if not isinstance(raw, Mapping):
        return None
    name = raw.get("kind") or next((k.value for k in Kind if k.value in raw), None)
    if name not in tuple(Kind):
        return None
    kind = Kind(name)
    given = raw.get("amount", raw.get(kind.value))
    amount = _ms(given) if kind is Kind.RUNTIME else _whole(given)
    if amount is None:
        return None
    windowed = kind is not Kind.CONCURRENT
    try:
        return make_limit(
            kind,
            amount,
            per_ms=_ms(raw.get("window", raw.get("per"))) if windowed else None,
            granularity_ms=_ms(raw.get("granularity")) if windowed else None,
            margin_ms=_ms(raw.get("margin")) if windowed else None,
            scope=Scope.KEY if raw.get("scope") == "key" else Scope.API,
        )
    except ValueError:
        return None


def _policy(name: str, raw: object) -> Policy | None:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("limits"), list):
        return None
    limits = tuple(lim for lim in map(_limit, raw["limits"]) if lim is not None)
    if not limits:
        return None
    api = raw.get("api")
    return make_policy(
        api if isinstance(api, str) else name,
        limits,
        lease_ttl_ms=_ms(raw.get("lease_ttl")),
        runtime_estimate_ms=_ms(raw.get("runtime_estimate")),
    )


def _apis(raw: object) -> dict[str, Policy]:
    if isinstance(raw, Mapping) and "limits" in raw:
        raw = [raw]
    if isinstance(raw, list):
        found = (_policy("", item) for item in raw)
    elif isinstance(raw, Mapping):
        found = (_policy(str(name), item) for name, item in raw.items())
    else:
        return {}
    return {pol.api: pol for pol in found if pol is not None and pol.api}


def parse_policies(data: object) -> PolicySet:
    """A `PolicySet` from the coordinator's policies reply (or a similar shape)."""
    if isinstance(data, Mapping) and "policies" in data:
        tenants = data.get("tenants")
        overrides = tuple(
            (str(glob), _apis(apis))
            for glob, apis in (tenants.items() if isinstance(tenants, Mapping) else ())
        )
        return PolicySet(_apis(data["policies"]), overrides)
    return PolicySet(_apis(data))
