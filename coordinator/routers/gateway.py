"""`/gateway/{host}/{path}`: the upstream call under a lease (`coordinator/gateway.py`).

A mounted ASGI app rather than a FastAPI route: it takes every method and path, its
answers are the upstream's (no schema, none in the OpenAPI document, so no schema-driven
fuzzer reaches out to the internet through it), and it skips the per-request work of
FastAPI's endpoint layer on the hot path. Errors still go through the handler table.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from ..gateway import PREFIX, Gateway


async def forward(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    gateway: Gateway = request.app.state.gateway
    response = await gateway.forward(request)
    await response(scope, receive, send)


router = APIRouter(tags=["gateway"])
router.mount(PREFIX.rstrip("/"), forward)
