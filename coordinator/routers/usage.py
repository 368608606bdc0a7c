"""`/v1/usage`: what tenants have used of their apis.

Tenants contain `/`, so one path route reads what follows `/v1/usage/`:

- nothing: every active (tenant, api, key) the token may see, `{items: [...]}`;
- a trailing `/` (`/v1/usage/contoso/app-1/`): the whole path is a tenant, its active apis;
- otherwise the last segment is the api when it names a known api, or matches the api
  pattern and holds a `.` (as every catalog api does: an unknown one answers 404
  `unknown_api`); the rest is the tenant. Any other last segment is part of the tenant:
  `/v1/usage/contoso/app-1` lists tenant `contoso/app-1`, and
  `/v1/usage/contoso/app-1/m365d.incidents` is one api of it. A tenant whose own last
  segment names an api is listed with the trailing `/`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from ..deps import EngineDep, PrincipalDep
from ..engine import Engine, validate_scope
from ..fleet import IndexDep, active, one
from ..policy import API_PATTERN
from ..schemas import documented

router = APIRouter(prefix="/v1/usage", tags=["usage"])


def split(path: str, engine: Engine) -> tuple[str, str | None]:
    """(tenant, api) of what follows `/v1/usage/`, by the rule of the module's docstring;
    api None: a listing of the tenant."""
    if path.endswith("/"):
        return path.rstrip("/"), None
    tenant, slash, last = path.rpartition("/")
    if slash and API_PATTERN.match(last) and (last in engine.policies.apis or "." in last):
        return tenant, last
    return path, None


@router.get("", responses=documented(401, 503))
async def fleet(who: PrincipalDep, engine: EngineDep, index: IndexDep) -> dict[str, Any]:
    return {"items": await active(engine, index, who)}


@router.get("/{path:path}", responses=documented(401, 403, 404, 422, 503))
async def usage(
    path: str,
    who: PrincipalDep,
    engine: EngineDep,
    index: IndexDep,
    key: Annotated[str | None, Query(max_length=256)] = None,
) -> dict[str, Any]:
    tenant, api = split(path, engine)
    who.check(tenant)
    if api is None:
        validate_scope(tenant, "")
        return {"items": await active(engine, index, who, tenant)}
    return await one(engine, index, tenant, api, key or "")
