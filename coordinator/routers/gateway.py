"""`/gateway/{host}/{path}`: the upstream call under a lease (`coordinator/gateway.py`)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from ..gateway import Gateway

router = APIRouter(tags=["gateway"])
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


# Not in the OpenAPI document: its answers are the upstream's, and a schema-driven fuzzer
# must not reach out to the internet through it.
@router.api_route("/gateway/{target:path}", methods=METHODS, include_in_schema=False)
async def forward(request: Request) -> Response:
    gateway: Gateway = request.app.state.gateway
    return await gateway.forward(request)
