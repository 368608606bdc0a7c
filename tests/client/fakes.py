"""A fake coordinator for the client tests: an `httpx.MockTransport` handler that speaks
the HTTP API of version 1 closely enough, and records what the client sent."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

URL = "http://quotagate.test"
TENANT = "contoso/app1"

POLICIES: dict[str, Any] = {
    "policies": {
        "m365d.incidents": {
            "api": "m365d.incidents",
            "limits": [
                {
                    "kind": "calls",
                    "amount": 2,
                    "window": 60.0,
                    "scope": "api",
                    "granularity": 1.0,
                    "margin": 1.0,
                },
            ],
            "lease_ttl": 60.0,
            "runtime_estimate": 0.0,
        },
    },
    "tenants": {},
}


class FakeCoordinator:
    """Grants every lease unless told otherwise; records every request it gets."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.headers: list[httpx.Headers] = []
        self.expires_in = 60.0
        self.deny: dict[str, Any] | None = None  # a 429 body for every acquire
        self.down = False  # acquire (and everything else) cannot connect
        self.backend_down = False  # 503 backend_unavailable
        self.policies = POLICIES
        self.renewed = threading.Event()
        self.released: dict[str, dict[str, Any]] = {}
        self._next = 0

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)

    def paths(self, method: str | None = None) -> list[str]:
        return [path for m, path, _ in self.calls if method in (None, m)]

    def bodies(self, suffix: str) -> list[dict[str, Any]]:
        return [body for _, path, body in self.calls if path.endswith(suffix)]

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        body = json.loads(request.content) if request.content else {}
        with self.lock:
            self.calls.append((request.method, request.url.path, body))
            self.headers.append(request.headers)
        if self.backend_down:
            return httpx.Response(
                503,
                json={"error": "backend_unavailable", "detail": "redis"},
                headers={"Retry-After": "1"},
            )
        path = request.url.path
        if path == "/v1/leases":
            return self._acquire(body)
        if path.endswith("/release"):
            lease_id = path.split("/")[3]
            if lease_id in self.released:
                return httpx.Response(404, json={"error": "unknown_lease", "detail": "released"})
            self.released[lease_id] = body
            return httpx.Response(200, json={"released": True})
        if path.endswith("/renew"):
            self.renewed.set()
            return httpx.Response(200, json={"expires_in": self.expires_in})
        if path == "/v1/policies":
            return httpx.Response(200, json=self.policies)
        if path.startswith("/v1/usage/"):
            return httpx.Response(200, json={"path": path, "key": request.url.params.get("key")})
        return httpx.Response(404, json={"error": "not_found", "detail": path})

    def _acquire(self, body: dict[str, Any]) -> httpx.Response:
        if self.deny is not None:
            retry = str(int(self.deny.get("retry_after", 1)) + 1)
            return httpx.Response(429, json=self.deny, headers={"Retry-After": retry})
        with self.lock:
            self._next += 1
            lease_id = f"L{self._next}"
        return httpx.Response(
            200,
            json={
                "lease_id": lease_id,
                "tenant": body["tenant"],
                "api": body["api"],
                "key": body.get("key", ""),
                "cost": body.get("cost", 1),
                "expires_in": self.expires_in,
                "waited": 0.0,
            },
        )
