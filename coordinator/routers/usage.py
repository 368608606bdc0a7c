"""`/v1/usage`: what tenants have used of their apis.

Tenants contain `/`, so the last segment of a path tells what is asked:

- `/v1/usage`: every active (tenant, api, key) the token may see, `{items: [...]}`;
- a trailing `/` (`/v1/usage/contoso/app-1/`): all of the path is a tenant, its active
  apis;
- otherwise the last segment is the api when it names a known api or holds a `.` (as
  every catalog api does; an unknown one answers 404 `unknown_api`), and the rest is the
  tenant; any other last segment is part of the tenant. So `/v1/usage/contoso/app-1`
  lists tenant `contoso/app-1`, and `/v1/usage/contoso/app-1/m365d.incidents` is one api
  of it. A tenant whose last segment holds a `.` or names an api is listed with the `/`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from ..auth import Principal
from ..deps import EngineDep, PrincipalDep
from ..engine import Engine, validate_scope
from ..fleet import IndexDep, active, one
from ..index import FleetIndex
from ..schemas import documented

router = APIRouter(prefix="/v1/usage", tags=["usage"])
Items = dict[str, list[dict[str, Any]]]


def names_an_api(segment: str, engine: Engine) -> bool:
    return segment in engine.policies.apis or "." in segment


async def _tenant(tenant: str, who: Principal, engine: Engine, index: FleetIndex) -> Items:
    who.check(tenant)
    validate_scope(tenant, "")
    return {"items": await active(engine, index, who, tenant)}


@router.get("", responses=documented(401, 503))
async def fleet(who: PrincipalDep, engine: EngineDep, index: IndexDep) -> Items:
    return {"items": await active(engine, index, who)}


@router.get("/{tenant:path}/", responses=documented(401, 403, 422, 503))
async def tenant_apis(tenant: str, who: PrincipalDep, engine: EngineDep, index: IndexDep) -> Items:
    """The active apis of a tenant (the trailing `/` says the path is all tenant)."""
    return await _tenant(tenant, who, engine, index)


@router.get("/{tenant:path}/{api}", responses=documented(401, 403, 404, 422, 503))
async def usage(
    tenant: str,
    api: str,
    who: PrincipalDep,
    engine: EngineDep,
    index: IndexDep,
    key: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    """One api of a tenant; or, when the last segment names no api, the active apis of
    the tenant that the whole path names."""
    if not names_an_api(api, engine):
        return await _tenant(f"{tenant}/{api}", who, engine, index)
    who.check(tenant)
    return await one(engine, index, tenant, api, key or "")


@router.get("/{tenant}", responses=documented(401, 403, 422, 503))
async def tenant_of_one_segment(
    tenant: str, who: PrincipalDep, engine: EngineDep, index: IndexDep
) -> Items:
    return await _tenant(tenant, who, engine, index)
