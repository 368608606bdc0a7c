"""JSON replies of the HTTP API that are not a route's success: errors and denials."""

from __future__ import annotations

import math
from typing import Any

from fastapi.responses import JSONResponse
from pydantic_core import to_json

from .engine import Denial
from .policy import Kind


class JSONReply(JSONResponse):
    """A JSON reply rendered by pydantic-core (compact UTF-8, as Starlette's `json.dumps`
    renders it): the lease routes, which every upstream call passes, answer with it."""

    def render(self, content: Any) -> bytes:
        return to_json(content)


def error_reply(
    status: int, code: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONReply:
    """`{"error": code, "detail": detail, **extra}`; a `retry_after` (seconds) also goes
    into `Retry-After`, in whole seconds rounded up."""
    headers = dict(headers or {})
    if "retry_after" in extra:
        headers["Retry-After"] = str(max(math.ceil(extra["retry_after"]), 1))
    return JSONReply({"error": code, "detail": detail, **extra}, status, headers=headers)


def denied_reply(denial: Denial) -> JSONReply:
    if denial.limit is None:
        limit, detail = None, "the fleet is pausing after an upstream 429"
    else:
        limit = denial.limit.describe()
        if denial.amount and denial.limit.kind is Kind.CALLS:
            limit["amount"] = denial.amount  # in force: a learned limit may be lower
        if denial.limit.kind is Kind.CONCURRENT:
            detail = f"{denial.limit.amount} leases are in flight"
        else:
            detail = f"{limit['kind']} limit {limit['amount']:g} per {limit['window']:g} s is spent"
    return error_reply(
        429, denial.reason, detail, retry_after=denial.retry_after_ms / 1000, limit=limit
    )
