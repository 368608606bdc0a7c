"""Service throughput: acquire+release through one uvicorn worker, as a ratio of a bare
FastAPI endpoint that makes a single EVALSHA, both measured in the same run on the same
Redis. Load comes from `wrk` (apt-get install wrk).

    python -m tests.perf.bench_service [--seconds 10] [--connections 32]

The ratio compares HTTP requests per second: each acquire and each release is one request
with one EVALSHA, like one request of the baseline. Runs go baseline, quotagate,
baseline, quotagate, and the ratio uses the mean of each.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request

from quotagate.coordinator.embedded import EmbeddedServer, free_port
from quotagate.coordinator.store import connect

BENCH_POLICY = """
apis:
  bench:
    limits: [{calls: 1000000000, per: 1m}, {calls: 1000000000, per: 1h}]
"""

WRK_LEASES = """
local queue = {}
local json = {["Content-Type"] = "application/json"}
request = function()
  local id = table.remove(queue)
  if id then
    return wrk.format("POST", "/v1/leases/" .. id .. "/release", json, '{"outcome":"ok"}')
  end
  return wrk.format("POST", "/v1/leases", json, '{"tenant":"bench/app","api":"bench"}')
end
response = function(status, headers, body)
  local id = body:match('"lease_id":"([^"]+)"')
  if id then table.insert(queue, id) end
end
"""

WRK_BARE = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"tenant":"bench/app","api":"bench"}'
"""


def bare_app() -> FastAPI:
    """The baseline: parse a JSON body, one EVALSHA, a JSON reply (over the same Redis
    client as the service)."""
    app = FastAPI()
    redis = connect(os.environ["BENCH_REDIS_URL"])
    lua_noop = redis.register_script("return {1, redis.call('TIME')[1]}")

    @app.post("/bare")
    async def bare(request: Request) -> dict[str, object]:
        body = await request.json()
        reply = await lua_noop(keys=[f"bench:{{{body['tenant']}}}"], args=[body["api"]])
        return {"ok": reply[0]}

    return app


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux `/proc`)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def uvicorn_process(target: list[str], env: dict[str, str]) -> Iterator[tuple[str, int]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, *target, "--port", str(port)],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"{target} did not start") from None
                time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(10)


def wrk(url: str, script: str, seconds: int, connections: int) -> tuple[float, int]:
    """Requests per second and the count of non-2xx answers."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as lua:
        lua.write(script)
        lua.flush()
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-s", lua.name, url],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, int(bad.group(1)) if bad else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is needed: apt-get install wrk")
    with tempfile.TemporaryDirectory() as tmp, EmbeddedServer() as redis_server:
        policy = Path(tmp) / "bench.yaml"
        policy.write_text(BENCH_POLICY)
        env = {"BENCH_REDIS_URL": redis_server.url, "QUOTAGATE_REDIS_URL": redis_server.url}
        quotagate_cmd = ["-m", "quotagate.coordinator", "serve", "--policies", str(policy)]
        bare_cmd = ["-m", "uvicorn", "--factory", "tests.perf.bench_service:bare_app",
                    "--log-level", "warning"]  # fmt: skip
        with (
            uvicorn_process(bare_cmd, env) as (bare_url, bare_pid),
            uvicorn_process(quotagate_cmd, env) as (qg, qg_pid),
        ):
            wrk(f"{bare_url}/bare", WRK_BARE, 2, args.connections)  # warm-up
            wrk(qg, WRK_LEASES, 2, args.connections)
            bare_rates, lease_rates, bare_cpu, lease_cpu = [], [], [], []
            for _ in range(2):
                for url, script, pid, rates, cpus in (
                    (f"{bare_url}/bare", WRK_BARE, bare_pid, bare_rates, bare_cpu),
                    (qg, WRK_LEASES, qg_pid, lease_rates, lease_cpu),
                ):
                    before = cpu_seconds(pid)
                    rate, bad = wrk(url, script, args.seconds, args.connections)
                    if bad:
                        sys.exit(f"{bad} non-2xx answers from {url}")
                    rates.append(rate)
                    cpus.append((cpu_seconds(pid) - before) / (rate * args.seconds) * 1e6)
    bare = sum(bare_rates) / len(bare_rates)
    leases = sum(lease_rates) / len(lease_rates)
    print(f"baseline (bare FastAPI + one EVALSHA): {bare:8.0f} requests/s  {bare_rates}")
    print(f"quotagate acquire+release:            {leases:8.0f} requests/s  {lease_rates}")
    print(f"ratio: {leases / bare:.2f}")
    bare_us, lease_us = min(bare_cpu), min(lease_cpu)
    print(
        f"server CPU per request: baseline {bare_us:.0f} us, quotagate {lease_us:.0f} us "
        f"(ratio {bare_us / lease_us:.2f}; rounds {[round(c) for c in bare_cpu]}, "
        f"{[round(c) for c in lease_cpu]})"
    )


if __name__ == "__main__":
    main()
