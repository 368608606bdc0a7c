"""Lease ids and the Redis keys of one (tenant, api, key).

A lease id is `<base64url of "tenant|api|key">.<128 random bits in hex>`: a release needs
no look-up to find its keys, and the random part cannot be guessed. Redis stores the
random part with the key (`member`); the tenant and api are in the hash tag. `|` cannot
occur in a tenant, api or key, so the split is unambiguous.
"""

from __future__ import annotations

import base64
import binascii
import functools
import re
import secrets
from dataclasses import dataclass

from .policy import API_PATTERN, KEY_PATTERN, TENANT_PATTERN, Kind, Policy, Scope

_TOKEN = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class LeaseRef:
    tenant: str
    api: str
    key: str
    token: str

    @property
    def member(self) -> str:
        """What Redis stores for the lease: the random part bound to its key, so an id
        re-aimed at another key of the same (tenant, api) names no lease."""
        return f"{self.token}:{self.key}"

    @property
    def lease_id(self) -> str:
        return f"{_scope_id(self.tenant, self.api, self.key)}.{self.token}"

    @classmethod
    def new(cls, tenant: str, api: str, key: str) -> LeaseRef:
        return cls(tenant, api, key, secrets.token_hex(16))

    @classmethod
    def parse(cls, lease_id: str) -> LeaseRef | None:
        """The lease a well-formed id names, or None for anything else."""
        scope_b64, _, token = lease_id.partition(".")
        if not _TOKEN.match(token) or len(scope_b64) > 600:
            return None
        try:
            scope = base64.urlsafe_b64decode(scope_b64 + "=" * (-len(scope_b64) % 4)).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        parts = scope.split("|")
        if len(parts) != 3:
            return None
        tenant, api, key = parts
        if not TENANT_PATTERN.match(tenant) or not API_PATTERN.match(api):
            return None
        if key and not KEY_PATTERN.match(key):
            return None
        return cls(tenant, api, key, token)


@functools.lru_cache(maxsize=4096)
def _scope_id(tenant: str, api: str, key: str) -> str:
    scope = f"{tenant}|{api}|{key}".encode()
    return base64.urlsafe_b64encode(scope).decode().rstrip("=")


def redis_keys(tenant: str, api: str, key: str, policy: Policy) -> tuple[str, ...]:
    """KEYS for every script, in the layout documented in `lua/lib.lua` (the engine keeps
    them per (tenant, api, key) in its `Target`s)."""
    base = f"qg:{{{tenant}|{api}}}"
    inflight_api, inflight_key = f"{base}:fa", f"{base}:fk:{key}"
    keys = [f"{base}:s", inflight_api, inflight_key]
    for lim in policy.limits:
        if lim.kind is Kind.CONCURRENT:
            keys.append(inflight_key if lim.scope is Scope.KEY else inflight_api)
        else:
            # Named by what it counts, so a changed amount keeps its history.
            name = f"{base}:{lim.kind.value[0]}{lim.window_ms}/{lim.granularity_ms}"
            keys.append(f"{name}:k:{key}" if lim.scope is Scope.KEY else name)
    return tuple(keys)


def policy_args(policy: Policy) -> tuple[str | int, ...]:
    """What the policy fixes, closing every script's ARGV (format in `lua/lib.lua`)."""
    head = (
        policy.lease_ttl_ms,
        1 if policy.tracks_api else 0,
        1 if policy.tracks_keys else 0,
        max(policy.longest_window_ms, policy.lease_ttl_ms),
    )
    return head + tuple(
        value
        for lim in policy.limits
        for value in (lim.kind.value, lim.amount, lim.window_ms, lim.granularity_ms, lim.margin_ms)
    )
