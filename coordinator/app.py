"""The application factory: it only wires settings, store, engine, waiting and routers."""

from __future__ import annotations

from fastapi import FastAPI

from .api import create_app
from .settings import get_settings


def app_from_environment() -> FastAPI:
    """The service as `QUOTAGATE_*` settings describe it: the factory each worker process
    of `quotagate serve --workers N` calls (uvicorn's `factory=True`)."""
    return create_app(get_settings())


__all__ = ["app_from_environment", "create_app"]
