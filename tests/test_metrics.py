"""Operators see the fleet: /metrics, structured logs, the fleet index and its usage lists.

Counters are process-wide, so each test compares them before and after its own traffic.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from redis.asyncio import Redis

from quotagate.coordinator import logs, metrics
from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer, free_port
from quotagate.coordinator.engine import Grant
from quotagate.coordinator.index import is_index_key
from quotagate.coordinator.policy import load_policies
from quotagate.coordinator.settings import Settings

from .conftest import TEST_POLICIES, _wipe
from .service import serve_in_thread, wait_ready

pytestmark = pytest.mark.server

ADMIN = "admin-token-0123456789"
CONTOSO = "contoso-token-0123456789"
TOKENS = {ADMIN: ["*"], CONTOSO: ["contoso/*"]}
HANG = 10.0  # seconds: a background write slower than this is a hang


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


@contextmanager
def serve(tmp_path: Path, url: str, **settings: object) -> Iterator[str]:
    _wipe(url)
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(TEST_POLICIES)
    config = Settings(redis_url=url, policies=policy_file, max_wait=5.0, **settings)  # type: ignore[arg-type]
    with serve_in_thread(create_app(config)) as base:
        yield base


@pytest.fixture
def service(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    with serve(tmp_path, valkey_server.url, tokens=TOKENS) as base:
        yield base


@pytest.fixture
def captured(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """caplog on our loggers and uvicorn's themselves: `quotagate serve`'s configuration
    (run in-process by other tests) stops them from propagating to the root."""
    loggers = [logging.getLogger(name) for name in ("quotagate", "uvicorn.access")]
    saved = [(logger.level, logger.propagate) for logger in loggers]
    for logger in loggers:
        logger.addHandler(caplog.handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # else the root's capture sees each line twice
    yield caplog
    for logger, (level, propagate) in zip(loggers, saved, strict=True):
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
        logger.propagate = propagate


def as_admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def test_decisions_releases_and_pauses_are_counted_by_name(service: str) -> None:
    with httpx.Client(base_url=service, headers=as_admin()) as http:
        _decisions(http)


def _decisions(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    leases = []
    for _ in range(3):
        reply = http.post("/v1/leases", json={"tenant": "m/t1", "api": "single", "holder": "w1"})
        leases.append(reply)
    assert [r.status_code for r in leases] == [200, 429, 429]
    lease_id = leases[0].json()["lease_id"]
    released = http.post(
        f"/v1/leases/{lease_id}/release",
        json={"outcome": "throttled", "status_code": 429, "retry_after": 30},
    )
    assert released.status_code == 200
    paused = http.post("/v1/leases", json={"tenant": "m/t1", "api": "single"})
    assert paused.json()["error"] == "cooling_down"
    after = http.get("/metrics").text
    assert after.startswith("# HELP") or "quotagate_" in after

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    decided = {"api": "single", "tenant": "m/t1"}
    assert grew("quotagate_decisions_total", **decided, result="granted", reason="granted") == 1
    assert (
        grew("quotagate_decisions_total", **decided, result="denied", reason="quota_exhausted") == 2
    )
    assert grew("quotagate_decisions_total", **decided, result="denied", reason="cooling_down") == 1
    assert grew("quotagate_releases_total", **decided, outcome="throttled") == 1
    assert grew("quotagate_cooldowns_total", **decided) == 1
    assert grew("quotagate_wait_seconds_count", api="single") == 4
    assert value(after, "quotagate_cooldowns_active") == 1
    assert grew("quotagate_store_latency_seconds_count") >= 5
    for name in ("quotagate_store_errors_total", "quotagate_learned_limits"):
        assert f"# TYPE {name.removesuffix('_total')}" in after


def test_the_tenant_label_has_a_cap_and_can_be_turned_off(
    valkey_server: EmbeddedServer, tmp_path: Path
) -> None:
    for settings, expected in (
        ({"metrics_max_tenants": 1}, ["cap/a", "other", "other"]),
        ({"metrics_tenant_label": False}, ["all", "all", "all"]),
    ):
        with serve(tmp_path, valkey_server.url, **settings) as base:
            before = httpx.get(f"{base}/metrics").text
            for tenant in ("cap/a", "cap/b", "cap/c"):
                httpx.post(f"{base}/v1/leases", json={"tenant": tenant, "api": "fast"})
            after = httpx.get(f"{base}/metrics").text
            for label in set(expected):
                labels = {"api": "fast", "tenant": label, "result": "granted", "reason": "granted"}
                grown = value(after, "quotagate_decisions_total", **labels) - value(
                    before, "quotagate_decisions_total", **labels
                )
                assert grown == expected.count(label), (settings, label)
            assert 'tenant="cap/b"' not in after


def test_a_learned_limit_sets_its_gauge_and_logs_one_line(
    captured: pytest.LogCaptureFixture,
) -> None:
    metrics.configure(True, 10)
    with EmbeddedServer() as server:

        async def learn_and_forget() -> None:
            client = Redis.from_url(server.url)
            engine = metrics.MeteredEngine(client, load_policies())
            try:
                lease = await engine.acquire("c/app", "m365d.incidents")
                assert isinstance(lease, Grant)
                await engine.release(
                    lease.lease_id, "throttled", retry_after_ms=10, named=(40, 60_000)
                )
                text = metrics.exposition(None)[0].decode()
                assert value(text, "quotagate_learned_limits", **labels) == 40
                await engine.forget("c/app", "m365d.incidents")
            finally:
                await client.aclose()

        labels = {"api": "m365d.incidents", "tenant": "c/app", "kind": "calls", "window": "60"}
        asyncio.run(learn_and_forget())
    text = metrics.exposition(None)[0].decode()
    assert value(text, "quotagate_learned_limits", **labels) == 0
    learned = [r for r in captured.records if getattr(r, "event", "") == "learned_limit"]
    assert len(learned) == 1  # one line
    line = json.loads(logs.JsonFormatter().format(learned[0]))
    assert (line["event"], line["amount"], line["configured"]) == ("learned_limit", 40, 50)


def test_store_loss_and_recovery_are_counted_and_logged_once(
    tmp_path: Path, captured: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    store = EmbeddedServer(port=port, data_dir=tmp_path / "store").start()
    try:
        with serve(tmp_path, store.url, request_timeout=0.5) as base:
            acquire = {"tenant": "lost/t", "api": "fast"}
            assert httpx.post(f"{base}/v1/leases", json=acquire).status_code == 200
            before = httpx.get(f"{base}/metrics").text
            store.stop()
            captured.clear()
            for _ in range(3):
                assert httpx.post(f"{base}/v1/leases", json=acquire).status_code == 503
            store.start()
            assert httpx.post(f"{base}/v1/leases", json=acquire).status_code == 200
            after = httpx.get(f"{base}/metrics").text
            events = [getattr(r, "event", None) for r in captured.records]
            assert events.count("store_lost") == 1 and events.count("store_recovered") == 1
            errors = sum(
                v - samples(before).get(k, 0)
                for k, v in samples(after).items()
                if k[0] == "quotagate_store_errors_total"
            )
            assert errors >= 3
            assert value(after, "quotagate_store_errors_total", kind="connection") >= 1
    finally:
        store.stop()


def wait_for(check: object, timeout: float = HANG) -> None:
    """Poll a background write until it shows (a hang detector, not a timing check)."""
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "the background write did not come"
        time.sleep(0.05)


def test_usage_lists_active_tenants_and_tells_a_tenant_from_an_api(
    service: str, valkey_server: EmbeddedServer
) -> None:
    bearer = {"Authorization": f"Bearer {CONTOSO}"}
    with (
        httpx.Client(base_url=service, headers=as_admin()) as admin,
        httpx.Client(base_url=service, headers=bearer) as contoso,
    ):
        _lists(admin, contoso, redis.Redis.from_url(valkey_server.url))


def _lists(admin: httpx.Client, contoso: httpx.Client, store: redis.Redis) -> None:
    for tenant, api, key in (
        ("contoso/app-1", "fast", None),
        ("contoso/app-1", "m365d.incidents", None),
        ("contoso/app-2", "sessions", "m1"),
        ("fabrikam/app", "fast", None),
    ):
        body = {"tenant": tenant, "api": api, "key": key, "holder": f"{tenant}-worker"}
        assert admin.post("/v1/leases", json=body).status_code == 200

    everything = admin.get("/v1/usage").json()["items"]
    assert [(i["tenant"], i["api"], i["key"]) for i in everything] == [
        ("contoso/app-1", "fast", None),
        ("contoso/app-1", "m365d.incidents", None),
        ("contoso/app-2", "sessions", "m1"),
        ("fabrikam/app", "fast", None),
    ]
    assert {i["tenant"] for i in contoso.get("/v1/usage").json()["items"]} == {
        "contoso/app-1",
        "contoso/app-2",
    }
    tenant = contoso.get("/v1/usage/contoso/app-1")  # a tenant with a slash, no api
    assert tenant.status_code == 200
    assert [i["api"] for i in tenant.json()["items"]] == ["fast", "m365d.incidents"]
    slashed = contoso.get("/v1/usage/contoso/app-1/").json()["items"]
    assert [(i["tenant"], i["api"]) for i in slashed] == [
        ("contoso/app-1", "fast"),
        ("contoso/app-1", "m365d.incidents"),
    ]
    one = contoso.get("/v1/usage/contoso/app-1/m365d.incidents").json()
    assert (one["tenant"], one["api"], one["in_flight"]) == ("contoso/app-1", "m365d.incidents", 1)
    assert one["leases"][0]["holder"] == "contoso/app-1-worker"
    assert contoso.get("/v1/usage/fabrikam/app").status_code == 403
    assert contoso.get("/v1/usage/contoso/app-1/m365d.nothing").status_code == 404

    wait_for(lambda: store.zcard("qg:active") == 4)
    assert store.ttl("qg:active") > 0
    holders = store.hgetall("qg:holders:{contoso/app-1|m365d.incidents}")
    assert [json.loads(v)["holder"] for v in holders.values()] == ["contoso/app-1-worker"]
    assert store.pttl("qg:holders:{contoso/app-1|m365d.incidents}") > 0
    lease = admin.post("/v1/leases", json={"tenant": "fabrikam/app", "api": "fast"}).json()
    admin.post(f"/v1/leases/{lease['lease_id']}/release", json={"outcome": "ok"})
    wait_for(lambda: store.hlen("qg:holders:{fabrikam/app|fast}") == 1)


def test_json_lines_carry_the_fields_and_never_a_token(
    valkey_server: EmbeddedServer, tmp_path: Path, captured: pytest.LogCaptureFixture
) -> None:
    caplog = captured
    _wipe(valkey_server.url)
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(TEST_POLICIES)
    config = Settings(redis_url=valkey_server.url, policies=policy_file, tokens=TOKENS)
    app = create_app(config)
    with serve_in_thread(app, access_log=True, log_level="info", log_config=None) as base:
        headers = {**as_admin(), "X-Request-Id": "req-42"}
        with httpx.Client(base_url=base, headers=headers) as http:
            lease = http.post("/v1/leases", json={"tenant": "c/t", "api": "fast", "holder": "pb-7"})
            http.post(
                f"/v1/leases/{lease.json()['lease_id']}/release",
                json={"outcome": "throttled", "status_code": 429, "retry_after": 12},
            )
        assert lease.headers["x-request-id"] == "req-42"
        httpx.get(f"{base}/ui?token={ADMIN}", follow_redirects=False)
        httpx.get(f"{base}/v1/usage", headers={"Authorization": f"Bearer {ADMIN}"})
    assert caplog.records
    json_lines = [logs.JsonFormatter().format(r) for r in caplog.records]
    text_lines = [logs.TextFormatter().format(r) for r in caplog.records]
    for line in json_lines + text_lines:
        assert ADMIN not in line
    pause = next(json.loads(line) for line in json_lines if '"fleet_pause"' in line)
    assert {k: pause[k] for k in ("tenant", "api", "holder", "status", "retry_after")} == {
        "tenant": "c/t",
        "api": "fast",
        "holder": "pb-7",
        "status": 429,
        "retry_after": 12,
    }
    assert pause["level"] == "warning" and pause["request_id"] == "req-42"
    assert pause["lease"].endswith("…") and lease.json()["lease_id"] not in json.dumps(pause)
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$", pause["time"])
    assert any("token=***" in line for line in json_lines)
    released = next(line for line in text_lines if "/release" in line)
    assert lease.json()["lease_id"][-24:] not in released, "a lease id is cut to its prefix"


def test_mask_hides_tokens_and_authorization_values() -> None:
    assert logs.mask("GET /ui?token=abc123&x=1") == "GET /ui?token=***&x=1"
    assert "s3cret" not in logs.mask("headers {'authorization': 'Bearer s3cret'}")
    assert "s3cret" not in logs.mask("Authorization: Bearer s3cret")
    path = "POST /v1/leases/YWJj." + "0123abcd" * 4 + "/release"
    assert logs.mask(path) == "POST /v1/leases/YWJj.0123abcd…/release"


@pytest.mark.slow
def test_two_workers_add_up_their_metrics_and_write_json_lines(tmp_path: Path) -> None:
    """`quotagate serve --workers 2`: whichever worker answers /metrics counts both
    workers' decisions; values of an earlier run in the directory are not counted."""
    policy = tmp_path / "shared.yaml"
    policy.write_text("apis: {shared: {limits: [{calls: 3, per: 1m}]}}")
    stale = tmp_path / "data" / "metrics"
    stale.mkdir(parents=True)
    (stale / "counter_1.db").write_bytes(b"not a value file")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUOTAGATE_", "PROMETHEUS"))}
    env.update(QUOTAGATE_DATA_DIR=str(tmp_path / "data"), QUOTAGATE_LOG_FORMAT="json")
    args = ["--port", str(port), "--policies", str(policy), "--workers", "2", "--access-log"]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "quotagate.coordinator", "serve", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, alive=lambda: process.poll() is None)
        for _ in range(6):  # a new connection each time, so both workers take some
            httpx.post(f"{url}/v1/leases", json={"tenant": "t", "api": "shared"})
        labels = {"api": "shared", "tenant": "t"}
        answered: set[int] = set()
        deadline = time.monotonic() + 30
        while len(answered) < 2:
            assert time.monotonic() < deadline, "both workers answer /metrics"
            text = httpx.get(f"{url}/metrics").text
            counted = [
                value(text, "quotagate_decisions_total", **labels, result=result, reason=reason)
                for result, reason in (("granted", "granted"), ("denied", "quota_exhausted"))
            ]
            assert counted == [3, 3], text
            lines = [json.loads(line) for line in log.read_text().splitlines() if line[:1] == "{"]
            answered = {
                line["pid"]
                for line in lines
                if line["logger"] == "uvicorn.access" and "/metrics" in line["message"]
            }
        assert all({"time", "level", "event", "message", "pid"} <= line.keys() for line in lines)
    finally:
        process.terminate()
        assert process.wait(30) == 0, log.read_text()


