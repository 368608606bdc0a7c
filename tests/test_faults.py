"""Faults under load: Redis dies and comes back, a coordinator dies mid-request, a worker
dies holding leases. Everything runs on loopback, every wait is bounded, and time bounds
serve only as hang detectors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from quotagate.client import QuotaClient, QuotaExhausted
from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer, free_port
from quotagate.coordinator.leases import LeaseRef
from quotagate.coordinator.settings import Settings

from .conftest import _wipe
from .service import serve_in_thread

pytestmark = [pytest.mark.server, pytest.mark.slow]

REQUEST_TIMEOUT = 1.0  # the coordinator's bound on one Redis decision
HANG = REQUEST_TIMEOUT + 3.0  # a reply slower than this is a hang
STARTUP = 20.0  # seconds a coordinator process may take to answer /readyz

POLICIES = """
margin: 0
apis:
  load:
    lease_ttl: 5s
    limits: [{calls: 40, per: 1s, granularity: 100ms}, {concurrent: 6}]
  solo:
    lease_ttl: 5s
    limits: [{calls: 5, per: 1s, granularity: 100ms, margin: 500ms}]
  burst:
    lease_ttl: 1m
    limits: [{calls: 20, per: 1s, granularity: 100ms}]
  slots:
    lease_ttl: 1s
    limits: [{calls: 1000, per: 1m}, {concurrent: 2}]
