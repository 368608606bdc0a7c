"""The application factory: it only wires settings, store, engine, waiting and routers."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from .auth import Authorizer
from .engine import Engine
from .errors import BackendUnavailable
from .handlers import EXCEPTION_HANDLERS
from .index import FleetIndex
from .logs import RequestId
from .metrics import MeteredEngine, Tenants, Unmetered, configure, process_exited
from .middleware import BodyLimit
from .policy import PolicySet, load_policies
from .routers import health, leases, metrics, ui, usage
from .routers import policies as policy_routes
from .settings import Settings, get_settings
from .store import connect
from .waiting import LocalLines

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def create_app(
    settings: Settings | None = None,
    *,
    policies: PolicySet | None = None,
    redis: Redis | None = None,
) -> FastAPI:
    """The service. Without `redis`, it connects to `settings.redis_url` at start-up (and
    closes that client at shutdown); without `policies`, it loads `settings.policies` on
    top of the built-in catalog."""
    settings = settings or get_settings()
    effective = policies or load_policies(settings.policies)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = redis or connect(
            settings.redis_url or DEFAULT_REDIS_URL, timeout=settings.request_timeout
        )
        engine = (MeteredEngine if settings.metrics else Engine)(
            client,
            effective,
            recovery_share=settings.recovery_share,
            loss_on_start=settings.recover_on_start,
            timeout=settings.request_timeout,
        )
        app.state.engine = engine
        app.state.waiting = lines = LocalLines(engine)
        # Observability, beside the decisions: the fleet index's background writer.
        app.state.index = index = FleetIndex(
            client,
            ttl=settings.index_ttl,
            max_entries=settings.index_max,
            lease_ttl_ms=max(
                [p.lease_ttl_ms for p in effective.apis.values()]
                + [p.lease_ttl_ms for _, apis in effective.tenants for p in apis.values()],
                default=0,
            ),
            waiting=lines.lines,
        )
        index.start()
        with contextlib.suppress(BackendUnavailable):
            await engine.check_epoch()  # else the first acquire does it
        try:
            yield
        finally:
            await index.stop()
            process_exited(os.getpid())
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
    app.state.meter = (
        configure(settings.metrics_tenant_label, settings.metrics_max_tenants)
        if settings.metrics
        else Unmetered(Tenants(False, 0))
    )
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestId)
    routers = (leases, usage, policy_routes, health, metrics, ui)
    for module in routers:
        app.include_router(module.router)
    return app


def app_from_environment() -> FastAPI:
    """The service as `QUOTAGATE_*` settings describe it: the factory each worker process
    of `quotagate serve --workers N` calls (uvicorn's `factory=True`)."""
    return create_app(get_settings())


__all__ = ["app_from_environment", "create_app"]
