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

from .policy import API_PATTERN, KEY_PATTERN, TENANT_PATTERN

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
