"""What metrics and JSON logs cost a call: `latency.py`'s measurement, against two
coordinators at once, one with them on and one with them off.

    python -m tests.perf.metrics_cost [--calls 2000] [--access-log] [--json FILE]

Both coordinators run `quotagate serve` (uvicorn's auto stack) on one embedded Valkey:
`on` with `QUOTAGATE_METRICS=true QUOTAGATE_LOG_FORMAT=json` (and with `--access-log`, a
JSON access line per request), `off` with `QUOTAGATE_METRICS=false
QUOTAGATE_LOG_FORMAT=text`. The same caller goes round robin over direct calls to the
emulator and each transport against each coordinator, as `latency.py` does, so drift on
the machine hits every mode alike. The fleet index and the request id are on in both:
they are not a setting. Per transport: p50 and p99 of each coordinator, and on over off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import quotagate.client as current_client
from quotagate.coordinator.embedded import EmbeddedServer

from . import latency

DEFAULT_JSON = Path(__file__).parent / "results" / "metrics_cost.json"
ON = {"QUOTAGATE_METRICS": "true", "QUOTAGATE_LOG_FORMAT": "json"}
OFF = {"QUOTAGATE_METRICS": "false", "QUOTAGATE_LOG_FORMAT": "text"}
TRANSPORTS = ("QuotaTransport", "AsyncQuotaTransport")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="measured calls per mode")
    parser.add_argument("--access-log", action="store_true", help="JSON access lines too (on)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results file")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    with ExitStack() as stack, tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        policy_file = folder / "policies.yaml"
        policy_file.write_text(latency.POLICIES)
        store = stack.enter_context(EmbeddedServer())
        emulator = latency.uvicorn_args("tests.perf.latency:emulator_app", latency.PLAIN)
        emulator_url = stack.enter_context(
            latency.process(
                latency._UVICORN,
                emulator,
                "/_emulator/health",
                folder / "emulator.log",
                {latency.UPSTREAM_MS: "1"},
            )
        )
        serve = ["serve", "--port", "{port}", "--redis-url", store.url, "--policies"]
        serve.append(str(policy_file))
        # The gateway mode of latency.measure sends the gateway's calls on to the emulator.
        gateway = {"QUOTAGATE_GATEWAY_UPSTREAMS": json.dumps({latency.HOST: emulator_url})}
        on_env = {
            **ON,
            **gateway,
            "QUOTAGATE_ACCESS_LOG": "true" if args.access_log else "false",
        }
        urls = {
            "after": stack.enter_context(
                latency.process(latency._SERVE, serve, "/readyz", folder / "on.log", on_env)
            ),
            "before": stack.enter_context(
                latency.process(
                    latency._SERVE, serve, "/readyz", folder / "off.log", {**OFF, **gateway}
                )
            ),
        }
        started = time.monotonic()
        timings = asyncio.run(latency.measure(emulator_url, urls, current_client, args.calls, True))
        seconds = time.monotonic() - started
        logged = (folder / "on.log").read_text().splitlines()
    rows = latency.summarise(timings)
    renamed = {}
    for name, row in rows.items():
        renamed[name.replace(latency.BEFORE, ", off") if latency.BEFORE in name else name] = row
        if name in TRANSPORTS:
            renamed[f"{name}, on"] = renamed.pop(name)
    costs = {}
    for name in TRANSPORTS:
        on, off = renamed[f"{name}, on"], renamed[f"{name}, off"]
        costs[name] = {
            "p50_on_over_off": on["p50_ms"] / off["p50_ms"],
            "p99_on_over_off": on["p99_ms"] / off["p99_ms"],
        }
    results = {
        "calls": args.calls,
        "seconds": round(seconds, 1),
        "access_log": args.access_log,
        "json_lines_written": sum(line.startswith("{") for line in logged),
        "load_before": [round(x, 2) for x in load],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "modes": renamed,
        "cost": costs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(latency.table(renamed))
    for name, cost in costs.items():
        print(
            f"{name}: p50 on/off {cost['p50_on_over_off']:.3f}, "
            f"p99 on/off {cost['p99_on_over_off']:.3f}"
        )
    print(
        f"{args.calls} calls per mode in {seconds:.1f} s; load average "
        f"{results['load_before'][0]} before, {results['load_after'][0]} after; "
        f"{results['json_lines_written']} JSON lines from the `on` coordinator"
    )
    return results


if __name__ == "__main__":
    main()
