"""Two coordinator processes on one Redis never grant more than the limit together."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from quotagate.coordinator.embedded import EmbeddedServer, free_port
from quotagate.coordinator.leases import LeaseRef

from .conftest import _wipe
from .service import wait_ready

pytestmark = [pytest.mark.server, pytest.mark.slow]

# Each worker reads its lease's grant time from Redis before it releases the lease.
POLICY = (
    "apis: {pair: {lease_ttl: 1m, limits: [{calls: 20, per: 1s, granularity: 100ms, margin: 0}]}}"
)


@pytest.fixture
def coordinators(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[list[str]]:
    _wipe(valkey_server.url)
    policy = tmp_path / "pair.yaml"
    policy.write_text(POLICY)
    env = {**os.environ, "QUOTAGATE_REDIS_URL": valkey_server.url}
    ports = [free_port(), free_port()]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "quotagate.coordinator",
                "serve",
                "--port",
                str(port),
                "--policies",
                str(policy),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    try:
        for url, process in zip(urls, processes, strict=True):
            wait_ready(url, 20, alive=lambda p=process: p.poll() is None)
        yield urls
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


def test_two_coordinators_share_one_limit(
    coordinators: list[str], valkey_server: EmbeddedServer
) -> None:
    granted = {url: 0 for url in coordinators}
    grants: list[int] = []  # Redis time of each grant, from the lease's record
    lock = threading.Lock()
    store = redis.Redis.from_url(valkey_server.url)

    def worker(url: str) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            for _ in range(6):
                reply = http.post("/v1/leases", json={"tenant": "t", "api": "pair", "wait": 1.5})
                if reply.status_code == 200:
                    lease_id = reply.json()["lease_id"]
                    ref = LeaseRef.parse(lease_id)
                    assert ref is not None
                    record = store.hget("qg:{t|pair}:s", ref.member)
                    assert record is not None, "a granted lease is missing from the store"
                    with lock:
                        granted[url] += 1
                        grants.append(int(record.split(b":")[0]))
                    done = http.post(f"/v1/leases/{lease_id}/release", json={"outcome": "ok"})
                    assert done.status_code == 200, done.text

    threads = [threading.Thread(target=worker, args=(coordinators[i % 2],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    store.close()
    assert all(granted.values()), granted
    assert len(grants) == sum(granted.values()) > 20
    fullest = max(sum(1 for at in grants if start <= at < start + 1000) for start in grants)
    assert fullest <= 20, fullest
