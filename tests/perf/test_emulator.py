"""The Defender emulator in virtual time: exact windows counted at arrival, every attempt
counted, run-time budgets, the quoted 429 bodies, the time scale, what a test scripts, and
the catalog's figures (coordinator/defender.md)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from quotagate.client import execution_time, parse_throttle
from quotagate.coordinator.policy import Kind, Scope, load_catalog

from ..emulator import (
    DEFENDER_ENDPOINTS,
    DefenderEmulator,
    Endpoint,
    Throttler,
    clock_text,
    path_template,
    seconds_text,
)

CONTOSO = {"Authorization": "Bearer contoso-app1"}
FABRIKAM = {"Authorization": "Bearer fabrikam-app2"}


class VirtualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Answers come at once; the clock moves only when a test moves it."""


@pytest.fixture
def clock() -> VirtualClock:
    return VirtualClock()


def emulator_at(clock: VirtualClock, speed: float = 1.0) -> DefenderEmulator:
    return DefenderEmulator(speed=speed, clock=clock, sleep=clock.sleep)


async def client_of(emulator: DefenderEmulator) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://emulator") as http:
        yield http


@pytest.fixture
async def http(clock: VirtualClock) -> AsyncIterator[httpx.AsyncClient]:
    async for client in client_of(emulator_at(clock)):
        yield client


def test_texts() -> None:
    assert clock_text(60) == "00:01:00"
    assert clock_text(3600 + 61) == "01:01:01"
    assert clock_text(0.617) == "00:00:00.617"
    assert clock_text(1.5) == "00:00:01.5"
    assert seconds_text(8) == "8"
    assert seconds_text(8 / 60) == "0.134"
    assert path_template("/api/machines/1e5bc9d7e413ddd7902c2932e418702b84d0cc07/alerts") == (
        "/api/machines/{id}/alerts"
    )


async def test_calls_window_is_exact_and_counts_at_arrival(
    http: httpx.AsyncClient, clock: VirtualClock
) -> None:
    for i in range(50):
        clock.now = 1000.0 + i  # one a second: 50 in the minute
        assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200
    clock.now = 1059.5
    throttled = await http.get("/api/incidents", headers=CONTOSO)
    assert throttled.status_code == 429
    # The first arrival (1000) leaves at 1060; with this attempt counted, the window
    # holds 50 until the second (1001) leaves too: at 1061, 1.5 s from now, rounded up.
    assert throttled.headers["Retry-After"] == "2"
    assert throttled.json() == {
        "error": {
            "code": "429",
            "message": "API calls quota exceeded! Maximum allowed 50 per 00:01:00 for the key "
            "Destination+TenantID+AppID. You can send requests again in 2 seconds.",
            "target": throttled.json()["error"]["target"],
        }
    }
    seen = parse_throttle(429, throttled.headers, throttled.content)
    assert seen is not None
    assert (seen.retry_after, seen.calls, seen.window, seen.code) == (2.0, 50, 60.0, "429")

    # Other callers and other endpoints have their own counters.
    assert (await http.get("/api/incidents", headers=FABRIKAM)).status_code == 200
    assert (await http.get("/api/machines", headers=CONTOSO)).status_code == 200

    clock.now = 1059.5 + 2  # as told: in
    assert (await http.get("/api/incidents/123", headers=CONTOSO)).status_code == 200


async def test_retrying_early_keeps_the_caller_throttled(
    http: httpx.AsyncClient, clock: VirtualClock
) -> None:
    for _ in range(50):
        assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200
    for step in range(1, 61):  # one attempt a second: the rate the window sees stays high
        clock.now = 1000.0 + step
        answer = await http.get("/api/incidents", headers=CONTOSO)
        assert answer.status_code == 429
    # At 1060 the 50 grants have left, but 59 attempts of the last minute still count;
    # the window has room again once 10 of them have left too: at 1071.
    assert answer.headers["Retry-After"] == "11"
    clock.now = 1070.0  # a second early: throttled, and the next chance moves on
    answer = await http.get("/api/incidents", headers=CONTOSO)
    assert answer.status_code == 429
    assert answer.headers["Retry-After"] == "2"
    clock.now = 1072.0
    assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200


async def test_the_hourly_limit(http: httpx.AsyncClient, clock: VirtualClock) -> None:
    for i in range(1500):
        clock.now = 1000.0 + 1.25 * i  # 48 a minute, for 31 minutes
        assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200
    clock.now += 60
    answer = await http.get("/api/incidents", headers=CONTOSO)
    assert answer.status_code == 429
    assert "Maximum allowed 1500 per 01:00:00" in answer.json()["error"]["message"]
    # With this attempt, the hour has room once the second arrival (1001.25) has left,
    # at 4601.25; now is 2933.75: 1667.5 s, said in whole seconds.
    assert answer.headers["Retry-After"] == "1668"


