"""`QuotaAdapter`: the transport's leases for a `requests.Session`, first against the fake
coordinator, then through a real Session, the real coordinator and the emulator."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict

from quotagate.client import QuotaAdapter, QuotaClient, QuotaExhausted, UnroutedRequest
from quotagate.client._gate import DENIED_HEADER
from quotagate.coordinator.embedded import EmbeddedServer

from ..emulator import DefenderEmulator, Endpoint, calls
from ..service import serve_in_thread
from .fakes import URL, FakeCoordinator
from .upstreams import (
    EmulatorAdapter,
    coordinator,
    forward_proxy,
    from_threads,
    most_in_any_window,
)

TENANT = "contoso/app1"
INCIDENTS = "https://api.security.microsoft.com/api/incidents"
HUNTING = "https://api.security.microsoft.com/api/advancedhunting/run"
CALLS_429 = (
    "API calls quota exceeded! Maximum allowed 30 per 00:01:00 for the key "
    "Destination+TenantID+AppID. You can send requests again in 8 seconds."
)


class Stub(BaseAdapter):
    """An adapter that answers `status` with `body` and keeps what it was sent."""

    def __init__(self, status: int = 200, body: Any = None, **headers: str) -> None:
        super().__init__()
        self.status, self.headers = status, headers
        self.body = json.dumps({"value": []} if body is None else body).encode()
        self.sent: list[requests.PreparedRequest] = []
        self.closed = False

    def send(self, request: requests.PreparedRequest, **options: Any) -> requests.Response:  # type: ignore[override]
        self.sent.append(request)
        response = requests.Response()
        response.status_code = self.status
        response.headers = CaseInsensitiveDict({"Content-Type": "application/json", **self.headers})
        response.raw = io.BytesIO(self.body)
        response.url = request.url or ""
        response.request = request
        return response

    def close(self) -> None:
        self.closed = True


def session(
    client: QuotaClient, inner: BaseAdapter | None = None, **options: Any
) -> requests.Session:
    http = requests.Session()
    http.mount("https://", QuotaAdapter(client, inner=inner, **options))
    return http


def released(client: QuotaClient, fake: FakeCoordinator) -> list[dict[str, Any]]:
    assert client.flush(timeout=5)
    bodies = [dict(body) for body in fake.released.values()]
    for body in bodies:
        assert isinstance(body.pop("runtime", 0.0), float)
    return bodies


class TestOutcomes:
    def test_ok(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        stub = Stub()
        with session(client, stub) as http:
            assert http.get(INCIDENTS).json() == {"value": []}
        assert released(client, fake) == [{"outcome": "ok", "status_code": 200}]
        assert fake.bodies("/v1/leases")[0]["api"] == "m365d.incidents"
        assert fake.bodies("/v1/leases")[0]["wait"] == 30.0

    def test_throttled_names_retry_and_limit(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        stub = Stub(429, {"error": {"code": "429", "message": CALLS_429}})
        with session(client, stub) as http:
            assert http.get(INCIDENTS).status_code == 429
        assert released(client, fake) == [
            {
                "outcome": "throttled",
                "status_code": 429,
                "retry_after": 8.0,
                "limit": {"amount": 30, "window": 60.0},
            }
        ]

    def test_retry_after_header_wins(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        body = {"error": {"code": "TooManyRequests", "message": "Please retry again later."}}
        with session(client, Stub(429, body, **{"Retry-After": "2.128"})) as http:
            http.get(INCIDENTS)
        assert released(client, fake)[0]["retry_after"] == 2.128

    def test_hunting_stats_are_the_runtime(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        stub = Stub(200, {"Stats": {"ExecutionTime": 4.25}, "Results": []})
        with session(client, stub) as http:
            http.post(HUNTING, json={"Query": "DeviceInfo"})
        assert client.flush(timeout=5)
        assert list(fake.released.values()) == [
            {"outcome": "ok", "status_code": 200, "runtime": 4.25, "runtime_upstream": True}
        ]

    def test_failed_status(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        with session(client, Stub(500)) as http:
            http.get(INCIDENTS)
        assert released(client, fake) == [{"outcome": "failed", "status_code": 500}]

    def test_refused_connection_is_not_called(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        with socket.socket() as sock:  # bound, not listening: connections are refused
            sock.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
            with (
                session(client, EmulatorAdapter(dead)) as http,
                pytest.raises(requests.ConnectionError),
            ):
                http.get(INCIDENTS)
        assert client.flush(timeout=5)
        assert list(fake.released.values()) == [{"outcome": "not_called"}]

    def test_streaming_callers_still_read_the_body(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        with session(client, Stub(200, {"value": [1, 2, 3]})) as http:
            response = http.get(INCIDENTS, stream=True)
            assert json.loads(b"".join(response.iter_content(4))) == {"value": [1, 2, 3]}
        assert released(client, fake)[0]["outcome"] == "ok"

    def test_slow_call_renews_its_lease(self, fake: FakeCoordinator) -> None:
        fake.expires_in = 0.3

        class Slow(Stub):
            def send(self, request: requests.PreparedRequest, **options: Any) -> requests.Response:  # type: ignore[override]
                assert fake.renewed.wait(timeout=5)
                return super().send(request, **options)

        with (
            QuotaClient(URL, TENANT, transport=fake.transport) as quota,
            session(quota, Slow()) as http,
        ):
            http.get(INCIDENTS)
        assert fake.paths()[:2] == ["/v1/leases", "/v1/leases/L1/renew"]
        assert fake.paths()[-1] == "/v1/leases/L1/release"


class TestOptions:
    def test_respond(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        fake.deny = {"error": "quota_exhausted", "retry_after": 4.2}
        stub = Stub()
        with session(client, stub, on_exhausted="respond") as http:
            response = http.get(INCIDENTS)
        assert (response.status_code, response.headers["Retry-After"]) == (429, "5")
        assert response.headers[DENIED_HEADER] == "quota_exhausted"
        assert response.json()["error"]["code"] == "429"
        assert stub.sent == []
        with pytest.raises(requests.HTTPError):
            response.raise_for_status()  # requests' own error types apply

    def test_raise(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        fake.deny = {"error": "quota_exhausted", "retry_after": 4.2}
        with session(client, Stub()) as http, pytest.raises(QuotaExhausted):
            http.get(INCIDENTS)

    def test_unrouted(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        stub = Stub()
        with session(client, stub, unrouted="raise") as http:
            with pytest.raises(UnroutedRequest):
                http.get("https://graph.microsoft.com/v1.0/me")
            http.get("https://example.com/api/incidents")
            http.get("https://graph.microsoft.com/v1.0//security/alerts_v2")
        assert len(stub.sent) == 2
        assert [body["api"] for body in fake.bodies("/v1/leases")] == ["graph.security"]

    def test_lease_about_to_expire_is_replaced(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        times = iter([0.0, 59.9, 70.0, 70.0])
        stub = Stub()
        with session(client, stub, clock=lambda: next(times)) as http:
            http.get(INCIDENTS)
        assert len(stub.sent) == 1
        assert [body["outcome"] for body in released(client, fake)] == ["not_called", "ok"]

    def test_the_same_request_resent_routes_again(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        stub = Stub()
        with session(client, stub) as http:
            request = http.prepare_request(requests.Request("GET", INCIDENTS))
            before = (request.url, dict(request.headers))
            http.send(request)
            http.send(request)
        assert (request.url, dict(request.headers)) == before
        assert len(fake.bodies("/v1/leases")) == 2

    def test_the_sessions_proxy_settings_apply(
        self, client: QuotaClient, fake: FakeCoordinator, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            monkeypatch.delenv(name, raising=False)
            monkeypatch.delenv(name.lower(), raising=False)
        plain = "http://api.security.microsoft.com/api/incidents"  # a proxy sees http
        with forward_proxy() as (url, seen), requests.Session() as http:
            http.mount("http://", QuotaAdapter(client))
            http.proxies = {"http": url}  # the Session's proxies reach the inner adapter
            assert http.get(plain).json()["via"] == "proxy"
            monkeypatch.setenv("HTTP_PROXY", url)  # and so does the environment's
            http.proxies = {}
            assert http.get(plain).json()["via"] == "proxy"
        assert seen == [plain, plain]
        assert len(fake.bodies("/v1/leases")) == 2

    def test_closing_closes_the_inner_adapter(self, client: QuotaClient) -> None:
        stub = Stub()
        session(client, stub).close()
        assert stub.closed


# -- a real Session, the real coordinator, the emulator -----------------------------------

LIMIT, WINDOW = 20, 1.0
POLICIES = f"""
margin: 0
apis:
  m365d.incidents:
    lease_ttl: 5s
    limits: [{{calls: {LIMIT}, per: {WINDOW:g}s, granularity: 100ms}}]
