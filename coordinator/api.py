"""HTTP API v1: validate, call the engine, shape the reply."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal, TypeVar

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import Authorizer, Principal
from .engine import Denial, Engine, Grant, Outcome
from .errors import (
    BackendUnavailable,
    Forbidden,
    InvalidRequest,
    QuotagateError,
    Unauthorized,
    UnknownApi,
    UnknownLease,
)
from .leases import LeaseRef
from .policy import API_PATTERN, KEY_PATTERN, TENANT_PATTERN, Kind, PolicySet, load_policies
from .settings import Settings
from .store import connect
from .waiting import WaitLines

log = logging.getLogger("quotagate")
T = TypeVar("T")

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
    priority: int | str | None = None  # reserved for priority classes
    holder: str | None = Field(None, max_length=128)  # who holds it, for operators


class ReleaseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: Outcome
    status_code: int | None = Field(None, ge=100, le=599)
    retry_after: Seconds | None = Field(None, le=MAX_REPORTED_SECONDS)
    runtime: Seconds | None = Field(None, le=MAX_REPORTED_SECONDS)


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


def _documented(*codes: int) -> dict[int | str, dict[str, Any]]:
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


_BODY_ERRORS = (400, 413, 422)


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    headers = {}
    if "retry_after" in extra:
        headers["Retry-After"] = str(max(math.ceil(extra["retry_after"]), 1))
    return JSONResponse({"error": code, "detail": detail, **extra}, status, headers=headers)


def _denied(denial: Denial) -> JSONResponse:
    if denial.limit is None:
        limit, detail = None, "the fleet is pausing after an upstream 429"
    else:
        limit = denial.limit.describe()
        if denial.limit.kind is Kind.CONCURRENT:
            detail = f"{denial.limit.amount} leases are in flight"
        else:
            detail = f"{limit['kind']} limit {limit['amount']:g} per {limit['window']:g} s is spent"
    return _error(429, denial.reason, detail, retry_after=denial.retry_after_ms / 1000, limit=limit)


async def _wait_for_grant(
    attempt: Callable[[], Awaitable[Grant | Denial]],
    wait: float,
    request: Request,
    lines: WaitLines,
    scope: tuple[str, str, str],
) -> Grant | Denial | None:
    """Acquire, waiting in line and sleeping to each exact retry time while it fits in `wait`.

    With nobody in line, the first attempt is at once, and a denial whose earliest grant
    lies beyond the wait is answered at once; otherwise the request queues behind the
    earlier waiters. Nothing is reserved while waiting, so a client that goes away leaves
    nothing behind; None means it went away.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    if wait <= 0 or not lines.busy(scope):
        result = await attempt()
        if isinstance(result, Grant) or result.retry_after_ms / 1000 > wait:
            return result
    async with lines.turn(scope, deadline - loop.time()) as ours:
        if not ours:  # the line did not move in time: say when to come back
            return await attempt()
        while True:
            if await request.is_disconnected():
                return None
            result = await attempt()
            if isinstance(result, Grant):
                return result
            pause = result.retry_after_ms / 1000
            if pause > deadline - loop.time():
                return result
            await asyncio.sleep(pause)


