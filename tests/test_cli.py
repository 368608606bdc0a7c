"""The `quotagate` command line."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
import pytest
import typer
import typer.main
import yaml
from pydantic import Field, SecretStr
from typer.testing import CliRunner

from quotagate.coordinator.cli import app, settings_flags, settings_from_flags
from quotagate.coordinator.embedded import free_port
from quotagate.coordinator.settings import Settings, env_names

from .service import wait_ready

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "policies"
runner = CliRunner()


def test_every_setting_is_a_flag_that_names_its_variables_and_default() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    for name, field in Settings.model_fields.items():
        assert re.search(rf"--{name.replace('_', '-')}\b", result.output), name
        for variable in env_names(name):
            assert variable in result.output, variable
        default = field.get_default(call_default_factory=True)
        if isinstance(default, bool):
            shown = ("" if default else "no-") + name.replace("_", "-")
            assert f"[default: {shown}]" in result.output, name
        elif isinstance(default, str | int | float | Path):
            assert f"[default: {default}]" in result.output, name
    assert "QUOTAGATE_WORKERS, WEB_CONCURRENCY" in result.output


def serve_settings(args: list[str]) -> Settings:
    """The settings `serve ARGS` would run with, parsed as the command parses them."""
    group = typer.main.get_command(app)
    command = group.commands["serve"]  # type: ignore[attr-defined]
    with command.make_context("serve", args) as ctx:
        return settings_from_flags(ctx, ctx.params)


def test_a_flag_wins_over_the_environment_and_token_maps_merge(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("QUOTAGATE_MAX_WAIT", "7")
    monkeypatch.setenv("QUOTAGATE_PORT", "9000")
    monkeypatch.setenv("QUOTAGATE_TOKENS", '{"a-token-of-16-chars": ["c/*"]}')
    settings = serve_settings(["--port", "9001", "--access-log", "--http", "h11"])
    assert (settings.port, settings.max_wait, settings.access_log) == (9001, 7, True)
    assert settings.tokens == {"a-token-of-16-chars": ["c/*"]}
    assert settings.http == "h11" and settings.loop == "auto"
    assert serve_settings(["--port", "8080"]).port == 8080  # given, though the default
    monkeypatch.setenv("quotagate_max_body_bytes", "1234")  # the model reads any case
    assert serve_settings([]).max_body_bytes == 1234
    both = serve_settings(["--tokens", '{"another-token-16-chars": ["*"]}'])
    assert both.tokens == {"a-token-of-16-chars": ["c/*"], "another-token-16-chars": ["*"]}


def test_web_concurrency_sets_the_workers_and_quotagate_workers_wins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QUOTAGATE_WORKERS", raising=False)
    monkeypatch.setenv("WEB_CONCURRENCY", "3")
    assert Settings().workers == 3 and serve_settings([]).workers == 3
    monkeypatch.setenv("QUOTAGATE_WORKERS", "2")
    assert Settings().workers == 2 and serve_settings([]).workers == 2
    assert serve_settings(["--workers", "4"]).workers == 4


def test_the_environment_carries_every_setting_to_another_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What a worker process reads back equals what the parent had, field by field."""
    for name in Settings.model_fields:
        for variable in env_names(name):
            monkeypatch.delenv(variable, raising=False)
    changed = Settings(
        host="0.0.0.0",
        port=9123,
        workers=3,
        redis_url="redis://127.0.0.1:7000/1",
        policies=tmp_path / "p.yaml",
        data_dir=tmp_path,
        tokens={"a-token-of-16-chars": ["contoso/*", "fabrikam/*"]},
        max_wait=2.5,
        access_log=True,
        recover_on_start=True,
        embedded=True,
        loop="asyncio",
        http="h11",
    )
    for settings in (Settings(), changed):
        for variable, value in settings.environment().items():
            if value is None:
                monkeypatch.delenv(variable, raising=False)
            else:
                monkeypatch.setenv(variable, value)
        assert Settings() == settings


