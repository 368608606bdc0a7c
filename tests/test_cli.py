"""The `quotagate` command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from quotagate.coordinator.cli import app

FIXTURES = Path(__file__).parent / "fixtures" / "policies"
runner = CliRunner()


def test_policies_prints_the_catalog() -> None:
    result = runner.invoke(app, ["policies"])
    assert result.exit_code == 0
    assert "m365d.incidents" in result.output and "50 calls / 60 s" in result.output


def test_policies_check_accepts_a_good_file_and_names_the_place_in_a_bad_one() -> None:
    good = runner.invoke(app, ["policies", "--check", str(FIXTURES / "valid.yaml")])
    assert good.exit_code == 0 and "ok" in good.output
    bad = runner.invoke(app, ["policies", "--check", str(FIXTURES / "bad_duration.yaml")])
    assert bad.exit_code == 2
    assert "bad_duration.yaml" in bad.output and "per" in bad.output


def test_policies_json() -> None:
    result = runner.invoke(app, ["policies", "--json"])
    assert result.exit_code == 0 and '"m365d.advanced-hunting"' in result.output


def test_serve_refuses_a_public_address_without_tokens() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "quotagate.coordinator", "serve", "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "", "HOME": "/nonexistent"},
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0 without tokens" in result.stderr
    assert "QUOTAGATE_TOKENS" in result.stderr and "--tokens-file" in result.stderr


def test_serve_refuses_a_bad_policy_file() -> None:
    result = runner.invoke(app, ["serve", "--policies", str(FIXTURES / "negative_amount.yaml")])
    assert result.exit_code == 2
    assert "negative_amount.yaml" in result.output


@pytest.mark.server
def test_usage_prints_bars(coordinator_url: str) -> None:
    for _ in range(5):
        httpx.post(f"{coordinator_url}/v1/leases", json={"tenant": "c/app", "api": "fast"})
    result = runner.invoke(app, ["usage", "c/app", "fast", "--url", coordinator_url])
    assert result.exit_code == 0, result.output
    assert "fast  in flight 5" in result.output
    assert "[#####..............." in result.output  # 5 of 20
    unreachable = runner.invoke(app, ["usage", "c/app", "--url", "http://127.0.0.1:1"])
    assert unreachable.exit_code == 2 and "cannot reach" in unreachable.output


def test_the_client_needs_httpx_alone() -> None:
    """`pip install quotagate` without extras gives a working client."""
    probe = (
        "import sys, quotagate.client; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'redis', 'fastapi', 'starlette', 'pydantic', 'yaml', 'typer', 'uvicorn'}))"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    pyproject = (Path(__file__).parent.parent / "pyproject.toml").read_text()
    assert 'dependencies = ["httpx>=0.27"]' in pyproject
