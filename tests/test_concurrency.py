"""Real concurrent processes against one server: no 1 s interval ever holds more than 20."""

from __future__ import annotations

import asyncio
import multiprocessing
import random

import pytest
from redis.asyncio import Redis

from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Engine, Grant
from quotagate.coordinator.policy import parse_policies

pytestmark = [pytest.mark.server, pytest.mark.slow]

# Fine buckets free the budget a little at a time, so every polling process gets its turn.
POLICY = "apis: {p: {limits: [{calls: 20, per: 1s, granularity: 10ms, margin: 0}]}}"
PROCESSES, ATTEMPTS = 8, 200


async def _worker(url: str, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    client = Redis.from_url(url)
    engine = Engine(client, parse_policies(POLICY))
    grants = []
    try:
        for _ in range(ATTEMPTS):
            cost = rng.randint(1, 3)
            result = await engine.acquire("contoso", "p", cost=cost)
            if isinstance(result, Grant):
                grants.append((result.granted_at_ms, cost))
                await asyncio.sleep(rng.uniform(0.01, 0.03))  # the call itself takes a while
                await engine.release(result.lease_id, "ok")
            else:
                # Back off up to the exact retry time, with jitter so workers interleave.
                await asyncio.sleep(min(result.retry_after_ms, 50) / 1000 * rng.random())
    finally:
        await client.aclose()
    return grants


def worker(args: tuple[str, int]) -> list[tuple[int, int]]:
    return asyncio.run(_worker(*args))


def test_processes_never_exceed_the_limit_together(redis_server: EmbeddedServer) -> None:
    with multiprocessing.get_context("spawn").Pool(PROCESSES) as pool:
        results = pool.map(worker, [(redis_server.url, seed) for seed in range(PROCESSES)])
    assert all(results), "every process is granted something"
    grants = sorted(g for per_process in results for g in per_process)
    assert sum(cost for _, cost in grants) > 20
    fullest = 0
    for start, _ in grants:
        in_window = sum(cost for at, cost in grants if start <= at < start + 1000)
        fullest = max(fullest, in_window)
    assert fullest <= 20, fullest
