"""Soak: a steady mixed load on one coordinator process for a long time, watching that its
memory and the store's stay flat once every window is live.

    python -m tests.perf.soak [--minutes 30] [--interval 30] [--threads 6] [--rate 100]

It starts an embedded Valkey and `quotagate.coordinator serve` on it (loopback), then
`--threads` threads acquire and release at `--rate` acquires per second in all: several
tenants; short test apis and catalog apis; api- and key-scoped limits, concurrency and
run time; every outcome (ok, failed, throttled, not_called, renewed, abandoned until it
expires), waits, usage and policy reads. Every `--interval` seconds it samples the
coordinator's RSS, Redis `used_memory` and `DBSIZE`, and prints a table at the end.

Exit 1 on any reply other than a grant, a 429 or a success (transport errors and
timeouts included); on coordinator RSS growth beyond `--max-growth` after the warm-up;
on Redis memory growth beyond the same share (plus 1 MiB for buffers) after the
warm-up; on more keys than the tenants, apis and keys in use can make; on a key without
a TTL (other than the store epoch); or on a bucket hash with more buckets than its
window holds. Not part of CI: `make soak`.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from quotagate.coordinator.codec import redis_keys
from quotagate.coordinator.embedded import EmbeddedServer, free_port
from quotagate.coordinator.policy import Kind, load_policies

SOAK_POLICIES = """
margin: 0
apis:
  soak.fast:
    lease_ttl: 5s
    limits:
      - {calls: 30, per: 1s, granularity: 100ms}
      - {calls: 900, per: 1m}
  soak.sessions:
    lease_ttl: 3s
    limits:
      - {calls: 200, per: 10s}
      - {concurrent: 4}
      - {concurrent: 1, scope: key}
  soak.hunting:
    lease_ttl: 3s
    runtime_estimate: 1s
    limits:
      - {calls: 20, per: 5s}
      - {runtime: 30s, per: 1m}
