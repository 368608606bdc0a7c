"""The bodies and replies of HTTP API v1, as pydantic models (validation and OpenAPI)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .engine import Outcome
from .policy import API_PATTERN, CLASS_PATTERN, KEY_PATTERN, TENANT_PATTERN

Seconds = Annotated[float, Field(ge=0, allow_inf_nan=False)]
MAX_REPORTED_SECONDS = 7 * 86_400.0  # a retry time or run time beyond a week is a mistake


class AcquireBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str = Field(pattern=TENANT_PATTERN.pattern)
    api: str = Field(pattern=API_PATTERN.pattern)
    key: str | None = Field(None, pattern=KEY_PATTERN.pattern)
    cost: int = Field(1, ge=1, strict=True)  # call units
    runtime_estimate: Seconds | None = Field(None, le=MAX_REPORTED_SECONDS)
    wait: Seconds = 0.0  # capped by the server's max_wait
    # A priority class of the api's policy; None: its default class. An api without
    # classes accepts any well-formed name and gives it no effect.
    priority: str | None = Field(None, pattern=CLASS_PATTERN.pattern)
    holder: str | None = Field(None, max_length=128)  # who holds it, for operators


class NamedLimit(BaseModel):
    """The limit a throttled answer named ("maximum allowed N per hh:mm:ss")."""

    model_config = ConfigDict(extra="forbid")

    amount: int = Field(ge=1, le=10**9, strict=True)  # calls per window
    window: Seconds = Field(gt=0, le=MAX_REPORTED_SECONDS)


class ReleaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: Outcome
    status_code: int | None = Field(None, ge=100, le=599)
    retry_after: Seconds | None = Field(None, le=MAX_REPORTED_SECONDS)
    runtime: Seconds | None = Field(None, le=MAX_REPORTED_SECONDS)
    # True when `runtime` is the upstream's own processing time (a hunting answer's
    # Stats.ExecutionTime), not a time the client measured.
    runtime_upstream: bool = Field(False, strict=True)
    limit: NamedLimit | None = None  # with throttled: what the upstream said its limit is


class RenewBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: Seconds | None = Field(None, gt=0, le=86_400.0)


class LeaseReply(BaseModel):
    """200 to an acquire."""

    lease_id: str
    tenant: str
    api: str
    key: str | None
    cost: int
    expires_in: float
    waited: float


class ReleasedReply(BaseModel):
    released: bool


class ErrorReply(BaseModel):
    """Every error: a code, a sentence, and more fields for some codes."""

    model_config = ConfigDict(extra="allow")

    error: str
    detail: str


class InvalidReply(ErrorReply):
    field: str  # the field that is wrong; "body" for the body as a whole


class LimitShown(BaseModel):
    kind: str
    amount: float
    window: float | None  # None for a concurrent limit


class DeniedReply(ErrorReply):
    error: Literal["quota_exhausted", "cooling_down"]
    retry_after: float
    limit: LimitShown | None  # None while cooling down


class UnavailableReply(ErrorReply):
    retry_after: float


def documented(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI documentation of the error replies a route can give (documentation only)."""
    retry_after = {
        "Retry-After": {
            "description": "whole seconds until a retry can succeed",
            "schema": {"type": "integer", "minimum": 1},
        }
    }
    known: dict[int, dict[str, Any]] = {
        400: {"model": ErrorReply, "description": "the body cannot be parsed"},
        401: {"model": ErrorReply, "description": "no or unknown bearer token"},
        403: {"model": ErrorReply, "description": "the token may not use this tenant"},
        404: {"model": ErrorReply, "description": "unknown api, lease or route"},
        413: {"model": ErrorReply, "description": "the body is over the size limit"},
        422: {"model": InvalidReply, "description": "invalid input; `field` names it"},
        429: {"model": DeniedReply, "description": "denied", "headers": retry_after},
        503: {
            "model": UnavailableReply,
            "description": "the quota store is unavailable",
            "headers": retry_after,
        },
    }
    return {code: known[code] for code in codes}


BODY_ERRORS = (400, 413, 422)
