"""The application factory: it only wires settings, store, engine, waiting and routers."""

from __future__ import annotations

import contextlib
import gc
import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from .auth import Authorizer
from .engine import Engine
from .errors import BackendUnavailable
from .gateway import PREFIX as GATEWAY_PREFIX
from .gateway import Gateway, Upstream
from .handlers import EXCEPTION_HANDLERS
from .index import FleetIndex
from .logs import RequestId
from .metrics import MeteredEngine, Tenants, Unmetered, configure, process_exited
from .middleware import BodyLimit
from .policy import PolicySet, load_policies
from .routers import gateway, health, learned, leases, metrics, ui, usage
from .routers import policies as policy_routes
from .settings import Settings, get_settings
from .store import StoreClient, check_credentials, connect
from .waiting import FleetLines

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
        engine = (MeteredEngine if settings.metrics else Engine)(
            client,
            effective,
            recovery_share=settings.recovery_share,
            loss_on_start=settings.recover_on_start,
            timeout=settings.request_timeout,
            learned_ttl_ms=math.ceil(settings.learned_ttl * 1000),
        )
        app.state.engine = engine
        app.state.waiting = lines = FleetLines(engine)
        # The gateway's clients for upstream calls, closed after its releases are sent.
        app.state.gateway = Gateway(
            settings,
            engine,
            app.state.waiting,
            app.state.authorizer,
            Upstream.from_settings(settings),
        )
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
            await engine.check_store()  # the store's ids, to tell a failover later
        try:
            yield
        finally:
            await app.state.gateway.aclose()
            await lines.aclose()
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
    # Gateway bodies stream upstream, so the API's body limit does not apply to them.
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, exempt=(GATEWAY_PREFIX,))
    app.add_middleware(gateway.GatewayFirst)
    app.add_middleware(RequestId)
    # The gateway first: its calls are the most frequent, and a mount fails fast elsewhere.
    routers = (gateway, leases, usage, learned, policy_routes, health, metrics, ui)
    for module in routers:
        app.include_router(module.router)
    return app


def app_from_environment() -> FastAPI:
    """The service as `QUOTAGATE_*` settings describe it: the factory each worker process
    of `quotagate serve --workers N` calls (uvicorn's `factory=True`)."""
    app = create_app(get_settings())
    # What start-up allocated lives as long as the process: frozen, the collector's full
    # passes no longer walk it, and a busy gateway makes those passes frequent.
    gc.collect()
    gc.freeze()
    return app


__all__ = ["app_from_environment", "create_app"]
