"""`/v1/policies`: the effective policies."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..deps import PoliciesDep, PrincipalDep
from ..errors import UnknownApi
from ..schemas import documented

router = APIRouter(prefix="/v1/policies", tags=["policies"])


@router.get("", responses=documented(401))
async def all_policies(who: PrincipalDep, policies: PoliciesDep) -> dict[str, Any]:
    return policies.describe()


@router.get("/{api}", responses=documented(401, 404, 422))
async def one_policy(api: str, who: PrincipalDep, policies: PoliciesDep) -> dict[str, Any]:
    policy = policies.apis.get(api)
    if policy is None:
        raise UnknownApi(api)
    return policy.describe()
