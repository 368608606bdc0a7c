"""Latency of one call: straight to the upstream, and the same call through the transports.

    python -m tests.perf.latency [--calls 2000] [--before TREE] [--json FILE]

One caller makes the same GET to the Defender emulator (`tests/emulator.py`, no added
latency, limits out of reach) in each mode, one call per mode in turn (round robin), so
whatever drifts on the machine hits every mode alike:

- `direct`: an `httpx.Client` straight to the emulator;
- `QuotaTransport`: an `httpx.Client` over `QuotaTransport`, leasing from the coordinator;
- `AsyncQuotaTransport`: an `httpx.AsyncClient` over `AsyncQuotaTransport`;
- `gateway`: a plain `httpx.Client` (no quotagate code) through the coordinator's gateway,
  `/gateway/api.security.microsoft.com/api/incidents`, sent on to the emulator by
  `QUOTAGATE_GATEWAY_UPSTREAMS`. At this rate (and under `wrk`) its scope is busy, so its
  calls go in blocks (`coordinator/blocks.py`); `QUOTAGATE_GATEWAY_BLOCKS=false` in the
  environment measures a lease per call;
- `bare proxy`: the same through `bare_proxy_app`, a minimal pass-through proxy on the same
  stack (uvicorn's auto stack, the gateway's upstream client stack: one shared aiohttp
  session, bodies streamed), without a lease: what any proxy hop costs. Under `wrk` only,
  `bare proxy, gateway's session`: the same proxy on a session made as the gateway makes
  its own (`Upstream.from_settings`), so the lease's own cost shows apart from how the
  connections are kept;
- `bare proxy (httpx)`: the same proxy on one `httpx.AsyncClient` (`bare_httpx_app`), the
  gateway's upstream client before aiohttp.

With `--before TREE` (a checkout of an older commit), that tree's client runs the same two
transports as two more modes, against a second coordinator on uvicorn's plain stack (h11,
asyncio's own loop): how it was before the client released in the background and the
server extra brought uvloop and httptools.

The coordinators run as processes of their own on one embedded Valkey: `quotagate serve`
(uvicorn's `loop="auto"` and `http="auto"` pick uvloop and httptools when they are
installed; the figures name what was picked), and for `--before` uvicorn on h11. The
policy grants every call and counts both windows, as the catalog's incidents limits do.
Sync calls run in a worker thread so the event loop, idle meanwhile, can send the async
client's releases, as the sync client's own thread sends its releases.

Per mode: p50 and p99 of the whole call as the caller sees it; per transport mode its p50
over the direct p50 and its p99 minus the direct p99 (ms). Then, with `wrk` installed,
throughput: `wrk` (one thread, `--connections`) drives the bare proxy, the gateway, the
bare proxy on the gateway's session and the one on httpx in turn, `--throughput-rounds` times each,
`--throughput-seconds` each; the ratio compares their mean requests per second. Results
go to `--json` (default `tests/perf/results/latency.json`) and the tables to standard
output.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yarl

import quotagate.client as current_client
from quotagate.coordinator.embedded import EmbeddedServer, free_port
from quotagate.coordinator.gateway import Upstream
from quotagate.coordinator.settings import Settings

from ..emulator import MINUTE, DefenderEmulator, Endpoint, Limit
from .harness import percentile

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JSON = Path(__file__).parent / "results" / "latency.json"
PATH = "/api/incidents"
TENANT = "bench-latency"
WARMUP = 50  # calls per mode before the measured ones: connections, caches
LIFETIME = 600.0  # seconds a child process lives at most
DIRECT, ADIRECT = "direct", "direct (async)"
UPSTREAM_MS = "QUOTAGATE_BENCH_UPSTREAM_MS"  # the emulator's answer time, for its process
BEFORE = " (before)"
GATEWAY, BARE, BARE_POOLS = "gateway", "bare proxy", "bare proxy, gateway's session"
BARE_HTTPX = "bare proxy (httpx)"
HOST = "api.security.microsoft.com"
PROXY_UPSTREAM = "QUOTAGATE_BENCH_PROXY_UPSTREAM"  # where the bare proxy sends requests
PIDS: dict[str, int] = {}  # server URL -> its process, for the CPU each request costs

# The catalog's two incidents windows, out of reach, so every call is granted and counted.
POLICIES = """\
apis:
  m365d.incidents:
    limits:
      - {calls: 1000000000, per: 1m}
      - {calls: 1000000000, per: 1h}