"""
TTL_MS = 1000  # lease_ttl of `slots`


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "faults.yaml"
    path.write_text(POLICIES)
    return path


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Poll `condition` until it holds; the bound only detects a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def join_all(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(2 * HANG + 5)
    assert not any(thread.is_alive() for thread in threads), "a client thread hangs"


def redis_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def fullest_window(times_ms: list[int], window_ms: int) -> int:
    """The most grants in any window [t, t + window_ms) that starts at a grant."""
    times = sorted(times_ms)
    return max((sum(1 for t in times if s <= t < s + window_ms) for s in times), default=0)


# -- 1. Redis dies under load ---------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    op: str  # "acquire" | "release"
    status: int  # HTTP status; 0 for a client timeout (a hang), -1 for a transport error
    error: str | None
    retry_after_header: str | None
    phase: str  # "up" | "down" | "back": the Redis phase when the request was sent


class Outage:
    """Redis killed and restarted on its port (its state lost), or frozen (SIGSTOP: open
    connections that never answer) and thawed."""

    def __init__(self, fault: str) -> None:
        self.fault = fault
        self.server = EmbeddedServer().start()
        self.frozen = False

    def begin(self) -> None:
        if self.fault == "kill":
            self.server.kill()
        else:
            assert self.server.process is not None
            os.kill(self.server.process.pid, signal.SIGSTOP)
            self.frozen = True

    def end(self) -> None:
        if self.fault == "kill":
            self.server = EmbeddedServer(port=self.server.port).start()
        elif self.frozen:
            assert self.server.process is not None
            os.kill(self.server.process.pid, signal.SIGCONT)
            self.frozen = False

    def close(self) -> None:
        if self.fault == "freeze":
            self.end()
        self.server.stop()


@pytest.mark.parametrize("fault", ["kill", "freeze"])
def test_redis_down_under_load_gives_503s_then_recovers(policy_file: Path, fault: str) -> None:
    outage = Outage(fault)
    server = outage.server
    settings = Settings(
        redis_url=server.url, policies=policy_file, request_timeout=REQUEST_TIMEOUT, max_wait=2.0
    )
    replies: list[Reply] = []
    lock = threading.Lock()
    stop = threading.Event()
    phase = ["up"]

    def record(op: str, sent_in: str, response: httpx.Response | None, status: int = 0) -> None:
        if response is not None:
            status = response.status_code
            try:
                error = response.json().get("error")
            except ValueError:
                error = "not json"
            header = response.headers.get("Retry-After")
        else:
            error, header = None, None
        with lock:
            replies.append(Reply(op, status, error, header, sent_in))

    def call(http: httpx.Client, op: str, path: str, body: dict[str, object]) -> httpx.Response:
        sent_in = phase[0]
        try:
            response = http.post(path, json=body)
        except httpx.TimeoutException:
            record(op, sent_in, None, 0)
            raise
        except httpx.TransportError:
            record(op, sent_in, None, -1)
            raise
        record(op, sent_in, response)
        return response

    def hammer(url: str, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=url, timeout=HANG) as http:
            while not stop.is_set():
                body = {"tenant": "faults/redis", "api": "load", "wait": rng.choice([0, 0, 0.3])}
                try:
                    reply = call(http, "acquire", "/v1/leases", body)
                    if reply.status_code == 503:
                        time.sleep(0.02)
                    if reply.status_code != 200:
                        continue
                    outcome = rng.choice(["ok", "ok", "failed", "not_called", "throttled"])
                    release: dict[str, object] = {"outcome": outcome}
                    if outcome == "throttled":
                        release["retry_after"] = 0.05
                    lease_id = reply.json()["lease_id"]
                    call(http, "release", f"/v1/leases/{lease_id}/release", release)
                except httpx.HTTPError:
                    return  # recorded; the assertions below report it

    def count(**match: object) -> int:
        with lock:
            return sum(all(getattr(r, k) == v for k, v in match.items()) for r in replies)

    try:
        with (
            serve_in_thread(create_app(settings)) as url,
            QuotaClient(
                url, "faults/local", timeout=HANG, on_unavailable="local", probe_interval=1.0
            ) as quota,
        ):
            threads = [threading.Thread(target=hammer, args=(url, i)) for i in range(8)]
            for thread in threads:
                thread.start()
            try:
                # Up: the fallback client learns the policies from the coordinator.
                with quota.lease("solo") as lease:
                    assert not lease.local
                wait_until(lambda: count(op="acquire", status=200) >= 40, "grants")

                outage.begin()
                phase[0] = "down"
                wait_until(lambda: count(status=503, phase="down") >= 16, "503s")

                # Down: the fallback client grants from its local limiter, within budget.
                local_grants: list[int] = []
                outage_ends = time.monotonic() + 2.5
                while time.monotonic() < outage_ends:
                    try:
                        with quota.lease("solo") as lease:
                            assert lease.local, "a coordinator lease while Redis is down"
                            local_grants.append(int(time.monotonic() * 1000))
                    except QuotaExhausted as denial:
                        assert denial.status_code is None  # denied locally
                        time.sleep(min(denial.retry_after, 0.05))
                assert len(local_grants) >= 5
                assert fullest_window(local_grants, 1000) <= 5, local_grants

                outage.end()
                phase[0] = "back"
                # Back: the same coordinator grants again, by itself.
                wait_until(lambda: count(op="acquire", status=200, phase="back") >= 40, "recovery")

                # And the fallback client returns to the coordinator.
                def remote_lease() -> bool:
                    try:
                        with quota.lease("solo") as lease:
                            return not lease.local
                    except QuotaExhausted:
                        return False

                wait_until(remote_lease, "the client to use the coordinator again")
                with httpx.Client(base_url=url, timeout=HANG) as http:
                    assert http.get("/readyz").status_code == 200
            finally:
                stop.set()
                join_all(threads)
    finally:
        outage.close()

    assert not [r for r in replies if r.status <= 0], "client timeouts or transport errors"
    allowed = {"acquire": {200, 429, 503}, "release": {200, 404, 503}}
    assert not [r for r in replies if r.status not in allowed[r.op]]
    unavailable = [r for r in replies if r.status == 503]
    assert unavailable
    assert all(r.error == "backend_unavailable" and r.retry_after_header for r in unavailable)
    # A release after a restart may name a lease the emptied store never saw.
    assert all(r.error == "unknown_lease" for r in replies if r.status == 404)
    assert count(status=429) > 0  # the limits held throughout


# -- 2. A coordinator process dies mid-request ------------------------------------------


@contextmanager
def coordinator_process(redis_url: str, policies: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`quotagate.coordinator serve` in its own process; killed (if alive) at the end."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "quotagate.coordinator", "serve", "--port", str(port)),
            *("--policies", str(policies), "--redis-url", redis_url),
        ],
        env={**os.environ, "QUOTAGATE_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert process.poll() is None, "the coordinator exited at start"
            try:
                return httpx.get(f"{url}/readyz", timeout=HANG).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, "the coordinator to start", STARTUP)
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def test_a_coordinator_killed_mid_request_grants_nothing_twice(
    valkey_server: EmbeddedServer, policy_file: Path
) -> None:
    _wipe(valkey_server.url)
    tenant = "faults/coordinator"
    granted: list[str] = []  # lease ids the clients received
    unexpected: list[str] = []  # replies other than those allowed
    cut = [0]  # requests in flight when the coordinator died
    lock = threading.Lock()
    killed = threading.Event()
    stop = threading.Event()
    slot_grants = [0]
    released: dict[bytes, bytes] = {}  # member -> record, read before the release

    store = redis.Redis.from_url(valkey_server.url)

    def burst(url: str) -> None:
        # Each grant's record is read before the lease is released; the leases whose
        # reply or release the kill cut off stay in the store until the end.
        with httpx.Client(base_url=url, timeout=HANG) as http:
            while not stop.is_set():
                body = {"tenant": tenant, "api": "burst", "wait": 1.0}  # most of them wait
                try:
                    reply = http.post("/v1/leases", json=body)
                    if reply.status_code == 200:
                        lease_id = reply.json()["lease_id"]
                        ref = LeaseRef.parse(lease_id)
                        assert ref is not None
                        record = store.hget(f"qg:{{{tenant}|burst}}:s", ref.member)
                        with lock:
                            granted.append(lease_id)
                            if record is None:
                                unexpected.append("a granted lease is missing from the store")
                            else:
                                released[ref.member.encode()] = record
                        http.post(f"/v1/leases/{lease_id}/release", json={"outcome": "ok"})
                except httpx.TransportError:
                    with lock:
                        cut[0] += 1
                    return
                with lock:
                    if reply.status_code not in (200, 429):
                        unexpected.append(reply.text)

    def hold_slot(url: str) -> None:
        with httpx.Client(base_url=url, timeout=HANG) as http:
            body = {"tenant": tenant, "api": "slots", "wait": 3.0}
            try:
                reply = http.post("/v1/leases", json=body)
            except httpx.TransportError:
                with lock:
                    cut[0] += 1
                return
            with lock:
                if reply.status_code != 200:
                    unexpected.append(reply.text)
                    return
                slot_grants[0] += 1
            killed.wait(HANG)  # hold it until the coordinator is gone
            lease_id = reply.json()["lease_id"]
            try:
                http.post(f"/v1/leases/{lease_id}/release", json={"outcome": "ok"})
            except httpx.TransportError:
                pass
            else:
                with lock:
                    unexpected.append("a release reached a killed coordinator")

    def run(threads: list[threading.Thread]) -> list[threading.Thread]:
        for thread in threads:
            thread.start()
        return threads

    threads: list[threading.Thread] = []
    try:
        with coordinator_process(valkey_server.url, policy_file) as (url, process):
            threads += run([threading.Thread(target=burst, args=(url,)) for _ in range(4)])
            wait_until(lambda: len(granted) >= 25, "burst grants")  # past one window
            # Two hold the concurrency slots; two wait for them (wait > 0) when it dies.
            threads += run([threading.Thread(target=hold_slot, args=(url,)) for _ in range(4)])
            wait_until(lambda: slot_grants[0] >= 2, "slot grants")
            process.kill()  # SIGKILL: no shutdown, requests in flight are cut
            process.wait()
            killed.set()
            now = redis_ms(store)
            orphans = store.zrangebyscore(f"qg:{{{tenant}|slots}}:fa", now, "+inf", withscores=True)
            join_all(threads)
        assert cut[0] >= 1, "no request was in flight"
        assert orphans, "no slot lease was held when the coordinator died"
        assert all(expiry <= now + TTL_MS for _, expiry in orphans)
        orphans_expire = int(max(expiry for _, expiry in orphans))

        with (
            coordinator_process(valkey_server.url, policy_file) as (url, _),
            httpx.Client(base_url=url, timeout=HANG) as http,
        ):
            # The orphaned leases free their slots at their expiry, with no release.
            def in_flight() -> int:
                reply = http.get(f"/v1/usage/{tenant}/slots")
                assert reply.status_code == 200, reply.text
                return int(reply.json()["in_flight"])

            wait_until(lambda: in_flight() == 0, "the orphaned leases to expire")
            assert redis_ms(store) >= orphans_expire
            for _ in range(2):
                # The two waiters the kill cut off keep their places in the fleet's line
                # until their tickets lapse (2 s): wait behind them.
                body = {"tenant": tenant, "api": "slots", "wait": 3.0}
                reply = http.post("/v1/leases", json=body)
                assert reply.status_code == 200, reply.text
                ref = LeaseRef.parse(reply.json()["lease_id"])
                assert ref is not None
                record = store.hget(f"qg:{{{tenant}|slots}}:s", ref.member)
                assert record is not None
                assert int(record.split(b":")[0]) >= orphans_expire  # not before the TTL

            # The new coordinator carries on from the same counts.
            before = len(granted)
            stop.clear()
            threads = run([threading.Thread(target=burst, args=(url,)) for _ in range(4)])
            wait_until(lambda: len(granted) >= before + 10, "grants after the restart")
            stop.set()
            join_all(threads)
    finally:
        stop.set()
        killed.set()
        join_all(threads)
        state = store.hgetall(f"qg:{{{tenant}|burst}}:s")
        records = {field: value for field, value in state.items() if b":" in field}  # leases
        records.update(released)
        store.close()

    assert not unexpected, unexpected
    assert len(set(granted)) == len(granted), "a lease id was granted twice"
    tokens = {LeaseRef.parse(lease_id).member.encode() for lease_id in granted}  # type: ignore[union-attr]
    assert tokens <= set(records), "a granted lease is missing from the store"
    # Every grant Redis recorded, including those whose reply the kill cut off, counted
    # in exact sliding windows: never over the limit.
    grants = [int(record.split(b":")[0]) for record in records.values()]
    assert fullest_window(grants, 1000) <= 20


# -- 3. A worker dies holding leases ----------------------------------------------------

WORKER = textwrap.dedent(
    """
    import sys, time
    from quotagate.client import QuotaClient

    with QuotaClient(sys.argv[1], sys.argv[2]) as quota:
        for _ in range(2):
            print(quota.acquire("slots").lease_id, flush=True)
        time.sleep(60)  # killed before it releases anything
    """
)


def test_a_worker_killed_holding_leases_frees_them_at_expiry(
    valkey_server: EmbeddedServer, policy_file: Path
) -> None:
    _wipe(valkey_server.url)
    tenant = "faults/worker"
    settings = Settings(
        redis_url=valkey_server.url, policies=policy_file, request_timeout=REQUEST_TIMEOUT
    )
    with (
        serve_in_thread(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=HANG) as http,
    ):
        worker = subprocess.Popen(
            [sys.executable, "-c", WORKER, url, tenant], stdout=subprocess.PIPE, text=True
        )
        try:
            assert worker.stdout is not None
            held = [worker.stdout.readline().strip() for _ in range(2)]
            assert all(held), "the worker did not get its leases"
        finally:
            worker.kill()  # SIGKILL: no release, no clean-up
            worker.wait()
            if worker.stdout is not None:
                worker.stdout.close()

        def usage() -> dict[str, object]:
            reply = http.get(f"/v1/usage/{tenant}/slots")
            assert reply.status_code == 200, reply.text
            return dict(reply.json())

        def calls_used(view: dict[str, object]) -> object:
            limits = view["limits"]
            assert isinstance(limits, list)
            return limits[0]["used"]

        # Held until they expire: the slots are taken, the retry time is within the TTL.
        denied = http.post("/v1/leases", json={"tenant": tenant, "api": "slots"})
        assert denied.status_code == 429, denied.text
        assert denied.json()["error"] == "quota_exhausted"
        assert denied.json()["limit"]["kind"] == "concurrent"
        assert 0 < denied.json()["retry_after"] <= TTL_MS / 1000
        assert denied.headers["Retry-After"] == "1"
        held_view = usage()
        assert held_view["in_flight"] == 2
        assert calls_used(held_view) == 2

        # Free after it, with nobody releasing them; their calls stay counted.
        wait_until(lambda: usage()["in_flight"] == 0, "the leases to expire")
        assert calls_used(usage()) == 2
        for lease_id in held:  # too late to release: nothing changes
            late = http.post(f"/v1/leases/{lease_id}/release", json={"outcome": "not_called"})
            assert late.status_code == 404
            assert late.json()["error"] == "unknown_lease"
        assert calls_used(usage()) == 2
        for _ in range(2):
            again = http.post("/v1/leases", json={"tenant": tenant, "api": "slots"})
            assert again.status_code == 200, again.text
