"""CPU of one gateway call in-process, with the upstream in memory (no sockets).

    python -m tests.perf.gateway_cpu [--calls 3000] [--concurrency 32] [--profile FILE]

The coordinator app (`create_app`, the catalog and a policy that grants every call) runs
in this process on an embedded Valkey; its gateway's upstream client is an
`httpx.AsyncClient` over an in-memory transport that answers `200 {"value": []}` at once,
and the requests are ASGI calls made straight to the app. So what is measured is the
gateway's own work (routing, the lease's two store calls, headers, the relay) and the
store client's, not the sockets of a tool or an upstream. `bare` runs the same calls
through `bare_proxy_app` of `latency.py` on the same in-memory upstream, the baseline.

Per mode: CPU milliseconds per call (this process's user + system time over the calls),
with `--concurrency` calls in flight at once. On a shared machine this moves far less
than a rate does, so it is the figure to compare changes by. `--profile FILE` writes a
cProfile of the gateway mode (read it with `python -m pstats FILE`).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.gateway import Upstream
from quotagate.coordinator.settings import Settings

from . import latency

HOST = latency.HOST
PATH = latency.PATH
UPSTREAM = "http://upstream.invalid"
BODY = json.dumps({"value": []}).encode()


class InMemory(httpx.AsyncBaseTransport):
    """An upstream that answers every request at once with the same small JSON body."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        headers = [(b"content-type", b"application/json"), (b"content-length", b"13")]
        return httpx.Response(200, headers=headers, stream=httpx.ByteStream(BODY))


def scope(path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
    }


async def call(app: Any, path: str, headers: list[tuple[bytes, bytes]]) -> int:
    status = 0
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the client stays
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope(path, headers), receive, send)
    return status


async def drive(app: Any, path: str, calls: int, concurrency: int) -> float:
    """CPU ms per call for `calls` calls, `concurrency` at a time."""
    headers = [
        (b"host", b"127.0.0.1:8080"),
        (b"accept", b"*/*"),
        (b"authorization", b"Bearer contoso-app1"),
        (b"x-quotagate-tenant", latency.TENANT.encode()),
    ]
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            status = await call(app, path, headers)
            if status != 200:
                raise RuntimeError(f"{path} answered {status}")

    started = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return 1000 * (time.process_time() - started) / calls


async def run(args: argparse.Namespace, store_url: str, folder: Path) -> dict[str, float]:
    policy_file = folder / "policies.yaml"
    policy_file.write_text(latency.POLICIES)
    settings = Settings(
        redis_url=store_url,
        policies=policy_file,
        gateway_upstreams={HOST: UPSTREAM},
        metrics=not args.no_metrics,
    )
    app = create_app(settings)
    os.environ[latency.PROXY_UPSTREAM] = UPSTREAM
    results: dict[str, float] = {}
    async with app.router.lifespan_context(app):
        gateway = app.state.gateway
        await gateway.upstream.aclose()
        gateway.upstream = Upstream([httpx.AsyncClient(transport=InMemory())])
        bare = latency.bare_proxy_app(httpx.AsyncClient(transport=InMemory()))
        gateway_path, bare_path = f"/gateway/{HOST}{PATH}", f"/proxy{PATH}"
        await drive(app, gateway_path, 200, args.concurrency)  # warm-up
        await drive(bare, bare_path, 200, args.concurrency)
        for _ in range(args.rounds):
            results.setdefault("bare", 0.0)
            results["bare"] += await drive(bare, bare_path, args.calls, args.concurrency)
            if args.profile is not None:
                profile = cProfile.Profile()
                profile.enable()
            results.setdefault("gateway", 0.0)
            results["gateway"] += await drive(app, gateway_path, args.calls, args.concurrency)
            if args.profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
    return {name: round(total / args.rounds, 4) for name, total in results.items()}


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both modes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight at once")
    parser.add_argument("--no-metrics", action="store_true", help="with the metrics off")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile file (gateway)")
    args = parser.parse_args(argv)
    with EmbeddedServer() as store, tempfile.TemporaryDirectory() as scratch:
        results = asyncio.run(run(args, store.url, Path(scratch)))
    print(
        f"CPU ms per call, {args.concurrency} in flight: gateway {results['gateway']:.3f}, "
        f"bare proxy {results['bare']:.3f} (load average {os.getloadavg()[0]:.2f})"
    )
    return results


if __name__ == "__main__":
    main()
