"""What a route needs, as FastAPI dependencies: `async def`, so none goes to the thread
pool. The app factory puts the objects on `app.state`; tests can override any of these."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from .auth import Authorizer, Principal
from .engine import Engine
from .policy import PolicySet
from .settings import Settings
from .waiting import Waiting


async def settings(request: Request) -> Settings:
    found: Settings = request.app.state.settings
    return found


async def engine(request: Request) -> Engine:
    found: Engine = request.app.state.engine
    return found


async def waiting(request: Request) -> Waiting:
    found: Waiting = request.app.state.waiting
    return found


async def policies(request: Request) -> PolicySet:
    found: PolicySet = request.app.state.policies
    return found


async def principal(request: Request) -> Principal:
    """Who is asking, from the bearer token; raises Unauthorized."""
    authorizer: Authorizer = request.app.state.authorizer
    return authorizer.principal(request.headers.get("authorization"))


SettingsDep = Annotated[Settings, Depends(settings)]
EngineDep = Annotated[Engine, Depends(engine)]
WaitingDep = Annotated[Waiting, Depends(waiting)]
PoliciesDep = Annotated[PolicySet, Depends(policies)]
PrincipalDep = Annotated[Principal, Depends(principal)]
