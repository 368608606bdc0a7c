"""CPU of one gateway call in-process, against an upstream that answers at once.

    python -m tests.perf.gateway_cpu [--calls 3000] [--concurrency 32] [--profile FILE]

The coordinator app (`create_app`, the catalog and a policy that grants every call) runs
in this process on an embedded Valkey; its gateway sends to a loopback server in a
process of its own that answers every request with the same `200 {"value": []}` at once
(the gateway's client, aiohttp, has no in-memory transport), and the requests are ASGI
calls made straight to the app. So what is measured is the gateway's own work (routing,
the lease's two store calls, headers, the relay), its upstream client's and the store
client's, not the tool's socket nor the upstream's CPU. `bare` runs the same calls
through `bare_proxy_app` of `latency.py` (the same client stack) to the same upstream, the
baseline; `bare httpx` through `bare_httpx_app`, the client stack before.

Per mode: CPU milliseconds per call (this process's user + system time over the calls),
with `--concurrency` calls in flight at once. On a shared machine this moves far less
than a rate does, so it is the figure to compare changes by. `--profile FILE` writes a
cProfile of the gateway mode (read it with `python -m pstats FILE`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.settings import Settings

from . import latency

HOST = latency.HOST
PATH = latency.PATH
BODY = json.dumps({"value": []}).encode()


# A loopback upstream: every request (a GET, no body) answered at once, kept alive.
_CANNED = """
import asyncio, os, sys
from tests.perf.harness import watchdog
watchdog(float(sys.argv[1]))
BODY = os.environ["QUOTAGATE_BENCH_BODY"].encode()
ANSWER = (
    b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\n"
    b"content-length: %d\\r\\n\\r\\n%s" % (len(BODY), BODY)
)

class Canned(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""

    def data_received(self, data):
        self.buffer += data
        while (end := self.buffer.find(b"\\r\\n\\r\\n")) >= 0:
            self.buffer = self.buffer[end + 4 :]
            self.transport.write(ANSWER)

async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Canned, "127.0.0.1", int(sys.argv[2]))
    await server.serve_forever()

asyncio.run(main())
"""


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


async def run(
    args: argparse.Namespace, store_url: str, upstream: str, folder: Path
) -> dict[str, float]:
    policy_file = folder / "policies.yaml"
    policy_file.write_text(latency.POLICIES)
    settings = Settings(
        redis_url=store_url,
        policies=policy_file,
        gateway_upstreams={HOST: upstream},
        metrics=not args.no_metrics,
    )
    app = create_app(settings)
    os.environ[latency.PROXY_UPSTREAM] = upstream
    results: dict[str, float] = {}
    bare = latency.bare_proxy_app()
    bare_httpx = latency.bare_httpx_app()
    bares = {"bare": bare, "bare httpx": bare_httpx}
    async with app.router.lifespan_context(app), lifespan(bare), lifespan(bare_httpx):
        gateway_path, bare_path = f"/gateway/{HOST}{PATH}", f"/proxy{PATH}"
        await drive(app, gateway_path, 200, args.concurrency)  # warm-up
        for proxy in bares.values():
            await drive(proxy, bare_path, 200, args.concurrency)
        for _ in range(args.rounds):
            for name, proxy in bares.items():
                results.setdefault(name, 0.0)
                results[name] += await drive(proxy, bare_path, args.calls, args.concurrency)
            if args.profile is not None:
                profile = cProfile.Profile()
                profile.enable()
            results.setdefault("gateway", 0.0)
            results["gateway"] += await drive(app, gateway_path, args.calls, args.concurrency)
            if args.profile is not None:
                profile.disable()
                profile.dump_stats(args.profile)
    return {name: round(total / args.rounds, 4) for name, total in results.items()}


@contextlib.asynccontextmanager
async def lifespan(app: Any) -> AsyncIterator[None]:
    """An ASGI app's lifespan, started and, on leaving, shut down."""
    messages: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await messages.put({"type": "lifespan.startup"})
    running = asyncio.create_task(app({"type": "lifespan"}, messages.get, replies.put))
    await replies.get()
    try:
        yield
    finally:
        await messages.put({"type": "lifespan.shutdown"})
        await replies.get()
        await running


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000, help="calls per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of both modes")
    parser.add_argument("--concurrency", type=int, default=32, help="calls in flight at once")
    parser.add_argument("--no-metrics", action="store_true", help="with the metrics off")
    parser.add_argument("--profile", type=Path, default=None, help="cProfile file (gateway)")
    args = parser.parse_args(argv)
    with ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        store = stack.enter_context(EmbeddedServer())
        upstream = stack.enter_context(
            latency.process(
                _CANNED,
                ["{port}"],
                PATH,
                Path(scratch) / "upstream.log",
                {"QUOTAGATE_BENCH_BODY": BODY.decode()},
            )
        )
        results = asyncio.run(run(args, store.url, upstream, Path(scratch)))
    print(
        f"CPU ms per call, {args.concurrency} in flight: gateway {results['gateway']:.3f}, "
        f"bare proxy {results['bare']:.3f}, bare proxy on httpx {results['bare httpx']:.3f} "
        f"(load average {os.getloadavg()[0]:.2f})"
    )
    return results


if __name__ == "__main__":
    main()
