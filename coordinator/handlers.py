"""The exception table: every error a route can raise, turned into its reply once."""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from .errors import BackendUnavailable, QuotagateError
from .replies import error_reply

log = logging.getLogger("quotagate")

# What FastAPI's own HTTP errors are called in our replies.
_HTTP_CODES = {
    400: "invalid_body",  # FastAPI could not read it: not UTF-8, nested too deep, ...
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
}


async def quotagate_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QuotagateError)
    if isinstance(exc, BackendUnavailable):
        log.warning("redis unavailable: %s", exc)
    return error_reply(exc.status, exc.code, exc.reply_detail(), exc.headers(), **exc.fields())


async def invalid(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":  # loc is ("body", offset)
        reason = errors[0].get("ctx", {}).get("error", "")
        return error_reply(422, "invalid_request", f"body: not JSON: {reason}", field="body")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # The top-level field: bodies are flat; deeper parts are union members ("priority.int").
    names = [p for p in first["loc"] if p not in ("body", "path", "query")]
    detail = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}" for e in errors
    )
    return error_reply(422, "invalid_request", detail, field=str(names[0]) if names else "body")


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    return error_reply(exc.status_code, code, str(exc.detail))


EXCEPTION_HANDLERS: dict[
    int | type[Exception], Callable[[Request, Any], Coroutine[Any, Any, Response]]
] = {
    QuotagateError: quotagate_error,
    RequestValidationError: invalid,
    StarletteHTTPException: http_error,
}
