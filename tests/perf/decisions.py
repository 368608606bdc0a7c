"""Decisions per second and memory per tenant: quotagate's engine against peer libraries,
for the policy {50/min, 1500/h} on the same Redis.

    python -m tests.perf.decisions [--seconds 3] [--callers 64]
    python -m tests.perf.decisions --cluster     # quotagate on one node vs a cluster

Each contender answers "may this tenant call now?" for both windows, as its API allows:

- `quotagate`: `Engine.acquire` (one EVALSHA checks both windows and registers a lease);
- `limits` moving window, and `limits` sliding window counter: one `hit` per window
  (two EVALSHAs; the hour is hit only when the minute said yes);
- `PyrateLimiter`: a `RedisBucket` with both rates (one EVALSHA), called through
  `bucket.put`: its `Limiter` adds a per-thread asyncio lock that would serialise the
  concurrent callers;
- `throttled-py`: two sliding-window `Throttled` limiters, one per window (two EVALSHAs).

All are asyncio with redis-py (hiredis parser) on one embedded Valkey; quotagate runs
over the coordinator's client (`coordinator/store.py`: redis-py's own, with its socket
timeouts set, as the service runs it), the peers over `Redis.from_url`. Every decision in the
throughput runs is a grant (the tenant changes every 40 decisions), the path that writes.
Memory: one tenant's keys after 1,500 grants filled its hourly window (in virtual time
where the library takes a timestamp), summed with `MEMORY USAGE`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Engine, Grant
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.store import connect

DEFAULT_OUT = Path(__file__).parent / "results"
POLICY = """
apis:
  bench:
    limits: [{calls: 50, per: 1m}, {calls: 1500, per: 1h}]