def test_auto_takes_uvicorns_fast_stack_when_installed_and_a_missing_one_is_refused() -> None:
    from quotagate.coordinator.cli import _stack_choice

    installed = importlib.util.find_spec("uvloop") is not None
    assert _stack_choice("auto", "uvloop", "asyncio", "--loop") == (
        "uvloop" if installed else "asyncio"
    )
    assert _stack_choice("auto", "not_installed_here", "h11", "--http") == "h11"
    assert _stack_choice("h11", "httptools", "h11", "--http") == "h11"
    with pytest.raises(typer.Exit):
        _stack_choice("not_installed_here", "not_installed_here", "h11", "--http")


class Later(Settings):
    """Fields of kinds the settings may gain later."""

    log_format: Literal["json", "text"] = Field("text", description="log lines")
    upstreams: dict[str, str] = Field({}, description="host -> base URL")
    metric_tenants: list[str] = Field([], description="tenants with their own label")
    tenant_cap: int | None = Field(None, description="distinct tenant labels at most")
    pause: timedelta = Field(timedelta(seconds=5), description="a pause")
    secret: SecretStr = Field(SecretStr("0123456789abcdef"), description="a secret")


def test_fields_added_later_get_flags_and_reach_a_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def command(ctx: typer.Context, **flags: Any) -> None:
        seen.append(settings_from_flags(ctx, flags, Later))

    seen: list[Settings] = []
    later = typer.Typer()
    later.command()(settings_flags(command, Later))
    result = runner.invoke(later, ["--help"], env={"COLUMNS": "250"})
    for flag in ("--log-format", "--upstreams", "--metric-tenants", "--tenant-cap", "--pause"):
        assert flag in result.output, flag
    assert "QUOTAGATE_UPSTREAMS" in result.output and "[default: text]" in result.output
    monkeypatch.setenv("QUOTAGATE_METRIC_TENANTS", '["contoso"]')
    args = ["--log-format", "json", "--upstreams", '{"a.example": "http://127.0.0.1:1"}']
    args += ["--tenant-cap", "5", "--pause", "PT2S", "--secret", "fedcba9876543210"]
    result = runner.invoke(later, args)
    assert result.exit_code == 0, result.output
    (settings,) = seen
    assert isinstance(settings, Later)
    assert (settings.log_format, settings.tenant_cap, settings.pause) == (
        "json",
        5,
        timedelta(seconds=2),
    )
    assert settings.upstreams == {"a.example": "http://127.0.0.1:1"}
    assert settings.metric_tenants == ["contoso"]
    for variable, value in settings.environment().items():
        if value is None:
            monkeypatch.delenv(variable, raising=False)
        else:
            monkeypatch.setenv(variable, value)
    assert Later() == settings
    assert Later().secret.get_secret_value() == "fedcba9876543210"


def test_version_comes_from_the_installed_distribution() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"quotagate {importlib.metadata.version('quotagate')}"


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


def test_a_bad_setting_is_named_by_its_flag_and_variables_and_a_token_is_not_shown() -> None:
    result = runner.invoke(app, ["serve"], env={"WEB_CONCURRENCY": "0"})
    assert result.exit_code == 2
    assert "--workers (QUOTAGATE_WORKERS, WEB_CONCURRENCY)" in result.output
    token = "short-secret"
    result = runner.invoke(app, ["serve", "--tokens", f'{{"{token}": ["*"]}}'])
    assert result.exit_code == 2 and "--tokens (QUOTAGATE_TOKENS)" in result.output
    assert "16 characters" in result.output and token not in result.output
    result = runner.invoke(app, ["serve", "--tokens", f'{{"{token}": '])
    assert result.exit_code == 2 and "--tokens" in result.output and token not in result.output


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


def children(pid: int) -> dict[int, str]:
    """The processes whose parent is `pid`, with their command lines."""
    found = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found[int(stat.parent.name)] = (stat.parent / "cmdline").read_text()
        except (OSError, IndexError):
            continue  # gone meanwhile
    return found


