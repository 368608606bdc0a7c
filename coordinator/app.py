"""The application factory: it only wires settings, store, engine, waiting and routers."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .auth import Authorizer
from .engine import Engine
from .errors import BackendUnavailable
from .handlers import EXCEPTION_HANDLERS
from .middleware import BodyLimit
from .policy import PolicySet, load_policies
from .routers import health, leases, usage
from .routers import policies as policy_routes
from .settings import Settings, get_settings
from .store import StoreClient, check_credentials, connect
from .waiting import LocalLines

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def create_app(
    settings: Settings | None = None,
    *,
    policies: PolicySet | None = None,
    redis: StoreClient | None = None,
) -> FastAPI:
    """The service. Without `redis`, it connects to `settings.redis_url` at start-up (and
    closes that client at shutdown); without `policies`, it loads `settings.policies` on
    top of the built-in catalog. A malformed store URL (StoreUrlError) or credentials the
    store refuses (StoreRefused) fail the start-up, naming the cause; a store that is
    down is waited for."""
    settings = settings or get_settings()
    effective = policies or load_policies(settings.policies)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis or connect(
            settings.redis_url or DEFAULT_REDIS_URL, timeout=settings.request_timeout
        )
        if redis is None:
            try:
                await check_credentials(client, timeout=settings.request_timeout)
            except BaseException:
                await client.aclose()
                raise
        engine = Engine(
            client,
            effective,
            recovery_share=settings.recovery_share,
            loss_on_start=settings.recover_on_start,
            timeout=settings.request_timeout,
        )
        app.state.engine = engine
        app.state.waiting = LocalLines(engine)
        with contextlib.suppress(BackendUnavailable):
            await engine.check_epoch()  # else the first acquire does it
        try:
            yield
        finally:
            if redis is None:
                await client.aclose()

    app = FastAPI(
        title="quotagate",
        version="1",
        lifespan=lifespan,
        exception_handlers=EXCEPTION_HANDLERS,
    )
    app.state.settings = settings
    app.state.policies = effective
    app.state.authorizer = Authorizer(settings.all_tokens())
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for router in (leases.router, usage.router, policy_routes.router, health.router):
        app.include_router(router)
    return app


def app_from_environment() -> FastAPI:
    """The service as `QUOTAGATE_*` settings describe it: the factory each worker process
    of `quotagate serve --workers N` calls (uvicorn's `factory=True`)."""
    return create_app(get_settings())


__all__ = ["app_from_environment", "create_app"]
