"""Three coordinator processes on one store, workers spread unevenly over them: the one
line per (tenant, api, key) serves the workers in turn, whichever replica each uses."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from quotagate.coordinator.embedded import EmbeddedServer, free_port

from .conftest import _wipe
from .service import wait_ready

pytestmark = [pytest.mark.server, pytest.mark.slow]

# One call at a time, fleet-wide; a lease held far longer than the test, were it not
# released: every grant after the first comes from a release, woken through the store.
POLICY = """
apis:
  one:
    lease_ttl: 1m
    classes: {interactive: {}, batch: {}}
    default_class: batch
    limits: [{concurrent: 1}]
  two:
    classes: {interactive: {}, batch: {share: 0.5}}
    aging: 1s
    limits: [{calls: 10, per: 2s, granularity: 100ms}]
"""
SERVE = (sys.executable, "-m", "quotagate.coordinator", "serve")
SPREAD = (6, 2, 2)  # workers per coordinator
GRANTS = 60  # in all


def jain(counts: list[int]) -> float:
    return sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))


@pytest.fixture
def coordinators(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[list[str]]:
    _wipe(valkey_server.url)
    policy = tmp_path / "one.yaml"
    policy.write_text(POLICY)
    env = {**os.environ, "QUOTAGATE_REDIS_URL": valkey_server.url}
    ports = [free_port() for _ in SPREAD]
    processes = [
        subprocess.Popen(
            [*SERVE, "--port", str(port), "--policies", str(policy)],
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


def test_workers_are_served_in_turn_across_replicas(coordinators: list[str]) -> None:
    served: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    all_waiting = threading.Barrier(sum(SPREAD))

    def worker(name: str, url: str) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            all_waiting.wait()
            while True:
                with lock:
                    if len(served) >= GRANTS:
                        return
                body = {"tenant": "t", "api": "one", "wait": 20, "holder": name}
                reply = http.post("/v1/leases", json=body)
                if reply.status_code != 200:
                    with lock:
                        failures.append(reply.text)
                    return
                with lock:
                    served.append(name)
                release = f"/v1/leases/{reply.json()['lease_id']}/release"
                assert http.post(release, json={"outcome": "ok"}).status_code == 200

    threads = [
        threading.Thread(target=worker, args=(f"{replica}-{number}", url))
        for replica, (url, workers) in enumerate(zip(coordinators, SPREAD, strict=True))
        for number in range(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not failures, failures[:3]
    counts = [served.count(f"{r}-{n}") for r, workers in enumerate(SPREAD) for n in range(workers)]
    # Every worker waits in the one line; the crowded replica gets no more than its workers'
    # turns, the others no less.
    assert jain(counts) >= 0.95, counts
    per_replica = [sum(served.count(f"{r}-{n}") for n in range(w)) for r, w in enumerate(SPREAD)]
    assert per_replica[0] <= GRANTS * 0.75, per_replica


def test_interactive_goes_before_batch_across_replicas(coordinators: list[str]) -> None:
    first = httpx.post(f"{coordinators[0]}/v1/leases", json={"tenant": "t", "api": "one"})
    assert first.status_code == 200
    order: list[str] = []
    lock = threading.Lock()

    def waiter(url: str, priority: str) -> None:
        body = {"tenant": "t", "api": "one", "wait": 20, "priority": priority}
        reply = httpx.post(f"{url}/v1/leases", json=body, timeout=30)
        assert reply.status_code == 200, reply.text
        with lock:
            order.append(priority)
        lease = reply.json()["lease_id"]
        httpx.post(f"{url}/v1/leases/{lease}/release", json={"outcome": "ok"}, timeout=30)

    def line_length() -> int:
        return int(httpx.get(f"{coordinators[0]}/v1/usage/t/one").json()["waiting"])

    threads = []
    for url, priority in ((coordinators[1], "batch"), (coordinators[2], "interactive")):
        threads.append(threading.Thread(target=waiter, args=(url, priority)))
        threads[-1].start()
        while line_length() < len(threads):
            time.sleep(0.01)
    lease = first.json()["lease_id"]
    httpx.post(f"{coordinators[0]}/v1/leases/{lease}/release", json={"outcome": "ok"})
    for thread in threads:
        thread.join(60)
    assert order == ["interactive", "batch"]


def test_batch_is_still_served_while_interactive_saturates(coordinators: list[str]) -> None:
    # Interactive asks for more than the api grants, through two replicas; batch, through
    # the third, comes once the window is full: interactive keeps it above batch's share,
    # but batch ages within a second without a grant and is then served ahead, once.
    grants = {"interactive": 0, "batch": 0}
    failures: list[str] = []
    lock = threading.Lock()
    saturated, done = threading.Event(), threading.Event()

    def worker(url: str, priority: str) -> None:
        body = {"tenant": "t", "api": "two", "wait": 10, "priority": priority}
        with httpx.Client(base_url=url, timeout=30) as http:
            while not done.is_set():
                reply = http.post("/v1/leases", json=body)
                if reply.status_code != 200:
                    with lock:
                        failures.append(f"{priority}: {reply.text}")
                    continue
                release = f"/v1/leases/{reply.json()['lease_id']}/release"
                assert http.post(release, json={"outcome": "ok"}).status_code == 200
                with lock:
                    grants[priority] += 1
                    if grants["interactive"] >= 20:  # two windows' worth: saturated
                        saturated.set()
                    if grants["batch"] >= 3 or grants["interactive"] >= 300:
                        done.set()

    interactive = [
        threading.Thread(target=worker, args=(coordinators[i % 2], "interactive")) for i in range(6)
    ]
    for thread in interactive:
        thread.start()
    assert saturated.wait(60), grants
    with lock:
        before = grants["interactive"]
    batch = [threading.Thread(target=worker, args=(coordinators[2], "batch")) for _ in range(2)]
    for thread in batch:
        thread.start()
    for thread in interactive + batch:
        thread.join(120)
    # Without aging batch would get nothing: interactive keeps the window above its share.
    assert grants["batch"] >= 3, (grants, failures[:3])
    # Higher classes are still served first: interactive got the most meanwhile.
    assert grants["interactive"] - before >= grants["batch"], (grants, before)