"""


@pytest.fixture
def emulator() -> DefenderEmulator:
    endpoint = Endpoint(
        "incidents", r"/api/incidents(/[^/]+)?", frozenset({"GET"}), (calls(LIMIT, WINDOW),)
    )
    return DefenderEmulator(endpoints=[endpoint], latency=0)


@pytest.fixture
def emulator_url(emulator: DefenderEmulator) -> Iterator[str]:
    with serve_in_thread(emulator.app) as url:
        yield url


@pytest.fixture
def coordinator_url(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    with coordinator(valkey_server.url, tmp_path, POLICIES) as url:
        yield url


@pytest.mark.server
def test_threads_through_a_session_see_no_429(
    coordinator_url: str, emulator: DefenderEmulator, emulator_url: str
) -> None:
    total, workers = 50, 16
    with QuotaClient(coordinator_url, TENANT) as quota, requests.Session() as http:
        inner = EmulatorAdapter(emulator_url, pool_maxsize=workers)
        http.mount("https://", QuotaAdapter(quota, inner=inner))
        http.headers["Authorization"] = "Bearer contoso-app1"
        statuses, errors = from_threads(
            lambda n: http.get(f"{INCIDENTS}?n={n}", timeout=60).status_code, total, workers
        )

    assert errors == []
    assert statuses == [200] * total
    arrivals = emulator.arrivals("/api/incidents")
    assert [a.status for a in arrivals] == [200] * total  # the emulator counted no 429
    assert most_in_any_window([a.at for a in arrivals], WINDOW) <= LIMIT
