"""Errors of the coordinator, each with the HTTP status it answers with.

    QuotagateError
    ├── InvalidRequest     422  a field a client sent is wrong; names the field
    ├── UnknownApi         404  no policy for the api
    ├── UnknownLease       404  unknown, expired or already released lease
    ├── Unauthorized       401  no or unknown bearer token
    ├── Forbidden          403  the token may not use this tenant
    └── BackendUnavailable 503  the store cannot be reached in time, or is failing over

Every error answers `{"error": code, "detail": text, **fields()}`; `handlers.py` turns
them into replies. `PolicyError` (a bad policy file, refused at start) lives in
`policy.py`.
"""

from __future__ import annotations

from typing import Any


class QuotagateError(Exception):
    code = "error"
    status = 500

    def reply_detail(self) -> str:
        """The reply's `detail`: the message, unless it says more than a client should see."""
        return str(self)

    def fields(self) -> dict[str, Any]:
        """More fields of the reply than `error` and `detail`."""
        return {}

    def headers(self) -> dict[str, str]:
        return {}


class InvalidRequest(QuotagateError):
    code = "invalid_request"
    status = 422

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail

    def fields(self) -> dict[str, Any]:
        return {"field": self.field}


class UnknownApi(QuotagateError):
    code = "unknown_api"
    status = 404

    def __init__(self, api: str) -> None:
        super().__init__(f"no policy for api {api!r}")
        self.api = api


class UnknownLease(QuotagateError):
    code = "unknown_lease"
    status = 404

    def __init__(self, reason: str = "unknown") -> None:
        super().__init__(f"lease is {reason}: it may have expired or been released already")
        self.reason = reason


class Unauthorized(QuotagateError):
    code = "unauthorized"
    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class Forbidden(QuotagateError):
    code = "forbidden"
    status = 403


class BackendUnavailable(QuotagateError):
    code = "backend_unavailable"
    status = 503
    retry_after = 1.0  # seconds: a failover or a restart is usually over by then

    def reply_detail(self) -> str:
        return "the quota store is unavailable"  # the cause goes to the log

    def fields(self) -> dict[str, Any]:
        return {"retry_after": self.retry_after}