def test_usage_with_no_arguments_lists_every_active_tenant(service: str) -> None:
    from typer.testing import CliRunner

    from quotagate.coordinator.cli import app

    for tenant, api in (("contoso/a", "fast"), ("contoso/a", "sessions"), ("fabrikam/b", "fast")):
        body = {"tenant": tenant, "api": api, "key": "m1" if api == "sessions" else None}
        httpx.post(f"{service}/v1/leases", json=body, headers=as_admin())
    runner = CliRunner()
    every = runner.invoke(app, ["usage", "--url", service, "--token", ADMIN])
    assert every.exit_code == 0, every.output
    assert "== contoso/a" in every.output and "== fabrikam/b" in every.output
    assert "sessions [m1]  in flight 1" in every.output
    one = runner.invoke(app, ["usage", "contoso/a", "--url", service, "--token", CONTOSO])
    assert one.exit_code == 0, one.output
    assert "fast  in flight 1" in one.output and "fabrikam" not in one.output


def test_usage_watch_is_a_live_table(service: str) -> None:
    httpx.post(
        f"{service}/v1/leases", json={"tenant": "watch/t", "api": "fast"}, headers=as_admin()
    )
    # A pipe that rich treats as a terminal, so that each update is written.
    terminal = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "COLUMNS": "160"}
    env = {**os.environ, **terminal, "QUOTAGATE_TOKEN": ADMIN}
    command = [sys.executable, "-m", "quotagate.coordinator", "usage", "--watch"]
    process = subprocess.Popen(
        [*command, "--url", service, "--interval", "0.2"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + HANG
    try:
        while b"watch/t" not in seen or seen.count(b"quotagate usage") < 2:
            assert time.monotonic() < deadline, seen.decode(errors="replace")
            if select.select([process.stdout], [], [], 0.1)[0]:
                seen += process.stdout.read1(4096)
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(HANG) == 0
        process.stdout.close()
    text = seen.decode(errors="replace")
    assert "20 calls / 1 s" in text and "in flight" in text


async def test_refused_requests_leave_no_note_in_the_fleet_index(
    valkey_server: EmbeddedServer, tmp_path: Path
) -> None:
    """The index records only what the engine accepted: a 422, 403 or 404 writes nothing,
    neither quota state nor the index (which test_hostile's snapshots leave out)."""
    _wipe(valkey_server.url)
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(TEST_POLICIES)
    settings = Settings(redis_url=valkey_server.url, policies=policy_file, tokens=TOKENS)
    app = create_app(settings)
    store = redis.Redis.from_url(valkey_server.url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        headers = {"Authorization": f"Bearer {CONTOSO}"}
        async with httpx.AsyncClient(
            transport=transport, base_url="http://qg", headers=headers
        ) as http:
            for body, status in (
                ({"tenant": "contoso/a", "api": "fast", "cost": 0}, 422),
                ({"tenant": "fabrikam/a", "api": "fast"}, 403),
                ({"tenant": "contoso/a", "api": "m365d.nothing"}, 404),
                ({"tenant": "contoso/{a}", "api": "fast"}, 422),
            ):
                assert (await http.post("/v1/leases", json=body)).status_code == status
            await app.state.index.flush()
            assert [key for key in store.keys("*") if is_index_key(key)] == []
            granted = await http.post("/v1/leases", json={"tenant": "contoso/a", "api": "fast"})
            assert granted.status_code == 200
            await app.state.index.flush()
            noted = sorted(key for key in store.keys("*") if is_index_key(key))
            assert noted == [b"qg:active", b"qg:holders:{contoso/a|fast}"]
    store.close()


@pytest.mark.slow
def test_the_metrics_cost_benchmark_runs(tmp_path: Path) -> None:
    from .perf import metrics_cost

    out = tmp_path / "metrics_cost.json"
    results = metrics_cost.main(["--calls", "5", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    assert set(results["cost"]) == {"QuotaTransport", "AsyncQuotaTransport"}
    assert {"QuotaTransport, on", "QuotaTransport, off"} <= results["modes"].keys()
