"""The upstream's windows, whenever a call arrives (design rule 3), and what its 429s say
(rule 8), through `QuotaTransport` with the real coordinator and the emulator, which
counts exact sliding windows at arrival.

Senders that leave long after their grant (an inner transport that holds some sends back
by longer than any margin) must still see no upstream 429: a lease counts in full while
it is in flight, so the coordinator never forgets a call before the upstream does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from quotagate.client import QuotaClient, QuotaExhausted, QuotaTransport, parse_duration
from quotagate.coordinator.embedded import EmbeddedServer

from ..emulator import MINUTE, DefenderEmulator, Endpoint, calls, runtime
from ..service import serve_in_thread
from .upstreams import LateSends, ToEmulator, coordinator, from_threads, most_in_any_window

pytestmark = pytest.mark.server

TENANT = "contoso/app1"
CALLER = "contoso-app1"  # the upstream's app + tenant, from the bearer token
INCIDENTS = "https://api.security.microsoft.com/api/incidents"
HUNTING = "https://api.security.microsoft.com/api/advancedhunting/run"
LIMIT, WINDOW = 20, 2.0
POLICIES = f"""
margin: 0
apis:
  m365d.incidents:
    lease_ttl: 5s
    limits: [{{calls: {LIMIT}, per: {WINDOW:g}s, granularity: 100ms}}]
  m365d.advanced-hunting:
    lease_ttl: 10s
    limits: [{{calls: 45, per: 1m}}]
tenants:
  "contoso/probing":
    m365d.incidents:
      lease_ttl: 5s
      limits: [{{calls: {LIMIT}, per: {WINDOW:g}s, granularity: 100ms, assured: 0.25}}]
"""
ENDPOINTS = (
    Endpoint("incidents", r"/api/incidents", frozenset({"GET"}), (calls(LIMIT, WINDOW),)),
    # Two seconds of run time a minute: one three-second query spends it.
    Endpoint(
        "advancedhunting",
        r"/api/advancedhunting/run",
        frozenset({"POST"}),
        (calls(45, MINUTE), runtime(2.0, MINUTE)),
        hunting=True,
    ),
)


@pytest.fixture
def emulator() -> DefenderEmulator:
    return DefenderEmulator(endpoints=ENDPOINTS, latency=0, run_queries=False)


@pytest.fixture
def emulator_url(emulator: DefenderEmulator) -> Iterator[str]:
    with serve_in_thread(emulator.app) as url:
        yield url


@pytest.fixture
def coordinator_url(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    with coordinator(valkey_server.url, tmp_path, POLICIES) as url:
        yield url


def list_incidents(
    http: httpx.Client, total: int, workers: int
) -> tuple[list[int], list[BaseException]]:
    """`total` incident lists, sent by `workers` threads through `http`: their statuses,
    and what any thread raised (which ends that thread)."""
    return from_threads(lambda n: http.get(INCIDENTS, params={"n": n}).status_code, total, workers)


def test_late_senders_see_no_upstream_429(
    coordinator_url: str, emulator: DefenderEmulator, emulator_url: str
) -> None:
    total, workers = 60, 16
    late = LateSends(0.1, 0.3, 1.5)  # 10% of sends leave 0.3-1.5 s after their grant
    headers = {"Authorization": f"Bearer {CALLER}"}
    with (
        QuotaClient(coordinator_url, TENANT) as quota,
        httpx.Client(
            transport=QuotaTransport(quota, inner=ToEmulator(emulator_url, late)),
            headers=headers,
            timeout=60,
        ) as http,
    ):
        statuses, errors = list_incidents(http, total, workers)

    assert errors == []
    assert late.held >= 3  # the late ones did happen
    arrivals = emulator.arrivals("/api/incidents")
    assert [a.status for a in arrivals] == [200] * total
    assert statuses == [200] * total
    assert most_in_any_window([a.at for a in arrivals], WINDOW) <= LIMIT


def test_a_tenant_below_the_policy_sees_at_most_one_429(
    coordinator_url: str, emulator: DefenderEmulator, emulator_url: str
) -> None:
    """Probing (rule 8): the upstream allows this tenant half the policy's calls and names
    that in its 429s; concurrent workers, some sending late, see at most one of them."""
    caller = "contoso-probing"
    lower = httpx.post(f"{emulator_url}/_emulator/factor", json={"caller": caller, "factor": 0.5})
    lower.raise_for_status()
    total, workers = 30, 16
    late = LateSends(0.1, 0.05, 0.3)
    with (
        QuotaClient(coordinator_url, "contoso/probing") as quota,
        httpx.Client(
            transport=QuotaTransport(quota, inner=ToEmulator(emulator_url, late)),
            headers={"Authorization": f"Bearer {caller}"},
            timeout=60,
        ) as http,
    ):
        statuses, errors = list_incidents(http, total, workers)
        assert quota.flush(timeout=5)
        learned = quota.usage("m365d.incidents")["limits"][0]

    assert errors == []
    refused = [a for a in emulator.arrivals("/api/incidents") if a.status == 429]
    assert len(refused) <= 1
    assert statuses.count(429) == len(refused) and statuses.count(200) == total - len(refused)
    if refused:
        assert learned["amount"] == LIMIT // 2


class WithoutRetryAfter(httpx.BaseTransport):
    """Drops `Retry-After` from the answers, so only the body says when to come back."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        headers = [(k, v) for k, v in response.headers.raw if k.lower() != b"retry-after"]
        return httpx.Response(
            response.status_code,
            headers=headers,
            stream=response.stream,
            extensions=response.extensions,
        )

    def close(self) -> None:
        self.inner.close()


@pytest.mark.parametrize("header", [True, False], ids=["retry-after", "body-only"])
def test_runtime_429_pauses_hunting_until_then(
    coordinator_url: str, emulator: DefenderEmulator, emulator_url: str, header: bool
) -> None:
    inner: httpx.BaseTransport = ToEmulator(emulator_url)
    if not header:
        inner = WithoutRetryAfter(inner)
    query = {"Query": "DeviceInfo | take 1"}
    headers = {"Authorization": f"Bearer {CALLER}", "x-emulator-runtime": "3"}
    with (
        QuotaClient(coordinator_url, TENANT) as quota,
        httpx.Client(transport=QuotaTransport(quota, inner=inner, wait=0), headers=headers) as http,
    ):
        assert http.post(HUNTING, json=query).status_code == 200  # spends the run time
        throttled = http.post(HUNTING, json=query)
        assert throttled.status_code == 429
        assert throttled.json()["error"]["code"] == "TooManyRequests"
        message = throttled.json()["error"]["message"]
        told = parse_duration(message.split("run queries again in ")[1].rstrip("."))
        assert quota.flush(timeout=5)
        cooldown = quota.usage("m365d.advanced-hunting")["cooldown"]
        with pytest.raises(QuotaExhausted) as caught:
            http.post(HUNTING, json=query)

    # The query ran 3 s at its arrival; the budget of 2 s a minute is below 2 s again when
    # that charge leaves the window, about a minute later: what the message said.
    assert told is not None and 55 < told <= 60
    assert told - 5 < cooldown <= told
    assert caught.value.code == "cooling_down"
    assert told - 5 < caught.value.retry_after <= told
    assert [a.status for a in emulator.arrivals("/api/advancedhunting/run")] == [
        200,
        429,
    ]  # the third never left
