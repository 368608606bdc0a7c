"""`/gateway/{host}/{path}`: the upstream call under a lease (`coordinator/gateway.py`).

A mounted ASGI app rather than a FastAPI route: it takes every method and path, its
answers are the upstream's (no schema, none in the OpenAPI document, so no schema-driven
fuzzer reaches out to the internet through it), and it skips the per-request work of
FastAPI's endpoint layer on the hot path. Errors still go through the handler table.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import QuotagateError
from ..gateway import PREFIX, Gateway
from ..handlers import quotagate_error


async def forward(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    gateway: Gateway = request.app.state.gateway
    response = await gateway.forward(request)
    await response(scope, receive, send)


class GatewayFirst:
    """ASGI middleware: a request under `/gateway/` goes straight to the gateway, past
    the API's routing and exception middleware (the most frequent requests, so what
    each request costs counts most there); its errors are answered from the handler
    table all the same. Inside the request id's middleware, so its log lines and reply
    carry the id as every other's do."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        gateway: Gateway = request.app.state.gateway
        try:
            response = await gateway.forward(request)
        except QuotagateError as exc:
            response = await quotagate_error(request, exc)
        await response(scope, receive, send)


router = APIRouter(tags=["gateway"])
router.mount(PREFIX.rstrip("/"), forward)