"""


def emulator_app() -> Any:
    """The emulator with the incidents endpoint only, limits out of reach, answering
    after `UPSTREAM_MS` (from the environment)."""
    endpoint = Endpoint(
        "incidents", r"/api/incidents(/[^/]+)?", frozenset({"GET"}), (Limit(1e9, MINUTE),)
    )
    latency = float(os.environ.get(UPSTREAM_MS, "0")) / 1000
    return DefenderEmulator(endpoints=(endpoint,), latency=latency).app


_HOP = {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
_SKIPPED = _HOP | {b"host", b"content-length"}


def _proxied(scope: dict[str, Any], receive: Any) -> tuple[str, list[tuple[bytes, bytes]], Any]:
    """The bare proxies' request: URL, headers (hop-by-hop dropped), streamed body."""

    async def body() -> Any:
        while True:
            message = await receive()
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body"):
                return

    headers = [(k, v) for k, v in scope["headers"] if k not in _SKIPPED]
    sized = dict(scope["headers"]).get(b"content-length")
    if sized is not None:
        headers.append((b"content-length", sized))
    url = os.environ[PROXY_UPSTREAM] + scope["raw_path"].decode().removeprefix("/proxy")
    if scope["query_string"]:
        url += "?" + scope["query_string"].decode()
    return url, headers, body() if sized not in (None, b"0") else None


async def _lifespan(receive: Any, send: Any, close: Callable[[], Awaitable[None]]) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await close()
    await send({"type": "lifespan.shutdown.complete"})


def bare_proxy_app(
    session: Callable[[], aiohttp.ClientSession] | None = None, pools: bool = False
) -> Any:
    """A minimal pass-through proxy: `/proxy/{path}` to `PROXY_UPSTREAM` + `/{path}`, on
    the gateway's client stack (`Upstream`: one aiohttp session, made by `session`, else a
    default one), bodies streamed and hop-by-hop headers dropped, no lease: the baseline
    of the gateway's throughput. With `pools`, the session is the gateway's own
    (`upstream_session` with the default settings)."""
    if pools:
        shared = Upstream.from_settings(Settings(gateway_upstreams={}))
    else:
        shared = Upstream(session or (lambda: aiohttp.ClientSession(auto_decompress=False)))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, shared.aclose)
            return
        url, headers, body = _proxied(scope, receive)
        sent = [(k.decode(), v.decode()) for k, v in headers]
        response = await shared.send(scope["method"], yarl.URL(url, encoded=True), sent, body)
        try:
            out = [(k, v) for k, v in response.raw_headers if k.lower() not in _HOP]
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            response.release()

    return app


def bare_pools_app() -> Any:
    """The bare proxy on the gateway's upstream session (uvicorn's factory)."""
    return bare_proxy_app(pools=True)


def bare_httpx_app(client: httpx.AsyncClient | None = None) -> Any:
    """The same bare proxy on one `httpx.AsyncClient` (`client`, else one with httpx's
    default limits): the gateway's upstream client stack before aiohttp."""
    shared = client or httpx.AsyncClient(follow_redirects=False)

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, shared.aclose)
            return
        url, headers, body = _proxied(scope, receive)
        request = shared.build_request(scope["method"], url, headers=headers, content=body)
        response = await shared.send(request, stream=True)
        try:
            out = [(k, v) for k, v in response.headers.raw if k.lower() not in _HOP]
            await send(
                {"type": "http.response.start", "status": response.status_code, "headers": out}
            )
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await response.aclose()

    return app


# -- the coordinators ----------------------------------------------------------------------

