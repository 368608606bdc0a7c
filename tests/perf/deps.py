"""What FastAPI dependencies cost a route, against reading `request.app.state` directly.

    python -m tests.perf.deps [--calls 20000] [--rounds 5]

Three routes of one app do the same work as the acquire route's plumbing: find the
waiting component and the settings, and check the bearer token. One gets them as three
`async def` dependencies, one as a single dependency, one reads them itself. Each call is
a whole ASGI request driven in-process (no socket), so the difference is the dependency
machinery alone; rounds alternate which route goes first.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from quotagate.coordinator.auth import Authorizer
from quotagate.coordinator.deps import PrincipalDep, SettingsDep, WaitingDep
from quotagate.coordinator.settings import Settings


async def _context(request: Request) -> tuple[Any, Any, Settings]:
    state = request.app.state
    who = state.authorizer.principal(request.headers.get("authorization"))
    return who, state.waiting, state.settings


ContextDep = Annotated[tuple[Any, Any, Settings], Depends(_context)]


def app() -> FastAPI:
    service = FastAPI()
    service.state.settings = Settings()
    service.state.waiting = object()
    service.state.authorizer = Authorizer({})

    @service.post("/deps")
    async def with_deps(who: PrincipalDep, waiting: WaitingDep, settings: SettingsDep) -> Any:
        return JSONResponse({"ok": settings.max_wait})

    @service.post("/one")
    async def one_dep(context: ContextDep) -> Any:
        return JSONResponse({"ok": context[2].max_wait})

    @service.post("/direct")
    async def direct(request: Request) -> Any:
        state = request.app.state
        state.authorizer.principal(request.headers.get("authorization"))
        settings: Settings = state.settings
        return JSONResponse({"ok": settings.max_wait})

    return service


PATHS = ("/deps", "/one", "/direct")


async def _call(asgi: FastAPI, path: str) -> None:
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
        "app": asgi,
    }
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        pass

    await asyncio.wait_for(asgi(scope, receive, send), 5)  # type: ignore[arg-type]


async def _measure(calls: int, rounds: int) -> dict[str, list[float]]:
    asgi = app()
    async with asgi.router.lifespan_context(asgi):
        for path in PATHS:  # warm up
            for _ in range(500):
                await _call(asgi, path)
        per_call: dict[str, list[float]] = {path: [] for path in PATHS}
        for r in range(rounds):
            order = PATHS[r % 3 :] + PATHS[: r % 3]
            for path in order:
                started = time.perf_counter()
                for _ in range(calls):
                    await _call(asgi, path)
                per_call[path].append((time.perf_counter() - started) / calls * 1e6)
    return per_call


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    per_call = asyncio.run(_measure(args.calls, args.rounds))
    deps, one, direct = (statistics.median(per_call[p]) for p in PATHS)
    result = {
        "three_deps_us": deps,
        "one_dep_us": one,
        "direct_us": direct,
        "three_added_us": deps - direct,
        "one_added_us": one - direct,
        "rounds": per_call,
    }
    print(json.dumps({k: round(v, 1) for k, v in result.items() if k != "rounds"}))
    return result


if __name__ == "__main__":
    main()
