"""`/v1/learned`: limits a tenant learned from the upstream's 429s (design rule 8)."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import EngineDep, PrincipalDep
from ..schemas import documented

router = APIRouter(prefix="/v1/learned", tags=["learned"])


@router.delete("/{tenant:path}/{api}", responses=documented(401, 403, 404, 422, 503))
async def forget(tenant: str, api: str, who: PrincipalDep, engine: EngineDep) -> dict[str, int]:
    """Forget what (tenant, api) learned: its calls limits are the policy's again."""
    who.check(tenant)
    return {"forgotten": await engine.forget(tenant, api)}