SHARED = "apis: {shared: {limits: [{calls: 3, per: 1m}]}}"


@pytest.fixture(params=["--workers", "WEB_CONCURRENCY"])
def two_workers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """`quotagate serve` with two worker processes and no Redis URL; yields its URL and
    its log file."""
    policy = tmp_path / "shared.yaml"
    policy.write_text(SHARED)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_DATA_DIR"] = str(tmp_path / "data")
    args = ["--port", str(port), "--policies", str(policy), "--access-log"]
    if request.param == "--workers":
        args += ["--workers", "2"]
    else:
        env["WEB_CONCURRENCY"] = "2"
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotagate.coordinator", "serve", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    started: list[int] = []
    try:
        wait_ready(url, 60, alive=lambda: process.poll() is None)
        found = children(process.pid)
        servers = [pid for pid, cmd in found.items() if "valkey-server" in cmd]
        workers = [pid for pid, cmd in found.items() if "spawn_main" in cmd]
        assert len(servers) == 1 and len(workers) == 2, found
        started = servers + workers
        yield url, log
    finally:
        process.terminate()
        assert process.wait(30) == 0, log.read_text()
    alive = [pid for pid in started if Path(f"/proc/{pid}").exists()]
    assert not alive, "the workers and the embedded server end (and are reaped) with it"


@pytest.mark.slow
def test_serve_runs_two_workers_on_one_embedded_server(two_workers: tuple[str, Path]) -> None:
    url, log = two_workers
    granted = 0
    for _ in range(6):  # a new connection each time, so both workers take some
        reply = httpx.post(f"{url}/v1/leases", json={"tenant": "t", "api": "shared"})
        granted += reply.status_code == 200
    assert granted == 3, "both workers count against the one store"
    answered: set[str] = set()
    deadline = time.monotonic() + 30
    while len(answered) < 2 and time.monotonic() < deadline:
        assert httpx.get(f"{url}/readyz").status_code == 200
        answered = set(
            re.findall(r"\[(\d+)\] INFO uvicorn\.access: .*(?:readyz|leases)", log.read_text())
        )
    assert len(answered) == 2, "each of the two worker processes answers"
    text = log.read_text()
    assert "2 workers" in text and text.count("Application startup complete") == 2
    if importlib.util.find_spec("uvloop") and importlib.util.find_spec("httptools"):
        assert "loop uvloop, http httptools" in text


