"""`/metrics`: Prometheus text, every worker's values in multiprocess mode.

Like `/healthz`, it needs no token: a scraper sees counts by tenant name (turn the label
off with `metrics_tenant_label`), never a token or a lease id.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import APIRouter
from fastapi.responses import Response
from redis.exceptions import RedisError

from ..fleet import IndexDep
from ..metrics import exposition

router = APIRouter(tags=["metrics"])
STORE_READ = 1.0  # seconds the scrape waits for the gauges read from the store


@router.get("/metrics", response_class=Response)
async def metrics(index: IndexDep) -> Response:
    pausing = None
    with contextlib.suppress(RedisError, OSError, TimeoutError):
        async with asyncio.timeout(STORE_READ):
            pausing = len(await index.pauses())
    body, content_type = exposition(pausing)
    return Response(body, media_type=content_type)
