"""Errors of the coordinator.

    QuotagateError
    ├── InvalidRequest     a field a client sent is wrong (HTTP 422); names the field
    ├── UnknownApi         no policy for the api (HTTP 404)
    ├── UnknownLease       unknown, expired or already released lease (HTTP 404)
    ├── Unauthorized       no or unknown bearer token (HTTP 401)
    ├── Forbidden          the token may not use this tenant (HTTP 403)
    └── BackendUnavailable Redis cannot be reached in time (HTTP 503)

`PolicyError` (a bad policy file, refused at start) lives in `policy.py`.
"""

from __future__ import annotations


class QuotagateError(Exception):
    code = "error"


class InvalidRequest(QuotagateError):
    code = "invalid_request"

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail


class UnknownApi(QuotagateError):
    code = "unknown_api"

    def __init__(self, api: str) -> None:
        super().__init__(f"no policy for api {api!r}")
        self.api = api


class UnknownLease(QuotagateError):
    code = "unknown_lease"

    def __init__(self, reason: str = "unknown") -> None:
        super().__init__(f"lease is {reason}: it may have expired or been released already")
        self.reason = reason


class Unauthorized(QuotagateError):
    code = "unauthorized"


class Forbidden(QuotagateError):
    code = "forbidden"


class BackendUnavailable(QuotagateError):
    code = "backend_unavailable"