async def test_mde_endpoints_count_per_path_template(
    http: httpx.AsyncClient, clock: VirtualClock
) -> None:
    for i in range(100):
        assert (await http.get(f"/api/machines/{i}x", headers=CONTOSO)).status_code == 200
    assert (await http.get("/api/machines/abc1", headers=CONTOSO)).status_code == 429
    assert (await http.get("/api/machines", headers=CONTOSO)).status_code == 200
    assert (await http.get("/api/machines/abc1/alerts", headers=CONTOSO)).status_code == 200
    assert (await http.post("/api/machines/abc1", headers=CONTOSO)).status_code == 200
    # Unthrottled paths pass and are recorded without an endpoint.
    assert (await http.get("/public/status")).status_code == 200


async def test_hunting_run_time_budget(clock: VirtualClock) -> None:
    emulator = emulator_at(clock)
    async for http in client_of(emulator):
        query = {"Query": "DeviceInfo | take 1"}
        runs = {**CONTOSO, "x-emulator-runtime": "150"}
        for i in range(4):  # 4 x 150 s = the 10 minutes of the hour, used from the start
            clock.now = 1000.0 + i
            answer = await http.post("/api/advancedhunting/run", json=query, headers=runs)
            assert answer.status_code == 200
            assert answer.json()["Stats"]["ExecutionTime"] == 150.0
        clock.now = 1010.0
        answer = await http.post("/api/advancedhunting/run", json=query, headers=CONTOSO)
        assert answer.status_code == 429
        body = answer.json()["error"]
        assert body["code"] == "TooManyRequests"
        # The first query (1000) leaves the hour at 4600: 3590 s from now.
        assert body["message"] == (
            "You have exceeded processing resources allocated to this tenant. "
            "You can run queries again in 00:59:50."
        )
        assert answer.headers["Retry-After"] == "3590"
        seen = parse_throttle(429, {}, answer.content)  # the body alone says it too
        assert seen is not None
        assert (seen.retry_after, seen.code) == (3590.0, "TooManyRequests")

        # While below the budget a query is admitted, whatever it then runs; the
        # drawn run times lie in [runtime_min, runtime_max].
        clock.now = 4600.0
        answer = await http.post("/api/advancedhunting/run", json=query, headers=FABRIKAM)
        assert 1.0 <= answer.json()["Stats"]["ExecutionTime"] <= 20.0
    runs_seen = [(a.status, a.runtime) for a in emulator.arrivals(caller="contoso-app1")]
    assert runs_seen == [(200, 150.0)] * 4 + [(429, 0.0)]


async def test_speed_scales_every_time(clock: VirtualClock) -> None:
    emulator = emulator_at(clock, speed=60)  # an emulated minute per real second
    async for http in client_of(emulator):
        for _ in range(50):
            assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200
        clock.now += 0.5
        answer = await http.get("/api/incidents", headers=CONTOSO)
        assert answer.status_code == 429
        # 0.5 real s = 30 emulated s to wait, in whole emulated seconds, told in real ones.
        assert answer.headers["Retry-After"] == "0.5"
        assert "Maximum allowed 50 per 00:00:01 for the key" in answer.json()["error"]["message"]
        clock.now += 0.5
        assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200

        runs = {**CONTOSO, "x-emulator-runtime": "12"}
        answer = await http.post("/api/advancedhunting/run", json={}, headers=runs)
        assert answer.json()["Stats"]["ExecutionTime"] == 0.2

        # Whole emulated seconds: 1/3 real s is 20 emulated s, 0.34 s rounded up.
        throttler = Throttler(speed=60)
        for _ in range(45):
            assert throttler.admit("c", "POST", "/api/advancedhunting/run", 0.0).admitted
        late = throttler.admit("c", "POST", "/api/advancedhunting/run", 2 / 3)
        assert late.retry_after == pytest.approx(20 / 60)
        assert seconds_text(late.retry_after) == "0.334"

        assert (await http.post("/_emulator/reset")).json() == {"reset": True}
        assert emulator.arrivals() == []
        assert (await http.get("/_emulator/health")).json() == {"status": "ok", "speed": 60}
        await http.get("/api/incidents", headers=CONTOSO)
        rows = (await http.get("/_emulator/arrivals")).json()["arrivals"]
        assert rows == [[clock.now, "contoso-app1", "incidents", 200, 0.0]]


