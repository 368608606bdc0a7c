"""`/ui`: the live dashboard, static HTML and JS from the package, fed by server-sent
events from `/ui/events` (one snapshot a second, see `fleet.snapshot`).

Auth is the API's: with tokens configured, open `/ui?token=<token>` once; the page sets
the token in an HttpOnly, SameSite=Strict cookie for `/ui` and sends the browser to the
bare `/ui` (so the token leaves the address bar and the history). The events stream reads
the cookie, or an `Authorization` header, or `?token=`. The page shows only the tenants
that token may use.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response, StreamingResponse
from redis.exceptions import RedisError

from ..auth import Authorizer, Principal
from ..deps import EngineDep
from ..errors import BackendUnavailable, Unauthorized
from ..fleet import IndexDep, snapshot

router = APIRouter(prefix="/ui", tags=["ui"], include_in_schema=False)
STATIC = Path(__file__).resolve().parent.parent / "ui"
COOKIE = "quotagate_token"
INTERVAL = 1.0  # seconds between two snapshots
# A stream ends after this many seconds and the browser's EventSource opens a new one:
# a server that stops waits for open responses, so none may last for ever.
LIFETIME = 60.0
TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}


def _principal(request: Request) -> Principal:
    authorizer: Authorizer = request.app.state.authorizer
    header = request.headers.get("authorization")
    token = request.query_params.get("token") or request.cookies.get(COOKIE)
    if header is None and token:
        header = f"Bearer {token}"
    return authorizer.principal(header)


def _asset(name: str) -> bytes:
    return (STATIC / name).read_bytes()


@router.get("", response_model=None)
async def page(request: Request) -> Response:
    try:
        _principal(request)
    except Unauthorized:
        return HTMLResponse(_asset("login.html"), 401)
    token = request.query_params.get("token")
    if token:
        moved = RedirectResponse("/ui", 303)
        moved.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/ui")
        return moved
    return HTMLResponse(_asset("index.html"), headers={"Cache-Control": "no-store"})


@router.get("/static/{name}")
async def static(name: str) -> Response:
    path = STATIC / name
    if "/" in name or path.suffix not in TYPES or not path.is_file():
        return Response(status_code=404)
    return Response(path.read_bytes(), media_type=TYPES[path.suffix])


@router.get("/events", response_model=None)
async def events(request: Request, engine: EngineDep, index: IndexDep) -> Response:
    who = _principal(request)  # raises Unauthorized: the API's 401

    async def stream() -> AsyncIterator[str]:
        ends = time.monotonic() + LIFETIME
        yield f"retry: {int(INTERVAL * 1000)}\n\n"
        while time.monotonic() < ends and not await request.is_disconnected():
            try:
                data = json.dumps(await snapshot(engine, index, who))
                yield f"event: snapshot\ndata: {data}\n\n"
            except (BackendUnavailable, RedisError, OSError, TimeoutError):
                yield 'event: unavailable\ndata: "the quota store is unavailable"\n\n'
            await asyncio.sleep(INTERVAL)

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)