class BodyLimit:
    """413 for a declared body over the limit, and for a streamed one once it passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self.too_large(scope, receive, send)
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _BodyTooLarge(self.max_bytes)
            return message

        try:
            await self.app(scope, counted, send)
        except _BodyTooLarge:
            await self.too_large(scope, receive, send)

    async def too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = f"bodies are limited to {self.max_bytes} bytes"
        await _error(413, "body_too_large", limit)(scope, receive, send)


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive`: an HTTPException, so FastAPI's body reading passes it on
    (it turns any other exception there into a 400) and the handler answers 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(413, f"bodies are limited to {max_bytes} bytes")


def context(request: Request) -> tuple[Engine, Principal]:
    """The engine, and who is asking (from the bearer token); plain calls, not
    dependencies, to keep the acquire path short."""
    authorizer: Authorizer = request.app.state.authorizer
    who = authorizer.principal(request.headers.get("authorization"))
    engine: Engine = request.app.state.engine
    return engine, who


def create_app(
    settings: Settings,
    *,
    policies: PolicySet | None = None,
    redis: Redis | None = None,
) -> FastAPI:
    """The service. Without `redis`, it connects to `settings.redis_url` at start-up."""
    policies = policies or load_policies(settings.policies)
    authorizer = Authorizer(settings.all_tokens())
    lines = WaitLines()
    timeout = settings.request_timeout

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis or connect(
            settings.redis_url or "redis://127.0.0.1:6379/0",
            socket_timeout=timeout,
            socket_connect_timeout=min(timeout, 1.0),
        )
        engine = Engine(
            client,
            policies,
            recovery_share=settings.recovery_share,
            loss_on_start=settings.recover_on_start,
        )
        app.state.engine = engine
        with contextlib.suppress(BackendUnavailable):
            await engine.check_epoch()  # else the first acquire does it
        try:
            yield
        finally:
            if redis is None:
                await client.aclose()

    app = FastAPI(title="quotagate", version="1", lifespan=lifespan)
    app.state.authorizer = authorizer

    async def bounded(awaitable: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(timeout):
                return await awaitable
        except TimeoutError as exc:
            raise BackendUnavailable(f"no answer from Redis within {timeout:g} s") from exc

    def lease_of(lease_id: str, who: Principal) -> LeaseRef:
        ref = LeaseRef.parse(lease_id)
        if ref is None:
            raise UnknownLease("unknown")
        who.check(ref.tenant)
        return ref

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)

    @app.exception_handler(QuotagateError)
    async def quotagate_error(request: Request, exc: QuotagateError) -> JSONResponse:
        if isinstance(exc, InvalidRequest):
            return _error(422, exc.code, str(exc), field=exc.field)
        if isinstance(exc, UnknownApi | UnknownLease):
            return _error(404, exc.code, str(exc))
        if isinstance(exc, Unauthorized):
            response = _error(401, exc.code, str(exc))
            response.headers["WWW-Authenticate"] = "Bearer"
            return response
        if isinstance(exc, Forbidden):
            return _error(403, exc.code, str(exc))
        if isinstance(exc, BackendUnavailable):
            log.warning("redis unavailable: %s", exc)
            return _error(503, exc.code, "the quota store is unavailable", retry_after=1.0)
        raise exc

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if errors and errors[0].get("type") == "json_invalid":  # loc is ("body", offset)
            reason = errors[0].get("ctx", {}).get("error", "")
            return _error(422, "invalid_request", f"body: not JSON: {reason}", field="body")
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        # The top-level field: bodies are flat; deeper parts are union members ("priority.int").
        names = [p for p in first["loc"] if p not in ("body", "path", "query")]
        detail = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'] if p != 'body') or 'body'}: {e['msg']}"
            for e in errors
        )
        return _error(422, "invalid_request", detail, field=str(names[0]) if names else "body")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {
            400: "invalid_body",  # FastAPI could not read it: not UTF-8, nested too deep, ...
            404: "not_found",
            405: "method_not_allowed",
            413: "body_too_large",
        }.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    @app.post(
        "/v1/leases",
        response_model=None,
        responses={
            200: {"model": LeaseReply},
            **_documented(*_BODY_ERRORS, 401, 403, 404, 429, 503),
        },
    )
    async def acquire(body: AcquireBody, request: Request) -> JSONResponse:
        engine, who = context(request)
        who.check(body.tenant)
        started = time.monotonic()
        estimate = None if body.runtime_estimate is None else _ms(body.runtime_estimate)

        def attempt() -> Awaitable[Grant | Denial]:
            return bounded(
                engine.acquire(body.tenant, body.api, body.key or "", body.cost, estimate)
            )

        wait = min(body.wait, settings.max_wait)
        scope = (body.tenant, body.api, body.key or "")
        result = await _wait_for_grant(attempt, wait, request, lines, scope)
        if wait > 0 and isinstance(result, Grant) and await request.is_disconnected():
            # Gone during the last attempt: the call will not happen, give the budget back.
            await bounded(engine.release(result.lease_id, Outcome.NOT_CALLED))
            result = None
        if result is None:  # the client went away while waiting
            return _error(499, "client_closed", "the client disconnected while waiting")
        if isinstance(result, Denial):
            return _denied(result)
        return JSONResponse(
            {
                "lease_id": result.lease_id,
                "tenant": result.tenant,
                "api": result.api,
                "key": result.key or None,
                "cost": result.cost,
                "expires_in": result.expires_in_ms / 1000,
                "waited": round(time.monotonic() - started, 3),
            }
        )

    @app.post(
        "/v1/leases/{lease_id}/release",
        response_model=None,
        responses={
            200: {"model": ReleasedReply},
            **_documented(*_BODY_ERRORS, 401, 403, 404, 503),
        },
    )
    async def release(lease_id: str, body: ReleaseBody, request: Request) -> JSONResponse:
        engine, who = context(request)
        lease_of(lease_id, who)
        await bounded(
            engine.release(
                lease_id,
                body.outcome,
                retry_after_ms=None if body.retry_after is None else _ms(body.retry_after),
                runtime_ms=None if body.runtime is None else _ms(body.runtime),
            )
        )
        return JSONResponse({"released": True})

    @app.post(
        "/v1/leases/{lease_id}/renew", responses=_documented(*_BODY_ERRORS, 401, 403, 404, 503)
    )
    async def renew(
        lease_id: str, request: Request, body: RenewBody | None = None
    ) -> dict[str, float]:
        engine, who = context(request)
        lease_of(lease_id, who)
        ttl = None if body is None or body.ttl is None else _ms(body.ttl)
        expires_in = await bounded(engine.renew(lease_id, ttl))
        return {"expires_in": expires_in / 1000}

    @app.get("/v1/usage/{tenant:path}/{api}", responses=_documented(401, 403, 404, 422, 503))
    async def usage(
        tenant: str,
        api: str,
        request: Request,
        key: Annotated[str | None, Query(max_length=256)] = None,
    ) -> dict[str, Any]:
        engine, who = context(request)
        who.check(tenant)
        view = await bounded(engine.usage(tenant, api, key or ""))
        limits = []
        for item in view.limits:
            seconds = item.limit.kind is Kind.RUNTIME  # runtime is reported in seconds
            limits.append(
                {
                    **item.limit.describe(),
                    "scope": item.limit.scope.value,
                    "used": item.used / 1000 if seconds else item.used,
                    "remaining": item.remaining / 1000 if seconds else item.remaining,
                    "resets_in": item.resets_in_ms / 1000,
                }
            )
        return {
            "tenant": tenant,
            "api": api,
            "key": key,
            "limits": limits,
            "in_flight": view.in_flight,
            "cooldown": view.cooldown_ms / 1000,
        }

    @app.get("/v1/policies", responses=_documented(401))
    async def all_policies(request: Request) -> dict[str, Any]:
        context(request)
        return policies.describe()

    @app.get("/v1/policies/{api}", responses=_documented(401, 404, 422))
    async def one_policy(api: str, request: Request) -> dict[str, Any]:
        context(request)
        policy = policies.apis.get(api)
        if policy is None:
            raise UnknownApi(api)
        return policy.describe()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", response_model=None, responses=_documented(503))
    async def readyz(request: Request) -> dict[str, str] | JSONResponse:
        engine: Engine = request.app.state.engine
        try:
            await bounded(engine.ready())
        except BackendUnavailable as exc:
            return _error(503, "backend_unavailable", str(exc), retry_after=1.0)
        return {"status": "ready"}

    return app


__all__ = ["create_app"]
