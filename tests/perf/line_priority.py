"""Priority classes under load: interactive requests while batch saturates the api.

    python -m tests.perf.line_priority [--seconds 20] [--batch 16] [--interactive 2]

One coordinator process on one Valkey; the api grants 50 calls per 5 s, with classes
`interactive` (the whole limit) and `batch` (share 0.8, the default class). `--batch`
workers take a lease after another (wait 10 s) and release it at once; `--interactive`
workers take one every 0.5 s with priority `interactive`. It reports the interactive
wait (p50, p95, from asking to the grant), the grants per class and the share of the
budget each class got. Goal: interactive p95 <= 0.5 s while batch still gets its share.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from quotagate.client import AsyncQuotaClient, QuotaExhausted
from quotagate.coordinator.embedded import EmbeddedServer

from .harness import app_process, percentile

POLICIES = """
margin: 0
apis:
  search:
    classes: {interactive: {}, batch: {share: 0.8}}
    default_class: batch
    limits: [{calls: 50, per: 5s, granularity: 100ms}]
"""
AMOUNT, WINDOW = 50, 5.0


def coordinator_app(redis_url: str) -> Any:
    from quotagate.coordinator.app import create_app
    from quotagate.coordinator.policy import parse_policies
    from quotagate.coordinator.settings import Settings

    settings = Settings(redis_url=redis_url, max_wait=30.0)
    return create_app(settings, policies=parse_policies(POLICIES, "<priority>"))


async def _run(url: str, seconds: float, batch: int, interactive: int) -> dict[str, Any]:
    deadline = time.monotonic() + seconds
    waits: list[float] = []
    grants = {"batch": 0, "interactive": 0}
    denied = {"batch": 0, "interactive": 0}

    async def worker(client: AsyncQuotaClient, priority: str, gap: float) -> None:
        while time.monotonic() < deadline:
            asked = time.monotonic()
            try:
                lease = await client.acquire("search", wait=10.0, priority=priority)
            except QuotaExhausted:
                denied[priority] += 1
                continue
            if priority == "interactive":
                waits.append(time.monotonic() - asked)
            grants[priority] += 1
            await client.release(lease, "ok")
            if gap:
                await asyncio.sleep(max(asked + gap - time.monotonic(), 0))

    async with AsyncQuotaClient(url, "bench") as client:
        await client.usage("search")
        await asyncio.gather(
            *(worker(client, "batch", 0.0) for _ in range(batch)),
            *(worker(client, "interactive", 0.5) for _ in range(interactive)),
        )
    budget = AMOUNT * seconds / WINDOW
    return {
        "interactive_p50": percentile(waits, 50),
        "interactive_p95": percentile(waits, 95),
        "grants": grants,
        "denied": denied,
        "share_of_budget": {k: v / budget for k, v in grants.items()},
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--interactive", type=int, default=2)
    args = parser.parse_args(argv)
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedServer())
        url = stack.enter_context(
            app_process(
                coordinator_app,
                health="/healthz",
                lifetime=args.seconds + 60,
                redis_url=server.url,
            )
        )
        result = asyncio.run(_run(url, args.seconds, args.batch, args.interactive))
    print(
        f"{args.batch} batch and {args.interactive} interactive workers, {args.seconds:g} s: "
        f"interactive wait p50 {1000 * result['interactive_p50']:.0f} ms, p95 "
        f"{1000 * result['interactive_p95']:.0f} ms; grants {result['grants']}; share of "
        "the budget "
        + ", ".join(f"{k} {100 * v:.0f} %" for k, v in result["share_of_budget"].items()),
        file=sys.stdout,
    )
    return result


if __name__ == "__main__":
    main()
