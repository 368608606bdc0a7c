"""The fleet at a glance: usage replies, for one (tenant, api, key) or for every active
one a token may see, with the leases in flight, their holders and the waiting lines; and
the dashboard's snapshot (those plus the running pauses and the recent upstream 429s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from redis.exceptions import RedisError

from .auth import Principal
from .engine import Engine, Usage
from .errors import BackendUnavailable, Forbidden
from .index import FleetIndex, Holding, Line, now_ms
from .policy import Kind, PriorityClass

T = TypeVar("T")
SHOWN_LEASES = 50  # leases in flight listed per item at most
AT_ONCE = 32  # usage reads in flight at once for a list


async def fleet_index(request: Request) -> FleetIndex:
    found: FleetIndex = request.app.state.index
    return found


IndexDep = Annotated[FleetIndex, Depends(fleet_index)]


async def _read(engine: Engine, awaitable: Awaitable[T]) -> T:
    """An index read, bounded and failing as the engine's calls do."""
    try:
        async with asyncio.timeout(engine.timeout):
            return await awaitable
    except (RedisError, OSError, TimeoutError) as exc:
        raise BackendUnavailable(str(exc) or type(exc).__name__) from exc


def may_see(who: Principal, tenant: str) -> bool:
    try:
        who.check(tenant)
    except Forbidden:
        return False
    return True


def usage_reply(
    view: Usage, key: str | None, holdings: list[Holding], classes: Sequence[PriorityClass]
) -> dict[str, Any]:
    """The reply of `GET /v1/usage/{tenant}/{api}`: runtime in seconds, as everywhere;
    `amount` is the limit in force (a learned one may be lower), `configured` the
    policy's; with priority classes, what each class may still be granted."""
    limits = []
    for item in view.limits:
        seconds = item.limit.kind is Kind.RUNTIME
        described = item.limit.describe()
        per_class = {}
        if classes and item.limit.kind is not Kind.CONCURRENT:
            for klass in classes:  # up to its share of the amount in force
                left = max(klass.cap(item.amount) - item.used, 0)
                per_class[klass.name] = left / 1000 if seconds else left
        limits.append(
            {
                **described,
                "amount": item.amount / 1000 if seconds else item.amount,
                "configured": described["amount"],
                "scope": item.limit.scope.value,
                "used": item.used / 1000 if seconds else item.used,
                "remaining": item.remaining / 1000 if seconds else item.remaining,
                "resets_in": item.resets_in_ms / 1000,
                **({"remaining_by_class": per_class} if per_class else {}),
            }
        )
    mine = [h for h in holdings if h.key == view.key]
    return {
        "tenant": view.tenant,
        "api": view.api,
        "key": key,
        "limits": limits,
        "in_flight": view.in_flight,
        "cooldown": view.cooldown_ms / 1000,
        # The leases in flight that the index knows (it hears of a grant within a second);
        # `expires_at` in seconds since the epoch, by the coordinator's clock.
        "leases": [
            {"lease": h.lease[:8], "holder": h.holder, "expires_at": h.expires_at_ms / 1000}
            for h in mine[:SHOWN_LEASES]
        ],
        "waiting": view.waiting,  # requests in the key's line, fleet-wide
    }


async def one(engine: Engine, index: FleetIndex, tenant: str, api: str, key: str) -> dict[str, Any]:
    view = await engine.usage(tenant, api, key)
    holdings = await _read(engine, index.holdings([(tenant, api)]))
    classes = engine.policy(tenant, api).classes
    return usage_reply(view, key or None, holdings.get((tenant, api), []), classes)


async def active(
    engine: Engine, index: FleetIndex, who: Principal, tenant: str | None = None
) -> list[dict[str, Any]]:
    """A usage reply per active (tenant, api, key) that `who` may see, of `tenant` only
    when given; sorted by tenant, api and key."""
    lines: list[Line] = [
        line
        for line in await _read(engine, index.active())
        if (tenant is None or line[0] == tenant)
        and line[1] in engine.policies.apis
        and may_see(who, line[0])
    ]
    if not lines:
        return []
    gate = asyncio.Semaphore(AT_ONCE)

    async def read(line: Line) -> Usage:
        async with gate:
            return await engine.usage(*line)

    views = await asyncio.gather(*(read(line) for line in lines))
    holdings = await _read(engine, index.holdings((t, a) for t, a, _ in lines))
    return [
        usage_reply(
            view,
            line[2] or None,
            holdings.get(line[:2], []),
            engine.policy(line[0], line[1]).classes,
        )
        for line, view in zip(lines, views, strict=True)
    ]


async def snapshot(engine: Engine, index: FleetIndex, who: Principal) -> dict[str, Any]:
    """What the dashboard shows: every active item, the pauses running and the latest
    upstream 429s that `who` may see. Times are seconds; `at` is since the epoch."""
    items = await active(engine, index, who)
    at = now_ms()
    pauses = [
        {"tenant": p.tenant, "api": p.api, "ends_in": (p.ends_at_ms - at) / 1000}
        for p in await _read(engine, index.pauses())
        if may_see(who, p.tenant)
    ]
    throttles = [
        {**note, "ago": (at - note["at"]) / 1000}
        for note in await _read(engine, index.throttles())
        if may_see(who, note["tenant"])
    ]
    return {"at": at / 1000, "items": items, "pauses": pauses, "throttles": throttles}


__all__ = ["IndexDep", "active", "may_see", "one", "snapshot", "usage_reply"]
