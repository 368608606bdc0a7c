"""`/v1/usage`: what a tenant has used of an api."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from ..deps import EngineDep, PrincipalDep
from ..policy import Kind
from ..schemas import documented

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("/{tenant:path}/{api}", responses=documented(401, 403, 404, 422, 503))
async def usage(
    tenant: str,
    api: str,
    who: PrincipalDep,
    engine: EngineDep,
    key: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    who.check(tenant)
    view = await engine.usage(tenant, api, key or "")
    classes = engine.policy(tenant, api).classes
    limits = []
    for item in view.limits:
        seconds = item.limit.kind is Kind.RUNTIME  # runtime is reported in seconds
        described = item.limit.describe()
        per_class = {}
        if classes and item.limit.kind is not Kind.CONCURRENT:
            # What each class may still be granted: up to its share of the amount in force.
            for klass in classes:
                left = max(klass.cap(item.amount) - item.used, 0)
                per_class[klass.name] = left / 1000 if seconds else left
        limits.append(
            {
                **described,
                "amount": item.amount / 1000 if seconds else item.amount,  # in force
                "configured": described["amount"],  # the policy's
                "scope": item.limit.scope.value,
                "used": item.used / 1000 if seconds else item.used,
                "remaining": item.remaining / 1000 if seconds else item.remaining,
                "resets_in": item.resets_in_ms / 1000,
                **({"remaining_by_class": per_class} if per_class else {}),
            }
        )
    return {
        "tenant": tenant,
        "api": api,
        "key": key,
        "limits": limits,
        "in_flight": view.in_flight,
        "cooldown": view.cooldown_ms / 1000,
        "waiting": view.waiting,  # requests in the key's line, fleet-wide
    }