"""

TENANTS = [f"soak-{i}/app" for i in range(4)] + ["contoso.onmicrosoft.com/analyst"]
ENDPOINTS = ["get:/api/machines", "get:/api/alerts", "post:/api/machines/isolate"]
MACHINES = [f"machine-{i}" for i in range(8)]
SESSIONS = [f"s{i}" for i in range(6)]

# (api, keys, weight): catalog apis and the short test apis; keys None = no key.
WORKLOAD: list[tuple[str, list[str] | None, int]] = [
    ("soak.fast", None, 30),
    ("soak.sessions", SESSIONS, 15),
    ("soak.hunting", None, 10),
    ("m365d.incidents", None, 10),
    ("m365d.advanced-hunting", None, 5),
    ("mde.api", ENDPOINTS, 15),
    ("mde.live-response", MACHINES, 5),
    ("graph.security", None, 10),
]
# Abandoned leases hold their slot until they expire: only on apis whose leases live short.
ABANDON_TTL_LIMIT = 60.0
RUNTIME_APIS = {"soak.hunting", "m365d.advanced-hunting"}
GROWTH_SLACK_BYTES = 1 << 20


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    replies: Counter[tuple[str, int, str]] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    def add(self, op: str, status: int, code: str = "") -> None:
        with self.lock:
            self.replies[(op, status, code)] += 1

    def error(self, text: str) -> None:
        with self.lock:
            self.replies[("error", 0, "")] += 1
            if len(self.errors) < 20:
                self.errors.append(text)

    def snapshot(self) -> Counter[tuple[str, int, str]]:
        with self.lock:
            return Counter(self.replies)


def rss_bytes(pid: int) -> int:
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    import psutil  # only where /proc is missing

    return int(psutil.Process(pid).memory_info().rss)


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the load started
    rss: int
    used_memory: int
    dbsize: int
    requests: int
    grants: int
    denied: int
    errors: int


def sample(at: float, pid: int, store: redis.Redis, tally: Tally) -> Sample:
    replies = tally.snapshot()
    info = store.info("memory")
    return Sample(
        at=at,
        rss=rss_bytes(pid),
        used_memory=int(info["used_memory"]),
        dbsize=int(store.dbsize()),
        requests=sum(n for (op, _, _), n in replies.items() if op != "error"),
        grants=sum(n for (op, s, _), n in replies.items() if op == "acquire" and s == 200),
        denied=sum(n for (_, s, _), n in replies.items() if s == 429),
        errors=sum(n for key, n in replies.items() if is_error(key)),
    )


def is_error(key: tuple[str, int, str]) -> bool:
    op, status, _ = key
    return op == "error" or status not in (200, 429)


class Worker(threading.Thread):
    def __init__(
        self, url: str, tally: Tally, rate: float, stop: threading.Event, seed: int, ttl: dict
    ) -> None:
        super().__init__(daemon=True)
        self.url, self.tally, self.rate, self.stop, self.ttl = url, tally, rate, stop, ttl
        self.rng = random.Random(seed)

    def run(self) -> None:
        apis = [(api, keys) for api, keys, _ in WORKLOAD]
        weights = [w for _, _, w in WORKLOAD]
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=10.0) as http:
            while not self.stop.is_set():
                now = time.monotonic()
                if next_at > now:
                    time.sleep(next_at - now)
                next_at = max(next_at + interval, time.monotonic() - 1.0)  # no catch-up storm
                api, keys = self.rng.choices(apis, weights)[0]
                tenant = self.rng.choice(TENANTS)
                key = self.rng.choice(keys) if keys else None
                try:
                    self.one(http, tenant, api, key)
                except httpx.HTTPError as exc:
                    self.tally.error(f"{api}: {exc!r}")

    def post(self, http: httpx.Client, op: str, path: str, body: dict) -> httpx.Response:
        reply = http.post(path, json=body)
        self.check(op, reply)
        return reply

    def check(self, op: str, reply: httpx.Response) -> None:
        code = ""
        if reply.status_code != 200:
            try:
                code = str(reply.json().get("error", ""))
            except ValueError:
                code = "not json"
        self.tally.add(op, reply.status_code, code)
        if reply.status_code not in (200, 429):
            self.tally.error(f"{op} {reply.status_code}: {reply.text[:200]}")

    def one(self, http: httpx.Client, tenant: str, api: str, key: str | None) -> None:
        rng = self.rng
        roll = rng.random()
        if roll < 0.03:
            self.check("usage", http.get(f"/v1/usage/{tenant}/{api}", params={"key": key or ""}))
            return
        if roll < 0.04:
            self.check("policies", http.get(f"/v1/policies/{api}"))
            return
        body: dict = {"tenant": tenant, "api": api, "holder": "soak"}
        if key:
            body["key"] = key
        if rng.random() < 0.1:
            body["wait"] = 0.5
        if api in RUNTIME_APIS and rng.random() < 0.5:
            body["runtime_estimate"] = round(rng.uniform(0.2, 3.0), 3)
        reply = self.post(http, "acquire", "/v1/leases", body)
        if reply.status_code != 200:
            return
        lease_id = reply.json()["lease_id"]
        time.sleep(rng.uniform(0, 0.03))  # the upstream call
        outcome = rng.choices(
            ["ok", "failed", "throttled", "not_called", "renew", "abandon"],
            [60, 10, 3, 12, 8, 7],
        )[0]
        if outcome == "abandon" and self.ttl[api] > ABANDON_TTL_LIMIT:
            outcome = "ok"
        if outcome == "abandon":
            return  # it expires; its calls stay counted
        path = f"/v1/leases/{lease_id}"
        if outcome == "renew":
            self.post(http, "renew", f"{path}/renew", {})
            outcome = "ok"
        release: dict = {"outcome": outcome}
        if outcome == "throttled":
            release["status_code"] = 429
            release["retry_after"] = round(rng.uniform(0.2, 1.5), 3)
        if api in RUNTIME_APIS and outcome in ("ok", "failed") and rng.random() < 0.7:
            release["runtime"] = round(rng.uniform(0.1, 5.0), 3)
        self.post(http, "release", f"{path}/release", release)


def possible_keys(policy_file: Path) -> set[str]:
    """Every key the workload can make."""
    policies = load_policies(policy_file)
    keys: set[str] = set()
    for tenant in TENANTS:
        for api, api_keys, _ in WORKLOAD:
            policy = policies.resolve(tenant, api)
            assert policy is not None, api
            for key in api_keys or [""]:
                keys.update(redis_keys(tenant, api, key, policy))
    return keys


def check_store(store: redis.Redis, policy_file: Path) -> list[str]:
    """Keys without a TTL, and bucket hashes holding more buckets than their window."""
    problems = []
    policies = load_policies(policy_file)
    spans: dict[str, int] = {}  # bucket-hash name prefix -> most buckets it may hold
    for tenant in TENANTS:
        for api, api_keys, _ in WORKLOAD:
            policy = policies.resolve(tenant, api)
            assert policy is not None
            for key in api_keys or [""]:
                names = redis_keys(tenant, api, key, policy)[-len(policy.limits) :]
                for lim, name in zip(policy.limits, names, strict=True):
                    if lim.kind is not Kind.CONCURRENT:
                        span = lim.window_ms + lim.margin_ms
                        spans[name] = -(-span // lim.granularity_ms) + 2
    for raw in store.scan_iter(count=1000):
        name = raw.decode()
        if store.pttl(name) == -1:
            problems.append(f"{name} has no TTL")
        if name in spans:  # bucket fields only, not the counter's `lo` and `sum`
            buckets = sum(1 for field in store.hkeys(name) if field.isdigit())
            if buckets > spans[name]:
                problems.append(f"{name} holds {buckets} buckets, at most {spans[name]} live")
    return problems


def start_coordinator(redis_url: str, policy_file: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "quotagate.coordinator", "serve", "--port", str(port)),
                *("--policies", str(policy_file), "--redis-url", redis_url),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise SystemExit(f"the coordinator exited at start:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            process.kill()
            process.wait()
            raise SystemExit("the coordinator did not become ready")
        time.sleep(0.1)


def mib(n: float) -> str:
    return f"{n / (1 << 20):.1f}"


def table(samples: list[Sample], warm: Sample) -> str:
    head = (
        f"{'elapsed':>8} {'RSS MiB':>8} {'Redis MiB':>10} {'DBSIZE':>7} "
        f"{'requests':>9} {'grants':>8} {'429':>8} {'errors':>7}"
    )
    lines = [head, "-" * len(head)]
    for s in samples:
        mark = "  <- warm" if s is warm else ""
        lines.append(
            f"{int(s.at) // 60:>5}:{int(s.at) % 60:02d} {mib(s.rss):>8} {mib(s.used_memory):>10} "
            f"{s.dbsize:>7} {s.requests:>9} {s.grants:>8} {s.denied:>8} {s.errors:>7}{mark}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, default=None, help="minutes; default min(5, minutes / 5)"
    )
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--rate", type=float, default=100.0, help="acquires per second in all")
    parser.add_argument("--max-growth", type=float, default=0.2, help="after the warm-up")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    duration = args.minutes * 60
    warmup = 60 * (args.warmup if args.warmup is not None else min(5.0, args.minutes / 5))

    with tempfile.TemporaryDirectory(prefix="quotagate-soak-") as tmp:
        policy_file = Path(tmp) / "soak.yaml"
        policy_file.write_text(SOAK_POLICIES)
        log = Path(tmp) / "coordinator.log"
        policies = load_policies(policy_file)
        ttl = {api: policies.apis[api].lease_ttl_ms / 1000 for api, _, _ in WORKLOAD}
        bound = len(possible_keys(policy_file))

        with EmbeddedServer() as server:
            store = redis.Redis.from_url(server.url)
            coordinator, url = start_coordinator(server.url, policy_file, log)
            tally = Tally()
            stop = threading.Event()
            workers = [
                Worker(url, tally, args.rate / args.threads, stop, args.seed + i, ttl)
                for i in range(args.threads)
            ]
            print(
                f"soak: {args.minutes:g} min, {args.threads} threads, {args.rate:g} acquires/s, "
                f"sample every {args.interval:g} s, warm-up {warmup:g} s; coordinator pid "
                f"{coordinator.pid} at {url}, {server.binary.name} at {server.url}",
                flush=True,
            )
            samples: list[Sample] = []
            try:
                started = time.monotonic()
                samples.append(sample(0.0, coordinator.pid, store, tally))
                for worker in workers:
                    worker.start()
                next_sample = started + args.interval
                end = started + duration
                while True:
                    now = time.monotonic()
                    if coordinator.poll() is not None:
                        tally.error(f"the coordinator exited with {coordinator.returncode}")
                        break
                    if now >= next_sample or now >= end:
                        s = sample(now - started, coordinator.pid, store, tally)
                        samples.append(s)
                        print(
                            f"  {s.at:7.0f} s  rss {mib(s.rss)} MiB  redis "
                            f"{mib(s.used_memory)} MiB  dbsize {s.dbsize}  requests "
                            f"{s.requests}  errors {s.errors}",
                            flush=True,
                        )
                        next_sample += args.interval
                        if now >= end:
                            break
                    time.sleep(min(0.5, max(0.0, min(next_sample, end) - time.monotonic())))
            finally:
                stop.set()
                for worker in workers:
                    worker.join(15)
                problems = check_store(store, policy_file) if coordinator.poll() is None else []
                coordinator.terminate()
                try:
                    coordinator.wait(10)
                except subprocess.TimeoutExpired:
                    coordinator.kill()
                    coordinator.wait()
                store.close()
            coordinator_log = log.read_text(errors="replace")

    warm = next((s for s in samples if s.at >= warmup), samples[-1])
    last = samples[-1]
    print()
    print(table(samples, warm))
    print()
    replies = tally.snapshot()
    for (op, status, code), n in sorted(replies.items()):
        print(f"  {op:<9} {status:>4} {code:<20} {n:>9}")
    failures = [f"error: {text}" for text in tally.errors]
    errors = sum(n for key, n in replies.items() if is_error(key))
    if errors:
        failures.append(f"{errors} replies were neither a success nor a 429")
    rss_growth = last.rss / warm.rss - 1
    redis_growth = (last.used_memory - warm.used_memory) / warm.used_memory
    print(
        f"\nafter the warm-up ({warm.at:.0f} s): coordinator RSS {mib(warm.rss)} -> "
        f"{mib(last.rss)} MiB ({rss_growth:+.1%}), Redis used_memory "
        f"{mib(warm.used_memory)} -> {mib(last.used_memory)} MiB ({redis_growth:+.1%}); "
        f"DBSIZE max {max(s.dbsize for s in samples)} (bound {bound})"
    )
    if last.rss > warm.rss * (1 + args.max_growth):
        failures.append(f"coordinator RSS grew {rss_growth:.1%} after the warm-up")
    if last.used_memory > warm.used_memory * (1 + args.max_growth) + GROWTH_SLACK_BYTES:
        failures.append(f"Redis used_memory grew {redis_growth:.1%} after the warm-up")
    if max(s.dbsize for s in samples) > bound:
        failures.append(f"DBSIZE reached {max(s.dbsize for s in samples)}, bound {bound}")
    failures += problems
    if "Traceback" in coordinator_log:
        failures.append("the coordinator logged a traceback:\n" + coordinator_log[-3000:])
    if failures:
        print("\nFAIL\n" + "\n".join(failures))
        return 1
    print("\nOK")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
