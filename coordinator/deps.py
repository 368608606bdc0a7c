"""What a route needs. The app factory puts the objects on `app.state`.

Most routes get them as FastAPI dependencies (`async def`, so none goes to the thread
pool; tests can override any of them). The lease routes, which every upstream call
passes twice, read them with `lease_context` instead: three dependencies cost a request
about 15 µs more than reading `app.state`, one about 7 µs (`python -m tests.perf.deps`,
figures in tests/perf/README.md), and a lease is meant to cost about a millisecond.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from .auth import Authorizer, Principal
from .engine import Engine
from .index import FleetIndex
from .metrics import Meter
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


@dataclass(frozen=True, slots=True)
class LeaseContext:
    who: Principal
    engine: Engine
    waiting: Waiting
    settings: Settings
    meter: Meter
    index: FleetIndex


def lease_context(request: Request) -> LeaseContext:
    """Who is asking (raises Unauthorized), and the objects the lease routes use."""
    state = request.app.state
    who = state.authorizer.principal(request.headers.get("authorization"))
    return LeaseContext(who, state.engine, state.waiting, state.settings, state.meter, state.index)


SettingsDep = Annotated[Settings, Depends(settings)]
EngineDep = Annotated[Engine, Depends(engine)]
WaitingDep = Annotated[Waiting, Depends(waiting)]
PoliciesDep = Annotated[PolicySet, Depends(policies)]
PrincipalDep = Annotated[Principal, Depends(principal)]