@pytest.mark.slow
def test_a_client_only_install_names_the_extra_to_install(tmp_path: Path) -> None:
    """`pip install quotagate` (httpx alone): the client imports, the script says what to
    install for the command line."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("coordinator", "client", "lua"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet"]
    subprocess.run([*pip, "--no-deps", str(source)], check=True, capture_output=True)
    subprocess.run([*pip, "httpx"], check=True, capture_output=True)
    subprocess.run([str(python), "-c", "import quotagate.client"], check=True)
    for args in (["serve"], ["--version"], []):
        result = subprocess.run(
            [str(venv / "bin" / "quotagate"), *args], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 1, result
        assert "pip install 'quotagate[server]'" in result.stderr
        assert "Traceback" not in result.stderr


def test_usage_marks_a_learned_limit_and_forget_forgets_it(coordinator_url: str) -> None:
    lease = httpx.post(f"{coordinator_url}/v1/leases", json={"tenant": "c/app", "api": "fast"})
    lease_id = lease.json()["lease_id"]
    body = {"outcome": "throttled", "retry_after": 0.01, "limit": {"amount": 9, "window": 1}}
    assert httpx.post(f"{coordinator_url}/v1/leases/{lease_id}/release", json=body).is_success
    result = runner.invoke(app, ["usage", "c/app", "fast", "--url", coordinator_url])
    assert result.exit_code == 0, result.output
    assert "9 calls / 1 s (learned; policy 20)" in result.output
    forgot = runner.invoke(app, ["forget", "c/app", "fast", "--url", coordinator_url])
    assert forgot.exit_code == 0, forgot.output
    assert "1 learned limit(s) forgotten" in forgot.output
    result = runner.invoke(app, ["usage", "c/app", "fast", "--url", coordinator_url])
    assert "20 calls / 1 s" in result.output and "learned" not in result.output


TOKEN = '{"a-token-of-16-chars": ["*"]}'


def test_serve_refuses_a_public_address_without_a_store_unless_embedded_is_asked_for() -> None:
    from quotagate.coordinator.cli import _refuse_unsafe

    result = runner.invoke(app, ["serve", "--host", "0.0.0.0", "--tokens", TOKEN])
    assert result.exit_code == 2
    assert "refusing to listen on 0.0.0.0 without a store URL" in result.output
    for way_out in ("QUOTAGATE_REDIS_URL", "--redis-url", "--embedded", "QUOTAGATE_EMBEDDED"):
        assert way_out in result.output, way_out
    both = ["serve", "--embedded", "--redis-url", "redis://127.0.0.1:1/0", "--tokens", TOKEN]
    result = runner.invoke(app, both)
    assert result.exit_code == 2 and "not both" in result.output
    tokens = {"a-token-of-16-chars": ["*"]}
    for allowed in (
        Settings(host="0.0.0.0", embedded=True, tokens=tokens),
        Settings(host="0.0.0.0", redis_url="redis://store:6379/0", tokens=tokens),
        Settings(host="127.0.0.1"),  # loopback: the embedded server, as before
    ):
        _refuse_unsafe(allowed, allowed.all_tokens())  # does not raise
    assert serve_settings(["--embedded"]).embedded


def test_the_manifests_placeholders_are_refused_at_start(tmp_path: Path) -> None:
    secrets = ROOT / "deploy" / "kubernetes" / "base" / "secrets.yaml"
    tokens = next(d for d in yaml.safe_load_all(secrets.read_text()) if d["kind"] == "Secret")
    tokens_file = tmp_path / "tokens.yaml"
    tokens_file.write_text(tokens["stringData"]["tokens.yaml"])
    (placeholder,) = yaml.safe_load(tokens_file.read_text())
    result = runner.invoke(app, ["serve", "--tokens-file", str(tokens_file)])
    assert result.exit_code == 2
    assert "placeholder 'change-me'" in result.output and "replace it" in result.output
    assert f"--tokens-file {tokens_file}" in result.output and placeholder not in result.output

    url = "redis+sentinel://:change-me-password@quotagate-redis-0.quotagate-redis:26379/quotagate"
    result = runner.invoke(
        app,
        ["serve", "--redis-url", url],
        env={"QUOTAGATE_TOKENS": '{"CHANGE-ME-0123456789": ["*"]}'},
    )
    assert result.exit_code == 2
    assert "--redis-url (QUOTAGATE_REDIS_URL)" in result.output
    assert "a token of --tokens (QUOTAGATE_TOKENS)" in result.output
    real = Settings(redis_url="redis://:3f9c0a1b@store:6379/0", tokens={"0123456789abcdef0": ["*"]})
    assert real.placeholders() == []


@pytest.mark.slow
def test_one_worker_stops_its_embedded_server_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUOTAGATE_")}
    env["QUOTAGATE_DATA_DIR"] = str(tmp_path / "data")
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotagate.coordinator", "serve", "--port", str(port)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_ready(f"http://127.0.0.1:{port}", 60, alive=lambda: process.poll() is None)
        servers = [pid for pid, cmd in children(process.pid).items() if "valkey-server" in cmd]
        assert len(servers) == 1
    finally:
        process.terminate()
        code = process.wait(30)
    assert code == 0, log.read_text()
    assert not Path(f"/proc/{servers[0]}").exists(), "the embedded server ends with it"
