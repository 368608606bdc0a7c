"""JSONBodyRoute answers every body exactly as FastAPI's own route does: the same
endpoint behind both, and bodies valid, malformed and generated."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotagate.coordinator.app import create_app
from quotagate.coordinator.handlers import EXCEPTION_HANDLERS
from quotagate.coordinator.routers._route import JSONBodyRoute, _plan
from quotagate.coordinator.routers.leases import router as lease_router
from quotagate.coordinator.schemas import AcquireBody, ReleaseBody
from quotagate.coordinator.settings import Settings

from .test_hostile import MALFORMED


def _app() -> FastAPI:
    app = FastAPI(exception_handlers=EXCEPTION_HANDLERS)
    for prefix, route_class in (("/fast", JSONBodyRoute), ("/plain", None)):
        router = APIRouter(prefix=prefix, **({"route_class": route_class} if route_class else {}))

        @router.post("/acquire", response_model=None)
        async def acquire(body: AcquireBody, request: Request) -> JSONResponse:
            return JSONResponse(body.model_dump(mode="json"))

        @router.post("/{lease_id}/release", response_model=None)
        async def release(lease_id: str, body: ReleaseBody, request: Request) -> JSONResponse:
            return JSONResponse({"lease_id": lease_id, **body.model_dump(mode="json")})

        app.include_router(router)
    return app


APP = _app()


async def _both(path: str, content: bytes, content_type: str | None) -> tuple[Any, Any]:
    headers = {} if content_type is None else {"content-type": content_type}
    transport = httpx.ASGITransport(app=APP)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = []
        for prefix in ("/fast", "/plain"):
            reply = await client.post(f"{prefix}{path}", content=content, headers=headers)
            answers.append((reply.status_code, reply.content))
    return answers[0], answers[1]


BODIES = [
    b'{"tenant": "contoso/app", "api": "m365d.incidents"}',
    b'{"tenant": "contoso/app", "api": "m365d.incidents", "cost": 2, "wait": 1.5}',
    b'{"tenant": "contoso/app", "api": "x", "tenant": "other"}',
    b'\xef\xbb\xbf{"tenant": "contoso/app", "api": "m365d.incidents"}',
    b'{"tenant": "t", "api": "a", "cost": ' + b"9" * 4000 + b"}",
    b'{"tenant": "t", "api": "a", "wait": NaN}',
    b'{"tenant": "t", "api": "a", "cost": true}',
    b'{"tenant": "t", "api": "a", "cost": 1.0}',
    b'{"tenant": "t", "api": "a", "extra": 1}',
    *(content for content, *_ in MALFORMED.values()),
]


@pytest.mark.parametrize("content", BODIES, ids=[f"body{i}" for i in range(len(BODIES))])
@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "text/plain", None]
)
async def test_every_body_gets_fastapis_own_answer(
    content: bytes, content_type: str | None
) -> None:
    fast, plain = await _both("/acquire", content, content_type)
    assert fast == plain


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
FIELDS = st.sampled_from(
    ["tenant", "api", "key", "cost", "wait", "runtime_estimate", "priority", "holder",
     "outcome", "status_code", "retry_after", "runtime", "limit", "amount", "window"]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.dictionaries(
        FIELDS, JSON_VALUES | st.sampled_from(["ok", "t", "a.b", 1, 0.5]), max_size=6
    ),
    path=st.sampled_from(["/acquire", "/lease-1/release"]),
    cut=st.integers(min_value=0, max_value=3),
)
async def test_generated_bodies_get_fastapis_own_answer(
    body: dict[str, Any], path: str, cut: int
) -> None:
    content = json.dumps(body).encode()
    if cut:  # now and then a body that is not JSON any more
        content = content[: -cut * 2]
    fast, plain = await _both(path, content, "application/json")
    assert fast == plain


def test_the_lease_routes_take_the_fast_path_and_renew_does_not() -> None:
    app = create_app(Settings())
    planned = {
        route.path: _plan(route) is not None
        for route in lease_router.routes
        if isinstance(route, JSONBodyRoute)
    }
    assert planned == {
        "/v1/leases": True,
        "/v1/leases/{lease_id}/release": True,
        "/v1/leases/{lease_id}/renew": False,  # an optional body: FastAPI's handler
    }
    assert app.openapi()["paths"]["/v1/leases"]["post"]["requestBody"]["required"] is True