# Each child exits by itself when its parent is gone (see harness.watchdog).
_SERVE = """
import sys
from tests.perf.harness import watchdog
watchdog(float(sys.argv[1]))
sys.argv = ["quotagate", *sys.argv[2:]]
from quotagate.coordinator.cli import main
main()
"""
_UVICORN = """
import sys
from tests.perf.harness import watchdog
watchdog(float(sys.argv[1]))
import uvicorn
factory, port, loop, http = sys.argv[2:]
uvicorn.run(
    factory, factory=True, host="127.0.0.1", port=int(port), loop=loop, http=http,
    log_level="warning", access_log=False,
)
"""
PLAIN = ("asyncio", "h11")  # uvicorn's stack without uvloop and httptools
AUTO = ("auto", "auto")


def uvicorn_args(factory: str, stack: tuple[str, str]) -> list[str]:
    return [factory, "{port}", *stack]


@contextmanager
def process(
    script: str, args: list[str], ready: str, log: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """A server process on a free port (`{port}` in `args`); yields its URL once `ready`
    (a path) answers 200."""
    port = free_port()
    argv = [sys.executable, "-c", script, str(LIFETIME), *(a.format(port=port) for a in args)]
    with log.open("wb") as out:
        child = subprocess.Popen(
            argv, cwd=ROOT, env=os.environ | (env or {}), stdout=out, stderr=subprocess.STDOUT
        )
    url = f"http://127.0.0.1:{port}"
    PIDS[url] = child.pid
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(url + ready, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} did not start: see {log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield url
    finally:
        child.terminate()
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def server_stack() -> dict[str, str]:
    """What uvicorn's `auto` choices resolve to in this environment (the one `quotagate
    serve` runs in)."""
    from uvicorn.loops.auto import auto_loop_factory
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    loop = auto_loop_factory()()
    try:
        loop_name = f"{type(loop).__module__}.{type(loop).__name__}"
    finally:
        loop.close()
    return {"loop": loop_name, "http": AutoHTTPProtocol.__name__}


# -- the clients ---------------------------------------------------------------------------


def load_client(tree: Path) -> types.ModuleType:
    """The `client/` package of another checkout, imported under a name of its own."""
    parent = types.ModuleType("quotagate_before")
    parent.__path__ = []
    sys.modules[parent.__name__] = parent
    folder = tree / "client"
    spec = importlib.util.spec_from_file_location(
        "quotagate_before.client", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise SystemExit(f"no client package in {tree}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def checkout_name(tree: Path) -> str:
    """The commit a checkout is at (a folder's name says nothing about the machine)."""
    try:
        found = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return tree.name
    return found.stdout.strip()


def routes(client: types.ModuleType) -> Any:
    """The client's Defender routes, moved to the emulator on loopback."""
    moved = [replace(r, hosts={"127.0.0.1"}) for r in client.DEFENDER_ROUTES if r.hosts]
    return client.RouteTable(moved, defaults=())


Call = Callable[[], Awaitable[float]]  # one timed call: its latency in seconds


def sync_mode(http: httpx.Client, url: str, quota: Any, settle: bool) -> Call:
    def timed() -> float:
        start = time.perf_counter()
        response = http.get(url)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        if settle and hasattr(quota, "flush"):
            quota.flush()  # outside the timing: this call's release is out
        return elapsed

    async def call() -> float:
        return await asyncio.to_thread(timed)

    return call


def async_mode(http: httpx.AsyncClient, url: str, quota: Any, settle: bool) -> Call:
    async def call() -> float:
        start = time.perf_counter()
        response = await http.get(url)
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        if settle and hasattr(quota, "flush"):
            await quota.flush()
        return elapsed

    return call


Closer = Callable[[], Awaitable[None]]


def _modes(
    emulator_url: str,
    urls: dict[str, str],
    before: types.ModuleType | None,
    settle: bool,
    proxy_url: str | None = None,
    httpx_proxy_url: str | None = None,
) -> dict[str, tuple[Call, Closer]]:
    """Each mode's timed call and what closes it. Every transport mode is compared with
    the direct call of its own kind (sync or async)."""
    target = emulator_url + PATH
    headers = {"Authorization": "Bearer contoso-app1"}
    modes: dict[str, tuple[Call, Closer]] = {}

    def add_sync(name: str, transport: httpx.BaseTransport | None, quota: Any = None) -> None:
        http = httpx.Client(transport=transport, headers=headers)

        async def close() -> None:
            http.close()
            if quota is not None:
                quota.close()

        modes[name] = (sync_mode(http, target, quota, settle), close)

    def add_async(name: str, transport: httpx.AsyncBaseTransport | None, quota: Any = None) -> None:
        http = httpx.AsyncClient(transport=transport, headers=headers)

        async def close() -> None:
            await http.aclose()
            if quota is not None:
                await quota.aclose()

        modes[name] = (async_mode(http, target, quota, settle), close)

    add_sync(DIRECT, None)
    add_async(ADIRECT, None)
    plain = ((GATEWAY, f"{urls['after']}/gateway/{HOST}"), (BARE, proxy_url))
    for name, url in (*plain, (BARE_HTTPX, httpx_proxy_url)):
        if url is None:
            continue
        http = httpx.Client(headers={**headers, "X-Quotagate-Tenant": TENANT})

        async def close_plain(http: httpx.Client = http) -> None:
            http.close()

        modes[name] = (sync_mode(http, url + PATH, None, settle), close_plain)
    clients = [("", current_client, urls["after"])]
    if before is not None:
        clients.append((BEFORE, before, urls["before"]))
    for suffix, client, url in clients:
        table = routes(client)
        quota = client.QuotaClient(url, TENANT)
        add_sync("QuotaTransport" + suffix, client.QuotaTransport(quota, table), quota)
        aquota = client.AsyncQuotaClient(url, TENANT)
        add_async("AsyncQuotaTransport" + suffix, client.AsyncQuotaTransport(aquota, table), aquota)
    return modes


async def measure(
    emulator_url: str,
    urls: dict[str, str],
    before: types.ModuleType | None,
    calls: int,
    settle: bool,
    proxy_url: str | None = None,
    httpx_proxy_url: str | None = None,
) -> dict[str, list[float]]:
    modes = _modes(emulator_url, urls, before, settle, proxy_url, httpx_proxy_url)
    timings: dict[str, list[float]] = {name: [] for name in modes}
    try:
        for round_ in range(WARMUP + calls):
            for name, (call, _) in modes.items():
                elapsed = await call()
                if round_ >= WARMUP:
                    timings[name].append(elapsed)
    finally:
        for _, close in modes.values():
            await close()
    return timings


_WRK_HEADERS = f"""
wrk.headers["Authorization"] = "Bearer contoso-app1"
wrk.headers["X-Quotagate-Tenant"] = "{TENANT}"
"""


def wrk(url: str, seconds: float, connections: int) -> float:
    """Requests per second that `wrk` (one thread) gets from `url`; fails on any non-2xx."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_HEADERS)
        script.flush()
        done = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(round(seconds), 1)}s",
                "-s",
                script.name,
                url,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    if "Non-2xx" in done.stdout:
        raise RuntimeError(f"{url} answered errors under load:\n{done.stdout}")
    found = re.search(r"Requests/sec:\s+([\d.]+)", done.stdout)
    if found is None:
        raise RuntimeError(f"no rate in wrk's output:\n{done.stdout}")
    return float(found.group(1))


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used so far (Linux `/proc`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(
    gateway: str,
    proxy: str,
    pools_proxy: str,
    httpx_proxy: str,
    seconds: float,
    connections: int,
    rounds: int,
    processes: dict[str, int],
) -> dict[str, Any]:
    """Bare proxy, gateway, the bare proxy on the gateway's session and the bare proxy on
    httpx in turn, `rounds` times each, after a warm-up of each; the ratio is that of the
    mean rates of gateway and bare proxy (each round's ratio is kept too: the machine
    drifts), `pools_ratio` the same against the bare proxy on the gateway's session,
    `httpx_ratio` against the bare proxy on httpx. Beside them, the CPU
    milliseconds each request cost in each of `processes` (name -> pid): on a shared
    machine the rate moves with the load, the CPU per request less."""
    targets = {BARE: proxy, GATEWAY: gateway, BARE_POOLS: pools_proxy, BARE_HTTPX: httpx_proxy}
    for url in targets.values():
        wrk(url + PATH, 2, connections)
    rates: dict[str, list[float]] = {name: [] for name in targets}
    cpu: dict[str, dict[str, float]] = {name: dict.fromkeys(processes, 0.0) for name in targets}
    done: dict[str, float] = dict.fromkeys(targets, 0.0)
    for _ in range(rounds):
        for name, url in targets.items():
            before = {p: cpu_seconds(pid) for p, pid in processes.items()}
            rate = wrk(url + PATH, seconds, connections)
            for p, pid in processes.items():
                cpu[name][p] += cpu_seconds(pid) - before[p]
            rates[name].append(rate)
            done[name] += rate * max(round(seconds), 1)
    mean = {name: sum(values) / len(values) for name, values in rates.items()}
    per_request = {
        name: {p: round(1000 * used / done[name], 3) for p, used in cpu[name].items()}
        for name in targets
    }
    return {
        "connections": connections,
        "seconds": seconds,
        "rates": rates,
        "round_ratios": [g / b for g, b in zip(rates[GATEWAY], rates[BARE], strict=True)],
        "ratio": mean[GATEWAY] / mean[BARE],
        "pools_ratio": mean[GATEWAY] / mean[BARE_POOLS],
        "httpx_ratio": mean[GATEWAY] / mean[BARE_HTTPX],
        "cpu_ms_per_request": per_request,
    }


# -- figures -------------------------------------------------------------------------------


def summarise(timings: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for name, values in timings.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        row = {"p50_ms": p50 * 1000, "p99_ms": p99 * 1000}
        if name not in (DIRECT, ADIRECT):
            direct = timings[ADIRECT if name.startswith("Async") else DIRECT]
            row["p50_ratio"] = p50 / percentile(direct, 50)
            row["p50_added_ms"] = (p50 - percentile(direct, 50)) * 1000
            row["p99_added_ms"] = (p99 - percentile(direct, 99)) * 1000
        rows[name] = row
    return rows


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = [
        "| mode | p50 (ms) | p99 (ms) | p50 / direct p50 | p50 added (ms) | p99 added (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        ratio = f"{row['p50_ratio']:.2f}x" if "p50_ratio" in row else ""
        added50 = f"{row['p50_added_ms']:.2f}" if "p50_added_ms" in row else ""
        added99 = f"{row['p99_added_ms']:.2f}" if "p99_added_ms" in row else ""
        lines.append(
            f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {ratio} | {added50} "
            f"| {added99} |"
        )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per mode")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    parser.add_argument(
        "--before", type=Path, default=None, help="a checkout whose client to measure too"
    )
    parser.add_argument(
        "--upstream-ms",
        type=float,
        default=1.0,
        help="milliseconds the emulator takes to answer (default 1)",
    )
    parser.add_argument(
        "--overlap",
        action="store_true",
        help="send the next call while the last one's release may still be going out "
        "(default: each call is timed alone, its predecessors' releases sent)",
    )
    parser.add_argument(
        "--fast-upstream",
        action="store_true",
        help="serve the emulator on uvicorn's auto stack too (default: asyncio + h11)",
    )
    parser.add_argument(
        "--throughput-seconds",
        type=float,
        default=5.0,
        help="seconds of each wrk run against the bare proxy and the gateway (0: none)",
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk's connections")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="wrk runs per proxy")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error("--calls must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    before = load_client(args.before.resolve()) if args.before is not None else None
    upstream_stack = AUTO if args.fast_upstream else PLAIN
    load = os.getloadavg()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        policy_file = folder / "policies.yaml"
        policy_file.write_text(POLICIES)
        store = stack.enter_context(EmbeddedServer())
        env = {"QUOTAGATE_REDIS_URL": store.url, "QUOTAGATE_POLICIES": str(policy_file)}
        emulator = uvicorn_args("tests.perf.latency:emulator_app", upstream_stack)
        upstream_env = {UPSTREAM_MS: str(args.upstream_ms)}
        emulator_url = stack.enter_context(
            process(_UVICORN, emulator, "/_emulator/health", folder / "emulator.log", upstream_env)
        )
        serve = ["serve", "--port", "{port}", "--redis-url", store.url, "--policies"]
        gateway_env = {"QUOTAGATE_GATEWAY_UPSTREAMS": json.dumps({HOST: emulator_url})}
        urls = {
            "after": stack.enter_context(
                process(
                    _SERVE,
                    [*serve, str(policy_file)],
                    "/readyz",
                    folder / "after.log",
                    gateway_env,
                )
            )
        }
        proxy_url = (
            stack.enter_context(
                process(
                    _UVICORN,
                    uvicorn_args("tests.perf.latency:bare_proxy_app", AUTO),
                    "/proxy/_emulator/health",
                    folder / "proxy.log",
                    {PROXY_UPSTREAM: emulator_url},
                )
            )
            + "/proxy"
        )
        pools_url = (
            stack.enter_context(
                process(
                    _UVICORN,
                    uvicorn_args("tests.perf.latency:bare_pools_app", AUTO),
                    "/proxy/_emulator/health",
                    folder / "pools.log",
                    {PROXY_UPSTREAM: emulator_url},
                )
            )
            + "/proxy"
        )
        httpx_url = (
            stack.enter_context(
                process(
                    _UVICORN,
                    uvicorn_args("tests.perf.latency:bare_httpx_app", AUTO),
                    "/proxy/_emulator/health",
                    folder / "httpx-proxy.log",
                    {PROXY_UPSTREAM: emulator_url},
                )
            )
            + "/proxy"
        )
        if before is not None:
            plain = uvicorn_args("quotagate.coordinator.app:app_from_environment", PLAIN)
            urls["before"] = stack.enter_context(
                process(_UVICORN, plain, "/readyz", folder / "before.log", env)
            )
        started = time.monotonic()
        timings = asyncio.run(
            measure(emulator_url, urls, before, args.calls, not args.overlap, proxy_url, httpx_url)
        )
        seconds = time.monotonic() - started
        rates = None
        if args.throughput_seconds > 0 and shutil.which("wrk") is not None:
            gateway = f"{urls['after']}/gateway/{HOST}"
            processes = {
                "coordinator": PIDS[urls["after"]],
                "bare proxy": PIDS[proxy_url.removesuffix("/proxy")],
                "pools proxy": PIDS[pools_url.removesuffix("/proxy")],
                "httpx proxy": PIDS[httpx_url.removesuffix("/proxy")],
                "emulator": PIDS[emulator_url],
                "redis": store.process.pid,
            }
            rates = throughput(
                gateway,
                proxy_url,
                pools_url,
                httpx_url,
                args.throughput_seconds,
                args.connections,
                args.throughput_rounds,
                processes,
            )
    rows = summarise(timings)
    results: dict[str, Any] = {
        "calls": args.calls,
        "seconds": round(seconds, 1),
        "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
        "coordinator_stack": server_stack(),
        "upstream_stack": "auto" if args.fast_upstream else "asyncio + h11",
        "upstream_ms": args.upstream_ms,
        "overlap": args.overlap,
        "before": checkout_name(args.before) if args.before is not None else None,
        "modes": rows,
        "throughput": rates,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(table(rows))
    if rates is not None:
        print(
            f"throughput ({rates['connections']} connections): bare proxy "
            f"{', '.join(f'{r:,.0f}' for r in rates['rates'][BARE])} requests/s, gateway "
            f"{', '.join(f'{r:,.0f}' for r in rates['rates'][GATEWAY])}, bare proxy on "
            f"the gateway's session "
            f"{', '.join(f'{r:,.0f}' for r in rates['rates'][BARE_POOLS])}, bare proxy on "
            f"httpx {', '.join(f'{r:,.0f}' for r in rates['rates'][BARE_HTTPX])}; "
            f"ratio {rates['ratio']:.2f} (target >= 0.7; per round "
            f"{', '.join(f'{r:.2f}' for r in rates['round_ratios'])}), against the bare "
            f"proxy on the gateway's session {rates['pools_ratio']:.2f}, on httpx "
            f"{rates['httpx_ratio']:.2f}"
        )
        for name, used in rates["cpu_ms_per_request"].items():
            shown = ", ".join(f"{p} {ms:.3f}" for p, ms in used.items())
            print(f"CPU ms per request through the {name}: {shown}")
    print(
        f"{args.calls} calls per mode in {seconds:.1f} s; load average "
        f"{results['load_before'][0]} before, {results['load_after'][0]} after; "
        f"coordinator on {results['coordinator_stack']}"
    )
    return results


if __name__ == "__main__":
    main()
