"""Priority classes under load: interactive requests while batch saturates the api, or
batch requests while interactive saturates it.

    python -m tests.perf.line_priority [--seconds 20] [--batch 16] [--interactive 2]
    python -m tests.perf.line_priority --saturating interactive [--seconds 20]

One coordinator process on one Valkey; the api grants 50 calls per 5 s, with classes
`interactive` (the whole limit) and `batch` (share 0.8, the default class), and the
default aging (10.2 s: two spans of the window; `--aging` sets another). The saturating
class's workers (`--saturating batch`: 16 batch workers; `interactive`: 64 interactive
ones, more than the limit's 50) take a lease after another (wait 10 s) and release it
at once; the other class's workers (2 by default) take one every 0.5 s
(`--saturating interactive`: one after another, so batch asks all the time). It
reports each class's wait (p50, p95, max, from asking to the grant), the grants per
class, the share of the budget each got, batch's grants per window (also after the
first two windows, once the saturating class has filled the limit) and the longest gap
between two batch grants. Goals: interactive p95 <= 0.5 s while batch saturates, and
batch gets what interactive leaves; while interactive saturates, batch still gets
grants (aging: one per aging, once room comes).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
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
# Saturating workers per class. Interactive, the class with the whole limit, needs more
# waiters than the limit's amount: when a bucket leaves the window, the room it makes
# must never exceed their demand, or a lower class fits in beside them (not starving).
SATURATING = {"batch": 16, "interactive": 64}


def coordinator_app(redis_url: str, aging: str | None = None) -> Any:
    from quotagate.coordinator.app import create_app
    from quotagate.coordinator.policy import parse_policies
    from quotagate.coordinator.settings import Settings

    settings = Settings(redis_url=redis_url, max_wait=30.0)
    text = POLICIES
    if aging is not None:
        text = text.replace("    limits:", f"    aging: {aging}\n    limits:")
    return create_app(settings, policies=parse_policies(text, "<priority>"))


async def _run(
    url: str, seconds: float, batch: int, interactive: int, saturating: str = "batch"
) -> dict[str, Any]:
    start = time.monotonic()
    deadline = start + seconds
    batch_at: list[float] = []  # when each batch grant came, from the start
    waits: dict[str, list[float]] = {"batch": [], "interactive": []}
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
            waits[priority].append(time.monotonic() - asked)
            if priority == "batch":
                batch_at.append(time.monotonic() - start)
            grants[priority] += 1
            await client.release(lease, "ok")
            if gap:
                await asyncio.sleep(max(asked + gap - time.monotonic(), 0))

    other_gap = 0.5 if saturating == "batch" else 0.0
    async with AsyncQuotaClient(url, "bench") as client:
        await client.usage("search")
        await asyncio.gather(
            *(
                worker(client, "batch", 0.0 if saturating == "batch" else other_gap)
                for _ in range(batch)
            ),
            *(
                worker(client, "interactive", 0.0 if saturating == "interactive" else other_gap)
                for _ in range(interactive)
            ),
        )
    budget = AMOUNT * seconds / WINDOW
    return {
        "saturating": saturating,
        **{
            f"{name}_{label}": percentile(found, q) if found else None
            for name, found in waits.items()
            for label, q in (("p50", 50), ("p95", 95), ("max", 100))
        },
        "grants": grants,
        "denied": denied,
        "share_of_budget": {k: v / budget for k, v in grants.items()},
        "batch_per_window": grants["batch"] * WINDOW / seconds,
        # After the first two windows, when the saturating class has filled the limit.
        "batch_per_window_steady": sum(at >= 2 * WINDOW for at in batch_at)
        * WINDOW
        / max(seconds - 2 * WINDOW, WINDOW),
        "batch_gaps_max": max((b - a for a, b in itertools.pairwise(batch_at)), default=None),
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--saturating", choices=("batch", "interactive"), default="batch")
    parser.add_argument("--aging", default=None, help="the api's aging (default: derived)")
    parser.add_argument("--batch", type=int, default=None, help="16 saturating, else 2")
    parser.add_argument("--interactive", type=int, default=None, help="64 saturating, else 2")
    args = parser.parse_args(argv)
    for name in ("batch", "interactive"):
        if getattr(args, name) is None:
            setattr(args, name, SATURATING[name] if args.saturating == name else 2)
    with ExitStack() as stack:
        server = stack.enter_context(EmbeddedServer())
        url = stack.enter_context(
            app_process(
                coordinator_app,
                health="/healthz",
                lifetime=args.seconds + 60,
                redis_url=server.url,
                aging=args.aging,
            )
        )
        result = asyncio.run(_run(url, args.seconds, args.batch, args.interactive, args.saturating))
    waits = "; ".join(
        f"{name} wait p50 {_ms(result[f'{name}_p50'])}, p95 {_ms(result[f'{name}_p95'])}, "
        f"max {_ms(result[f'{name}_max'])}"
        for name in ("interactive", "batch")
    )
    print(
        f"{args.batch} batch and {args.interactive} interactive workers, {args.saturating} "
        f"saturating, {args.seconds:g} s, load average {os.getloadavg()[0]:.2f}: {waits}; "
        f"grants {result['grants']}, denied {result['denied']}; batch "
        f"{result['batch_per_window']:.1f} grants per {WINDOW:g} s window "
        f"({result['batch_per_window_steady']:.1f} after the first two), longest gap "
        f"{_ms(result['batch_gaps_max'])}; share of the budget "
        + ", ".join(f"{k} {100 * v:.0f} %" for k, v in result["share_of_budget"].items()),
        file=sys.stdout,
    )
    return result


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.0f} ms"


if __name__ == "__main__":
    main()
