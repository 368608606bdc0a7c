"""The benchmarks still run: each one's `main` with tiny parameters writes its table.

Measurements, not tests: nothing here looks at a figure."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from . import decisions, gateway_cpu, goodput, latency

pytestmark = [pytest.mark.slow, pytest.mark.server]


def test_goodput_runs(tmp_path: Path) -> None:
    results = goodput.main(
        ["--workers", "4", "--processes", "1", "--seconds", "1", "--out", str(tmp_path)]
    )
    assert [r["config"] for r in results] == list(goodput.CONFIGS)
    table = (tmp_path / "goodput.md").read_text()
    assert table.startswith("| configuration | upstream 429s |")
    assert all(f"| {config} |" in table for config in goodput.CONFIGS)
    assert (tmp_path / "goodput.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "goodput.json").exists()


def test_decisions_runs(tmp_path: Path) -> None:
    results = decisions.main(
        ["--seconds", "0.1", "--rounds", "1", "--callers", "4", "--out", str(tmp_path)]
    )
    assert [r["key"] for r in results] == list(decisions.FACTORIES)
    table = (tmp_path / "decisions.md").read_text()
    assert table.startswith("| contender | one decision |")
    assert "sliding log" in table


def test_latency_runs(tmp_path: Path) -> None:
    out = tmp_path / "latency.json"
    # This checkout's own client stands in for an older one.
    results = latency.main(
        [
            *("--calls", "5", "--json", str(out), "--before", str(latency.ROOT)),
            *("--throughput-seconds", "1", "--throughput-rounds", "1"),
        ]
    )
    modes = ["QuotaTransport", "AsyncQuotaTransport"]
    assert list(results["modes"]) == [
        latency.DIRECT,
        latency.ADIRECT,
        latency.GATEWAY,
        latency.BARE,
        latency.BARE_HTTPX,
        *modes,
        *(mode + latency.BEFORE for mode in modes),
    ]
    assert json.loads(out.read_text())["calls"] == 5
    assert all("p99_added_ms" in results["modes"][mode] for mode in modes)
    assert "p50_added_ms" in results["modes"][latency.GATEWAY]
    if shutil.which("wrk") is not None:
        assert results["throughput"]["ratio"] > 0
        assert results["throughput"]["pools_ratio"] > 0
        assert results["throughput"]["httpx_ratio"] > 0


def test_gateway_cpu_runs(tmp_path: Path) -> None:
    profile = tmp_path / "gateway.prof"
    args = ["--calls", "20", "--rounds", "1", "--concurrency", "4", "--profile", str(profile)]
    results = gateway_cpu.main(args)
    assert set(results) == {"gateway", "bare", "bare httpx"}
    assert profile.stat().st_size > 0