"""
PER_TENANT = 40  # decisions per tenant in the throughput runs: all of them grants
MINUTE_MS, HOUR_MS = 60_000, 3_600_000


@dataclass
class Contender:
    name: str
    what: str  # what one decision does
    decide: Callable[[str], Awaitable[bool]]  # tenant -> granted
    fill: Callable[[str], Awaitable[None]]  # one tenant's hourly window, full
    close: Callable[[], Awaitable[None]]


# -- the contenders --------------------------------------------------------------------------


async def quotagate(url: str) -> Contender:
    redis = connect(url, timeout=2.0)
    engine = Engine(redis, parse_policies(POLICY, "<decisions>"), timeout=2.0)
    await engine.ready()

    async def decide(tenant: str) -> bool:
        return isinstance(await engine.acquire(tenant, "bench"), Grant)

    async def fill(tenant: str) -> None:
        start = int(time.time() * 1000) - HOUR_MS
        for i in range(1500):  # 25 a minute for an hour, each lease released
            now = start + i * 2400
            grant = await engine.acquire(tenant, "bench", now=now)
            assert isinstance(grant, Grant), f"grant {i} denied: {grant}"
            await engine.release(grant.lease_id, "ok", now=now + 100)

    return Contender(
        "quotagate engine", "1 EVALSHA: both windows, lease", decide, fill, redis.aclose
    )


async def limits_library(url: str, strategy: str, charge_after_test: bool = False) -> Contender:
    from limits import RateLimitItemPerHour, RateLimitItemPerMinute
    from limits.aio.storage import RedisStorage
    from limits.aio.strategies import MovingWindowRateLimiter, SlidingWindowCounterRateLimiter

    storage = RedisStorage(f"async+{url}", implementation="redispy")
    kind = MovingWindowRateLimiter if strategy == "moving" else SlidingWindowCounterRateLimiter
    limiter = kind(storage)
    minute, hour = RateLimitItemPerMinute(50), RateLimitItemPerHour(1500)

    async def hit_each(tenant: str) -> bool:
        return await limiter.hit(minute, tenant) and await limiter.hit(hour, tenant)

    async def test_then_hit(tenant: str) -> bool:
        # Charge only when both windows have room, as one lease does; still not atomic.
        if not (await limiter.test(minute, tenant) and await limiter.test(hour, tenant)):
            return False
        return await limiter.hit(minute, tenant) and await limiter.hit(hour, tenant)

    decide = test_then_hit if charge_after_test else hit_each

    async def fill(tenant: str) -> None:
        # Timestamps come from the client's clock: the state after half an hour at
        # 50 a minute is the hour's 1,500 entries and the minute's 50.
        for _ in range(1500):
            assert await limiter.hit(hour, tenant)
        for _ in range(50):
            assert await limiter.hit(minute, tenant)

    async def close() -> None:
        await storage.bridge.storage.aclose()  # type: ignore[attr-defined]

    name = "limits moving window" if strategy == "moving" else "limits sliding counter"
    if charge_after_test:
        return Contender(
            name + ", test then hit", "4 round trips: test both, hit both", decide, fill, close
        )
    return Contender(name, "2 EVALSHAs: one hit per window", decide, fill, close)


async def baseline(url: str) -> Contender:
    redis = Redis.from_url(url)
    lua_noop = redis.register_script("return 1")

    async def decide(tenant: str) -> bool:
        return bool(await lua_noop(keys=[tenant], args=[1]))

    async def fill(tenant: str) -> None:
        pass

    return Contender(
        "(reference: one EVALSHA of `return 1`)", "1 round trip, no limiter", decide, fill,
        redis.aclose,
    )  # fmt: skip


async def pyrate(url: str) -> Contender:
    from pyrate_limiter import Duration, Rate, RateItem, RedisBucket

    redis = Redis.from_url(url)
    rates = [Rate(50, Duration.MINUTE), Rate(1500, Duration.HOUR)]
    first = await RedisBucket.init(rates, redis, "pyrate:warm")
    buckets: dict[str, Any] = {}

    def bucket(tenant: str) -> Any:
        found = buckets.get(tenant)
        if found is None:
            found = buckets[tenant] = RedisBucket(
                rates, redis, f"pyrate:{tenant}", first.script_hash
            )
        return found

    async def decide(tenant: str) -> bool:
        b = bucket(tenant)
        return bool(await b.put(RateItem("call", b.now())))

    async def fill(tenant: str) -> None:
        b = bucket(tenant)
        start = b.now() - HOUR_MS
        for i in range(1500):
            assert await b.put(RateItem("call", start + i * 2400))

    return Contender("PyrateLimiter", "1 EVALSHA: both rates", decide, fill, redis.aclose)


async def throttled(url: str) -> Contender:
    from throttled.asyncio import RedisStore, Throttled, per_hour, per_min

    store = RedisStore(server=url)
    minute = Throttled(using="sliding_window", quota=per_min(50), store=store)
    hour = Throttled(using="sliding_window", quota=per_hour(1500), store=store)

    async def decide(tenant: str) -> bool:
        if (await minute.limit(tenant)).limited:
            return False
        return not (await hour.limit(tenant)).limited

    async def fill(tenant: str) -> None:
        for _ in range(1500):
            assert not (await hour.limit(tenant)).limited
        for _ in range(50):
            assert not (await minute.limit(tenant)).limited

    async def close() -> None:
        pass  # its store owns the pool; it ends with the event loop

    return Contender("throttled-py", "2 EVALSHAs: one limiter per window", decide, fill, close)


FACTORIES: dict[str, Callable[[str], Awaitable[Contender]]] = {
    "baseline": baseline,
    "quotagate": quotagate,
    "limits-moving": lambda url: limits_library(url, "moving"),
    "limits-moving-tested": lambda url: limits_library(url, "moving", charge_after_test=True),
    "limits-sliding": lambda url: limits_library(url, "sliding"),
    "pyrate": pyrate,
    "throttled": throttled,
}


# -- measuring -------------------------------------------------------------------------------


async def rate(
    contender: Contender, callers: int, seconds: float, run: str, redis: Redis | None = None
) -> tuple[float, float]:
    """Decisions per second of `callers` concurrent tasks for `seconds` (bounded also in
    count), every decision a grant; and the Redis time (µs) each one took, from INFO
    commandstats, when `redis` is given."""
    counter = itertools.count()
    limit = 2_000_000  # decisions, whatever the speed
    denied = 0
    if redis is not None:
        await redis.config_resetstat()
    end = time.monotonic() + seconds

    async def caller() -> int:
        nonlocal denied
        done = 0
        while time.monotonic() < end:
            n = next(counter)
            if n >= limit:
                break
            if not await contender.decide(f"{run}-{n // PER_TENANT}"):
                denied += 1
            done += 1
        return done

    started = time.monotonic()
    total = sum(await asyncio.gather(*(caller() for _ in range(callers))))
    elapsed = time.monotonic() - started
    server = math.nan
    if redis is not None:
        stats = await redis.info("commandstats")
        server = sum(s["usec"] for name, s in stats.items() if name != "cmdstat_info") / total
    if denied:
        raise AssertionError(f"{contender.name}: {denied} of {total} decisions were denials")
    return total / elapsed, server


async def memory(url: str, contender: Contender) -> int:
    """Bytes of one tenant's keys once its hourly window is full."""
    redis = Redis.from_url(url)
    try:
        await redis.flushall()
        await contender.fill("memory-tenant")
        total = 0
        async for key in redis.scan_iter(count=1000):
            total += await redis.memory_usage(key, samples=0) or 0
        return total
    finally:
        await redis.aclose()


