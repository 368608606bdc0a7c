"""`/healthz` (the process runs) and `/readyz` (the store answers, scripts loaded)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import EngineDep
from ..errors import BackendUnavailable
from ..replies import error_reply
from ..schemas import documented

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=documented(503))
async def readyz(engine: EngineDep) -> dict[str, str] | JSONResponse:
    try:
        await engine.ready()
    except BackendUnavailable as exc:
        return error_reply(503, exc.code, str(exc), retry_after=exc.retry_after)
    return {"status": "ready"}