async def test_scripted_throttle_delay_and_hold(clock: VirtualClock) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    emulator = DefenderEmulator(clock=clock, sleep=clock.sleep, latency=0)
    async for http in client_of(emulator):
        emulator.throttle("/API/Incidents", retry_after=2, times=2)
        for _ in range(2):
            answer = await http.get("/api/incidents", headers=CONTOSO)
            assert answer.status_code == 429
            assert answer.headers["Retry-After"] == "2"
            seen = parse_throttle(429, answer.headers, answer.content)
            assert seen is not None
            assert (seen.retry_after, seen.calls, seen.window, seen.code) == (2.0, 50, 60.0, "429")
        assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200
        # A scripted 429 is an attempt like any other: 3 of the minute's 50 are spent.
        for _ in range(47):
            assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200
        assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 429

        emulator.throttle("/api/machines", retry_after=0.5, times=None, limit=100)
        for _ in range(3):
            answer = await http.get("/api/machines", headers=FABRIKAM)
            assert answer.headers["Retry-After"] == "0.5"
            assert "Maximum allowed 100 per 00:01:00" in answer.json()["error"]["message"]
        emulator.clear()
        assert (await http.get("/api/machines", headers=FABRIKAM)).status_code == 200

        emulator.sleep = sleep
        emulator.delay("/sessions/s1", 1.5)
        gate = emulator.hold("/sessions/s1")
        gate.set()  # already let go: the answer does not wait for it
        assert (await http.get("/Sessions/S1")).status_code == 200
        assert slept == [1.5, 0.0]  # the scripted delay, then the latency (0)

    assert len(emulator.arrivals("/api/incidents")) == 51
    assert len(emulator.arrivals("/api/machines", caller="fabrikam-app2")) == 4
    assert [a.status for a in emulator.arrivals("/api/machines")] == [429] * 3 + [200]
    (session,) = emulator.arrivals("/sessions/s1")
    assert (session.caller, session.method, session.path, session.endpoint) == (
        "anonymous",
        "GET",
        "/sessions/s1",
        "",
    )
    assert emulator.times("/api/incidents") == [clock.now] * 51


async def test_fixed_execution_time_answered_at_once(clock: VirtualClock) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    emulator = DefenderEmulator(
        clock=clock, sleep=sleep, execution_time=4.5, run_queries=False, speed=2
    )
    async for http in client_of(emulator):
        answer = await http.post("/api/advancedqueries/run", json={}, headers=CONTOSO)
        # In real seconds: 4.5 emulated seconds at speed 2; charged, not waited for.
        assert answer.json()["Stats"]["ExecutionTime"] == 2.25
        assert execution_time(answer.content) == 2.25
        runs = {**CONTOSO, "x-emulator-runtime": "3"}
        answer = await http.post("/api/advancedqueries/run", json={}, headers=runs)
        assert answer.json()["Stats"]["ExecutionTime"] == 1.5  # the header wins
    assert slept == []
    assert [a.runtime for a in emulator.arrivals(caller="contoso-app1")] == [2.25, 1.5]


# The emulator's endpoint -> the catalog's api with the same figures.
CATALOG_API = {
    "incidents": "m365d.incidents",
    "advancedhunting": "m365d.advanced-hunting",
    "advancedqueries": "mde.advanced-hunting",
    "runliveresponse": "mde.live-response",
    "alerts.batchupdate": "mde.alerts.batch-update",
    "alerts.createalertbyreference": "mde.alerts.create",
    "indicators.import": "mde.indicators.import",
    "indicators.batchdelete": "mde.indicators.batch-delete",
    "getpackageuri": "mde.package-sas",
    "mde": "mde.api",
}


@pytest.mark.parametrize("endpoint", DEFENDER_ENDPOINTS, ids=lambda e: e.name)
def test_endpoint_figures_are_the_catalogs(endpoint: Endpoint) -> None:
    """The emulator throttles with the figures of coordinator/defender.md, "Catalog" (its
    calls and run-time limits; concurrency is the coordinator's alone)."""
    policy = load_catalog().apis[CATALOG_API[endpoint.name]]
    windowed = [lim for lim in policy.limits if lim.kind is not Kind.CONCURRENT]
    expected = [
        (True, lim.amount / 1000, lim.window_ms / 1000)
        if lim.kind is Kind.RUNTIME
        else (False, lim.amount, lim.window_ms / 1000)
        for lim in windowed
    ]
    assert [(lim.runtime, lim.amount, lim.per) for lim in endpoint.limits] == expected
    assert endpoint.per_path == any(lim.scope is Scope.KEY for lim in windowed)


async def test_a_tenant_can_have_a_lower_calls_limit_than_the_catalog(
    http: httpx.AsyncClient,
) -> None:
    factor = await http.post("/_emulator/factor", json={"caller": "contoso-app1", "factor": 0.5})
    assert factor.status_code == 200
    statuses = [(await http.get("/api/incidents", headers=CONTOSO)).status_code for _ in range(26)]
    assert statuses == [200] * 25 + [429]  # half of 50 a minute
    throttled = await http.get("/api/incidents", headers=CONTOSO)
    found = parse_throttle(throttled.status_code, throttled.headers, throttled.content)
    assert found is not None and (found.calls, found.window) == (25, 60.0)
    assert (await http.get("/api/incidents", headers=FABRIKAM)).status_code == 200
    await http.post("/_emulator/reset")
    assert (await http.get("/api/incidents", headers=CONTOSO)).status_code == 200