async def measure(
    url: str, names: Sequence[str], seconds: float, callers: int, rounds: int
) -> list[dict[str, Any]]:
    """Every contender, in turn, `rounds` times, each round starting one further along
    (the machine's noise spreads over all of them alike); then each one's memory."""
    flush = Redis.from_url(url)
    contenders = [await FACTORIES[name](url) for name in names]
    singles: dict[str, list[float]] = {name: [] for name in names}
    servers: dict[str, list[float]] = {name: [] for name in names}
    concurrents: dict[str, list[float]] = {name: [] for name in names}
    results = []
    try:
        for name, contender in zip(names, contenders, strict=True):
            await rate(contender, 1, min(0.3, seconds), f"warm-{name}")
        await flush.config_resetstat()
        pairs = list(zip(names, contenders, strict=True))
        for round_ in range(rounds):
            # The store emptied before the round, not in it; and each round starts with
            # the next contender, so none always runs first.
            await flush.execute_command("FLUSHALL", "SYNC")
            start = round_ % len(pairs)
            for name, contender in pairs[start:] + pairs[:start]:
                print(f"decisions: round {round_ + 1}, {name} ...", file=sys.stderr, flush=True)
                single, server = await rate(contender, 1, seconds, f"one{round_}-{name}", flush)
                singles[name].append(single)
                servers[name].append(server)
                concurrents[name].append(
                    (await rate(contender, callers, seconds, f"many{round_}-{name}"))[0]
                )
        for name, contender in zip(names, contenders, strict=True):
            results.append(
                {
                    "name": contender.name,
                    "key": name,
                    "what": contender.what,
                    "single": sum(singles[name]) / rounds,
                    "redis_usec": sum(servers[name]) / rounds,
                    "concurrent": sum(concurrents[name]) / rounds,
                    "single_rounds": singles[name],
                    "concurrent_rounds": concurrents[name],
                    "memory": None if name == "baseline" else await memory(url, contender),
                }
            )
    finally:
        for contender in contenders:
            await contender.close()
        await flush.flushall()
        await flush.aclose()
    return results


async def measure_cluster(
    single_url: str, cluster_url: str, seconds: float, callers: int, rounds: int
) -> list[dict[str, Any]]:
    """quotagate's engine on one node and on a three-master cluster (the same binary, the
    same machine), in turn, `rounds` times: the cost of redis-py's cluster client, which
    routes each EVALSHA by the slot of its keys."""
    topologies = [("one node", single_url), ("cluster, 3 masters", cluster_url)]
    contenders = [await quotagate(url) for _, url in topologies]
    singles: list[list[float]] = [[] for _ in topologies]
    concurrents: list[list[float]] = [[] for _ in topologies]
    try:
        for i, contender in enumerate(contenders):
            await rate(contender, 1, min(0.3, seconds), f"warm-{i}")
        for round_ in range(rounds):
            order = list(range(len(topologies)))
            order = order[round_ % 2 :] + order[: round_ % 2]
            for i in order:
                print(f"decisions: round {round_ + 1}, {topologies[i][0]} ...", file=sys.stderr)
                singles[i].append((await rate(contenders[i], 1, seconds, f"c1{round_}-{i}"))[0])
                concurrents[i].append(
                    (await rate(contenders[i], callers, seconds, f"cn{round_}-{i}"))[0]
                )
    finally:
        for contender in contenders:
            await contender.close()
    return [
        {
            "name": name,
            "single": sum(singles[i]) / rounds,
            "concurrent": sum(concurrents[i]) / rounds,
            "single_rounds": singles[i],
            "concurrent_rounds": concurrents[i],
        }
        for i, (name, _) in enumerate(topologies)
    ]


