"""`/v1/leases`: acquire, release, renew."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time

from fastapi import APIRouter, Request
from redis.exceptions import RedisError

from ..auth import Principal
from ..deps import lease_context
from ..engine import Denial, Outcome
from ..errors import UnknownLease
from ..index import FleetIndex
from ..leases import LeaseRef
from ..logs import event, lease_prefix
from ..replies import JSONReply, denied_reply, error_reply
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
from ._route import JSONBodyRoute

router = APIRouter(prefix="/v1/leases", tags=["leases"], route_class=JSONBodyRoute)
HOLDER_READ = 0.25  # seconds a pause's log line waits for its holder from the store


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
async def acquire(body: AcquireBody, request: Request) -> JSONReply:
    context = lease_context(request)
    context.who.check(body.tenant)
    meter, index = context.meter, context.index
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
    waited = time.monotonic() - started
    index.seen(ask.tenant, ask.api, ask.key)
    if result is None:  # the client went away while waiting
        meter.decision(ask.api, ask.tenant, "client_closed", waited)
        return error_reply(499, "client_closed", "the client disconnected while waiting")
    if isinstance(result, Denial):
        meter.decision(ask.api, ask.tenant, result.reason, waited)
        return denied_reply(result)
    meter.decision(ask.api, ask.tenant, "granted", waited)
    index.granted(
        result.tenant, result.api, result.key, result.lease_id, ask.holder, result.expires_in_ms
    )
    return JSONReply(
        {
            "lease_id": result.lease_id,
            "tenant": result.tenant,
            "api": result.api,
            "key": result.key or None,
            "cost": result.cost,
            "expires_in": result.expires_in_ms / 1000,
            "waited": round(waited, 3),
        }
    )


@router.post(
    "/{lease_id}/release",
    response_model=None,
    responses={200: {"model": ReleasedReply}, **documented(*BODY_ERRORS, 401, 403, 404, 503)},
)
async def release(lease_id: str, body: ReleaseBody, request: Request) -> JSONReply:
    context = lease_context(request)
    engine, index = context.engine, context.index
    ref = _lease_of(lease_id, context.who)
    released = await engine.release(
        lease_id,
        body.outcome,
        retry_after_ms=None if body.retry_after is None else _ms(body.retry_after),
        runtime_ms=None if body.runtime is None else _ms(body.runtime),
        named=None if body.limit is None else (body.limit.amount, _ms(body.limit.window)),
        runtime_upstream=body.runtime_upstream,  # the engine uses it only with a runtime
    )
    if released.woke:
        context.waiting.released(ref.tenant, ref.api)
    context.meter.released(ref.api, ref.tenant, body.outcome)
    if body.outcome == Outcome.THROTTLED:
        await _paused(ref, body, engine.policy(ref.tenant, ref.api).shortest_calls_window_ms, index)
    index.ended(ref)
    return JSONReply({"released": True})


async def _paused(ref: LeaseRef, body: ReleaseBody, default_ms: int, index: FleetIndex) -> None:
    """An upstream 429 paused the fleet of (tenant, api): one log line naming who reported
    it, and a note for the dashboard. Rare, so it may read the lease's holder from the
    store when another replica granted it."""
    retry_after = body.retry_after if body.retry_after is not None else default_ms / 1000
    holder = index.holder(ref)
    if holder is None:
        with contextlib.suppress(RedisError, OSError, TimeoutError, ValueError, KeyError):
            async with asyncio.timeout(HOLDER_READ):
                holder = await index.stored_holder(ref)
    status = body.status_code
    index.throttled(ref, holder=holder, status=status, retry_after=retry_after)
    event(
        logging.WARNING,
        "fleet_pause",
        f"upstream throttled {ref.tenant} {ref.api}: the fleet pauses {retry_after:g} s",
        tenant=ref.tenant,
        api=ref.api,
        key=ref.key or None,
        holder=holder,
        lease=lease_prefix(ref.lease_id),
        status=status,
        retry_after=retry_after,
        reason="throttled",
    )


@router.post("/{lease_id}/renew", responses=documented(*BODY_ERRORS, 401, 403, 404, 503))
async def renew(lease_id: str, request: Request, body: RenewBody | None = None) -> dict[str, float]:
    context = lease_context(request)
    ref = _lease_of(lease_id, context.who)
    ttl = None if body is None or body.ttl is None else _ms(body.ttl)
    expires_in = await context.engine.renew(lease_id, ttl)
    context.index.renewed(ref, expires_in)
    return {"expires_in": expires_in / 1000}
