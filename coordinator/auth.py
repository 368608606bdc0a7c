"""Bearer tokens, each allowed a list of tenant globs.

Every presented token is compared with every configured one in constant time, so the
time taken tells nothing about which prefix matched. Tokens are never logged.
"""

from __future__ import annotations

import fnmatch
import hmac
from dataclasses import dataclass

from .errors import Forbidden, Unauthorized


@dataclass(frozen=True)
class Principal:
    globs: tuple[str, ...]  # () = no tokens configured: every tenant

    def check(self, tenant: str) -> None:
        if self.globs and not any(fnmatch.fnmatchcase(tenant, glob) for glob in self.globs):
            raise Forbidden(f"this token may not use tenant {tenant!r}")


OPEN = Principal(())


class Authorizer:
    def __init__(self, tokens: dict[str, list[str]]) -> None:
        self._tokens = [(token.encode(), tuple(globs)) for token, globs in tokens.items()]

    @property
    def enabled(self) -> bool:
        return bool(self._tokens)

    def principal(self, authorization: str | None) -> Principal:
        if not self._tokens:
            return OPEN
        scheme, _, presented = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise Unauthorized("send Authorization: Bearer <token>")
        candidate = presented.strip().encode()
        found: tuple[str, ...] | None = None
        for token, globs in self._tokens:
            if hmac.compare_digest(token, candidate) and found is None:
                found = globs
        if found is None:
            raise Unauthorized("unknown token")
        return Principal(found)
