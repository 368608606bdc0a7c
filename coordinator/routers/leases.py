"""`/v1/leases`: acquire, release, renew."""

from __future__ import annotations

import math
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..auth import Principal
from ..deps import lease_context
from ..engine import Denial
from ..errors import UnknownLease
from ..leases import LeaseRef
from ..replies import denied_reply, error_reply
from ..schemas import (
    BODY_ERRORS,
    AcquireBody,
    LeaseReply,
    ReleaseBody,
    ReleasedReply,
    RenewBody,
    documented,
)
from ..waiting import Ask

router = APIRouter(prefix="/v1/leases", tags=["leases"])


def _ms(seconds: float) -> int:
    return math.ceil(seconds * 1000)


def _lease_of(lease_id: str, who: Principal) -> LeaseRef:
    ref = LeaseRef.parse(lease_id)
    if ref is None:
        raise UnknownLease("unknown")
    who.check(ref.tenant)
    return ref


@router.post(
    "",
    response_model=None,
    responses={200: {"model": LeaseReply}, **documented(*BODY_ERRORS, 401, 403, 404, 429, 503)},
)
async def acquire(body: AcquireBody, request: Request) -> JSONResponse:
    context = lease_context(request)
    context.who.check(body.tenant)
    started = time.monotonic()
    ask = Ask(
        tenant=body.tenant,
        api=body.api,
        key=body.key or "",
        cost=body.cost,
        runtime_estimate_ms=None if body.runtime_estimate is None else _ms(body.runtime_estimate),
        wait=min(body.wait, context.settings.max_wait),
        priority=body.priority,
        holder=body.holder,
    )
    result = await context.waiting.acquire(ask, request.is_disconnected)
    if result is None:  # the client went away while waiting
        return error_reply(499, "client_closed", "the client disconnected while waiting")
    if isinstance(result, Denial):
        return denied_reply(result)
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


@router.post(
    "/{lease_id}/release",
    response_model=None,
    responses={200: {"model": ReleasedReply}, **documented(*BODY_ERRORS, 401, 403, 404, 503)},
)
async def release(lease_id: str, body: ReleaseBody, request: Request) -> JSONResponse:
    context = lease_context(request)
    ref = _lease_of(lease_id, context.who)
    await context.engine.release(
        lease_id,
        body.outcome,
        retry_after_ms=None if body.retry_after is None else _ms(body.retry_after),
        runtime_ms=None if body.runtime is None else _ms(body.runtime),
        named=None if body.limit is None else (body.limit.amount, _ms(body.limit.window)),
    )
    context.waiting.released(ref.tenant, ref.api)
    return JSONResponse({"released": True})


@router.post("/{lease_id}/renew", responses=documented(*BODY_ERRORS, 401, 403, 404, 503))
async def renew(lease_id: str, request: Request, body: RenewBody | None = None) -> dict[str, float]:
    context = lease_context(request)
    _lease_of(lease_id, context.who)
    ttl = None if body is None or body.ttl is None else _ms(body.ttl)
    expires_in = await context.engine.renew(lease_id, ttl)
    return {"expires_in": expires_in / 1000}