def cluster_table(results: list[dict[str, Any]], callers: int) -> str:
    base = results[0]
    lines = [
        f"| quotagate engine on | decisions/s, 1 caller | decisions/s, {callers} callers "
        f"| {callers} callers, vs one node |",
        "|---|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r['name']} | {r['single']:,.0f} | {r['concurrent']:,.0f} "
            f"| {r['concurrent'] / base['concurrent']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def table(results: list[dict[str, Any]], callers: int) -> str:
    base = next((r for r in results if r["key"] == "quotagate"), None)
    sliding_log = next((r for r in results if r["key"] == "limits-moving"), None)
    lines = [
        f"| contender | one decision | decisions/s, 1 caller | Redis µs per decision "
        f"| decisions/s, {callers} callers | quotagate / it (1 caller) "
        "| memory per tenant, full hour |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ratio = base["single"] / r["single"] if base else math.nan
        used = "" if r["memory"] is None else f"{r['memory']:,} B"
        lines.append(
            f"| {r['name']} | {r['what']} | {r['single']:,.0f} | {r['redis_usec']:.0f} | "
            f"{r['concurrent']:,.0f} | {ratio:.2f}x | {used} |"
        )
    text = "\n".join(lines) + "\n"
    if base and sliding_log:
        text += (
            f"\nquotagate's memory is {base['memory'] / sliding_log['memory']:.3f} of the "
            f"sliding log's (`limits` moving window: {sliding_log['memory']:,} B).\n"
        )
    return text


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=1.5, help="per measurement")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--callers", type=int, default=64)
    parser.add_argument("--contenders", default=",".join(FACTORIES))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--cluster",
        action="store_true",
        help="only quotagate, on one node and on a three-master cluster",
    )
    args = parser.parse_args(argv)
    if args.cluster:
        return cluster_main(args)
    names = args.contenders.split(",")
    unknown = [n for n in names if n not in FACTORIES]
    if unknown:
        parser.error(f"unknown contender: {', '.join(unknown)}")
    load_before = os.getloadavg()[0]
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedServer())
        results = asyncio.run(measure(server.url, names, args.seconds, args.callers, args.rounds))
    text = table(results, args.callers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decisions.md").write_text(text)
    (args.out / "decisions.json").write_text(
        json.dumps(
            {
                "seconds": args.seconds,
                "callers": args.callers,
                "rounds": args.rounds,
                "load": [load_before, os.getloadavg()[0]],
                "results": results,
            },
            indent=1,
        )
    )
    print(
        f"{args.seconds:g} s per measurement, {args.rounds} rounds (means), "
        f"{args.callers} concurrent callers; load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after"
    )
    print(text)
    return results


def cluster_main(args: argparse.Namespace) -> list[dict[str, Any]]:
    from ..topologies import Cluster

    load_before = os.getloadavg()[0]
    with EmbeddedServer() as server:
        cluster = Cluster(server.binary)
        try:
            results = asyncio.run(
                measure_cluster(server.url, cluster.url, args.seconds, args.callers, args.rounds)
            )
        finally:
            cluster.stop()
    text = cluster_table(results, args.callers)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decisions-cluster.md").write_text(text)
    (args.out / "decisions-cluster.json").write_text(
        json.dumps(
            {
                "seconds": args.seconds,
                "callers": args.callers,
                "rounds": args.rounds,
                "load": [load_before, os.getloadavg()[0]],
                "results": results,
            },
            indent=1,
        )
    )
    print(
        f"{args.seconds:g} s per measurement, {args.rounds} rounds (means); load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after"
    )
    print(text)
    return results


if __name__ == "__main__":
    main()
