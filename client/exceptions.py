"""Errors of the quotagate client.

    QuotaError                  anything the coordinator (or the local limiter) refused
    ├── QuotaExhausted          429 `quota_exhausted` | `cooling_down`: wait `retry_after` seconds
    ├── CoordinatorUnavailable  unreachable, timed out, or 502/503/504 (`backend_unavailable`)
    ├── Unauthorized            401: missing or unknown token
    ├── Forbidden               403: the token may not use this tenant
    ├── BadRequest              400/422: invalid input, e.g. a cost no limit could ever grant
    ├── UnknownLease            404 `unknown_lease`: unknown, expired or already released
    ├── UnknownApi              404 `unknown_api`: no policy for the api
    └── UnroutedRequest         a request to a known host that no route matches (`unrouted="raise"`)

Transport errors of httpx are translated at the boundary (`raise ... from exc`), so
callers catch these and never httpx's own.
"""

from __future__ import annotations

from typing import Any


class QuotaError(Exception):
    """Base of every client error. `code` is the coordinator's error code, if it sent one."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.detail = detail


class QuotaExhausted(QuotaError):
    """No lease now. `retry_after` is seconds until the earliest possible grant;
    `limit` is the limit that bound it (`{kind, amount, window}`), when known."""

    def __init__(
        self,
        retry_after: float,
        code: str = "quota_exhausted",
        limit: dict[str, Any] | None = None,
        *,
        message: str | None = None,
        status_code: int | None = 429,
    ) -> None:
        text = message or f"{code}: retry after {retry_after:.3f} s"
        super().__init__(text, status_code=status_code, code=code)
        self.retry_after = retry_after
        self.limit = limit


class CoordinatorUnavailable(QuotaError):
    """The coordinator did not answer in time, or said its backend is down.
    `retry_after` is the server's hint in seconds, when it gave one."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        code: str | None = None,
        detail: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, code=code, detail=detail)
        self.retry_after = retry_after


class Unauthorized(QuotaError):
    """401: the token is missing or unknown."""


class Forbidden(QuotaError):
    """403: the token is not allowed for this tenant."""


class BadRequest(QuotaError):
    """400/422: the request is invalid; `detail` says why."""


class UnknownLease(QuotaError):
    """404 `unknown_lease`: the lease expired, was released, or never existed."""


class UnknownApi(QuotaError):
    """404 `unknown_api`: the coordinator has no policy for this api."""


class UnroutedRequest(QuotaError):
    """A request to a Microsoft host (or one the route table names) that no route matches,
    refused before it was sent because the transport was built with `unrouted="raise"`."""
