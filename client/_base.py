"""What the sync and async clients share: requests to build, replies to read, and the
state of the fallback to the local limiter. The twins hold only the I/O."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx

from .exceptions import (
    BadRequest,
    CoordinatorUnavailable,
    Forbidden,
    QuotaError,
    QuotaExhausted,
    Unauthorized,
    UnknownApi,
    UnknownLease,
)
from .lease import Lease, Outcome
from .local import LocalLimiter
from .parsing import parse_retry_after
from .policies import parse_policies
from .policy_core import TENANT_PATTERN

logger = logging.getLogger("quotagate.client")

OnUnavailable = Literal["fail", "local"]
LOCAL_POLL = 0.1  # seconds between local retries while waiting: a release may free a slot
LEASES = "/v1/leases"
# Seconds an idle connection to the coordinator is kept for the next request: below
# uvicorn's default keep-alive (5 s), so a request never goes out on a connection the
# server is closing at that moment.
KEEPALIVE_EXPIRY = 4.0


@dataclass(frozen=True, slots=True)
class Call:
    """One request to the coordinator."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, str] | None = None
    wait: float = 0.0  # seconds the server may hold the request: added to the read timeout


_BY_STATUS: dict[int, type[QuotaError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    422: BadRequest,
}
_BY_CODE: dict[str, type[QuotaError]] = {"unknown_lease": UnknownLease, "unknown_api": UnknownApi}


def _segment(text: str) -> str:
    return quote(text, safe="")


def _number(value: object, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return default


def _body(response: httpx.Response) -> dict[str, Any]:
    try:
        data = response.json()
    except (ValueError, httpx.ResponseNotRead):
        return {}
    return data if isinstance(data, dict) else {}


def error_for(response: httpx.Response) -> QuotaError:
    """The client error for a failed coordinator reply."""
    status, body = response.status_code, _body(response)
    code = body.get("error") if isinstance(body.get("error"), str) else None
    detail = body.get("detail")
    if detail is not None and not isinstance(detail, str):
        detail = json.dumps(detail)
    message = f"coordinator answered {status}" + (f" {code}" if code else "")
    message += f": {detail}" if detail else ""
    header = response.headers.get("Retry-After")
    hinted = parse_retry_after(header) if header else None
    if status == 429:
        retry_after = _number(body.get("retry_after"), hinted or 0.0)
        limit = body.get("limit") if isinstance(body.get("limit"), dict) else None
        return QuotaExhausted(retry_after, code or "quota_exhausted", limit, message=message)
    if status in (502, 503, 504):
        return CoordinatorUnavailable(
            message, status_code=status, code=code, detail=detail, retry_after=hinted
        )
    kind = _BY_STATUS.get(status, QuotaError)
    if status == 404:
        kind = _BY_CODE.get(code or "", QuotaError)
    return kind(message, status_code=status, code=code, detail=detail)


def reply(response: httpx.Response) -> dict[str, Any]:
    """The JSON of a successful reply; raises the matching `QuotaError` otherwise."""
    if response.is_success:
        return _body(response)
    raise error_for(response)


def translate_error(url: str, exc: httpx.HTTPError) -> QuotaError:
    """Translate an httpx error of a coordinator request."""
    if isinstance(exc, httpx.TransportError):
        return CoordinatorUnavailable(f"coordinator at {url} unreachable: {exc!r}")
    return QuotaError(f"request to the coordinator at {url} failed: {exc!r}")


class BaseQuotaClient:
    def __init__(
        self,
        url: str,
        tenant: str,
        token: str | None,
        *,
        timeout: float,
        on_unavailable: OnUnavailable,
        policies: Mapping[str, Any] | None,
        probe_interval: float,
        release_queue: int,
    ) -> None:
        if not TENANT_PATTERN.match(tenant):
            raise ValueError(f"tenant {tenant!r} must match {TENANT_PATTERN.pattern}")
        if on_unavailable not in ("fail", "local"):
            raise ValueError(f"on_unavailable must be 'fail' or 'local', not {on_unavailable!r}")
        if release_queue < 0:
            raise ValueError(f"release_queue must be 0 or more, not {release_queue}")
        self.url = url
        self.tenant = tenant
        self.on_unavailable: OnUnavailable = on_unavailable
        self.timeout = timeout
        self.probe_interval = probe_interval  # seconds between tries during an outage
        self.headers = {"Accept": "application/json"}
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.local = LocalLimiter(tenant, parse_policies(policies) if policies else None)
        self._policies_cached = False
        self._next_probe: float | None = None  # monotonic; set while the coordinator is down

    # -- requests ---------------------------------------------------------------------

    @staticmethod
    def limits() -> httpx.Limits:
        # httpx's own default pool, with the shorter expiry.
        return httpx.Limits(
            max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEPALIVE_EXPIRY
        )

    def timeout_for(self, call: Call) -> httpx.Timeout:
        return httpx.Timeout(self.timeout, read=self.timeout + call.wait)

    def lease_call(
        self,
        api: str,
        key: str,
        cost: int,
        wait: float,
        runtime_estimate: float | None,
        priority: str | None = None,
    ) -> Call:
        body: dict[str, Any] = {"tenant": self.tenant, "api": api, "cost": cost}
        if key:
            body["key"] = key
        if priority is not None:
            body["priority"] = priority
        if wait > 0:
            body["wait"] = wait
        if runtime_estimate is not None:
            body["runtime_estimate"] = runtime_estimate
        return Call("POST", LEASES, body, wait=wait)

    def release_call(self, lease_id: str, body: dict[str, Any]) -> Call:
        return Call("POST", f"/v1/leases/{_segment(lease_id)}/release", body)

    def renew_call(self, lease_id: str, ttl: float | None) -> Call:
        return Call(
            "POST", f"/v1/leases/{_segment(lease_id)}/renew", {} if ttl is None else {"ttl": ttl}
        )

    def usage_call(self, api: str, key: str | None) -> Call:
        path = f"/v1/usage/{_segment(self.tenant)}/{_segment(api)}"
        return Call("GET", path, params={"key": key} if key else None)

    def policies_call(self, api: str | None) -> Call:
        return Call("GET", "/v1/policies" + (f"/{_segment(api)}" if api else ""))

    @staticmethod
    def release_body(
        lease: Lease | str,
        outcome: Outcome | None,
        status_code: int | None,
        retry_after: float | None,
        runtime: float | None,
    ) -> dict[str, Any]:
        if isinstance(lease, Lease):
            if outcome is not None:
                lease.set_outcome(outcome, status_code, retry_after, runtime)
            return lease.release_body()
        fields = {"status_code": status_code, "retry_after": retry_after, "runtime": runtime}
        return {"outcome": outcome or "ok"} | {k: v for k, v in fields.items() if v is not None}

    # -- replies ----------------------------------------------------------------------

    def lease_from(self, data: dict[str, Any], api: str, key: str, cost: int) -> Lease:
        lease_id = data.get("lease_id")
        if not isinstance(lease_id, str) or not lease_id:
            raise QuotaError(f"coordinator granted a lease without a lease_id: {data!r}")
        reported_cost = data.get("cost")
        return Lease(
            lease_id=lease_id,
            tenant=str(data.get("tenant", self.tenant)),
            api=str(data.get("api", api)),
            key=str(data.get("key") or key),
            cost=reported_cost if isinstance(reported_cost, int) else cost,
            expires_in=_number(data.get("expires_in"), 60.0),
            waited=_number(data.get("waited"), 0.0),
        )

    @staticmethod
    def expires_in_from(data: dict[str, Any]) -> float:
        expires_in = data.get("expires_in")
        if not isinstance(expires_in, int | float) or isinstance(expires_in, bool):
            raise QuotaError(f"coordinator renewed without expires_in: {data!r}")
        return float(expires_in)

    # -- the local fallback -----------------------------------------------------------

    def coordinator_due(self, now: float) -> bool:
        """Whether to ask the coordinator: always, except between probes in an outage."""
        return self._next_probe is None or now >= self._next_probe

    def went_down(self, now: float, exc: CoordinatorUnavailable) -> None:
        if self._next_probe is None:
            logger.warning("coordinator unavailable, using the local limiter: %s", exc)
        self._next_probe = now + self.probe_interval

    def came_back(self) -> None:
        if self._next_probe is not None:
            logger.warning("coordinator available again")
        self._next_probe = None

    @property
    def wants_policies(self) -> bool:
        """Whether to fetch the policies now: once, for the local fallback."""
        return self.on_unavailable == "local" and not self._policies_cached

    def cache_policies(self, data: object, *, complete: bool = True) -> None:
        """Keep policies for the local fallback; `complete` when they are all of them."""
        self.local.policies = self.local.policies.updated(parse_policies(data))
        self._policies_cached = self._policies_cached or complete

    def local_lease(
        self,
        api: str,
        key: str,
        cost: int,
        runtime_estimate: float | None,
        now: float,
        waited: float,
        cause: CoordinatorUnavailable | None,
    ) -> Lease:
        """A lease from the local limiter; `QuotaExhausted` to wait for one."""
        if not self.local.knows(api):
            raise CoordinatorUnavailable(
                f"coordinator unavailable and no policy known for api {api!r}; "
                "pass policies= or let the client reach the coordinator once",
                retry_after=cause.retry_after if cause else None,
            ) from cause
        return self.local.acquire(api, key, cost, runtime_estimate, now, waited)

    def release_locally(self, lease: Lease, body: dict[str, Any]) -> None:
        if not self.local.release(lease, body, time.monotonic()):
            raise UnknownLease(f"local lease {lease.lease_id} expired or was released")

    def renew_locally(self, lease: Lease) -> float:
        expires_in = self.local.renew(lease, time.monotonic())
        if expires_in is None:
            raise UnknownLease(f"local lease {lease.lease_id} expired or was released")
        return expires_in
