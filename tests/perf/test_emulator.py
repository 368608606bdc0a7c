"""The Defender emulator in virtual time: exact windows counted at arrival, every attempt
counted, run-time budgets, the quoted 429 bodies, and the time scale."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from quotagate.client import parse_throttle

from ..emulator import DefenderEmulator, Throttler, clock_text, path_template, seconds_text

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
    runs_seen = [(a.status, a.runtime) for a in emulator.arrivals("contoso-app1")]
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
