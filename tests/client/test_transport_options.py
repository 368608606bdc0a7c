"""The transports' options: what a denial becomes (`on_exhausted`), what an unrouted request
gets (`unrouted`), proxies, the age of a lease before its call, the limit a throttled
answer names, and the caller's request left as it was."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from quotagate.client import (
    AsyncQuotaClient,
    AsyncQuotaTransport,
    QuotaClient,
    QuotaError,
    QuotaExhausted,
    QuotaTransport,
    UnroutedRequest,
    parse_throttle,
)
from quotagate.client._gate import DENIED_HEADER

from .fakes import FakeCoordinator
from .upstreams import forward_proxy

INCIDENTS = "https://api.security.microsoft.com/api/incidents"
GRAPH_ME = "https://graph.microsoft.com/v1.0/me"
CALLS_429 = (
    "API calls quota exceeded! Maximum allowed 30 per 00:01:00 for the key "
    "Destination+TenantID+AppID. You can send requests again in 8 seconds."
)
RUNTIME_429 = (
    "You have exceeded processing resources allocated to this tenant. "
    "You can run queries again in 00:00:37."
)
DENIAL = {
    "error": "quota_exhausted",
    "retry_after": 2.4,
    "limit": {"kind": "calls", "amount": 50, "window": 60.0},
}


class Upstream:
    """A mock upstream that answers `status` (and `body`) and keeps what it was sent."""

    def __init__(self, status: int = 200, body: Any = None, **headers: str) -> None:
        self.status, self.body, self.headers = status, body, headers
        self.sent: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(request)
        return httpx.Response(self.status, json=self.body or {"value": []}, headers=self.headers)

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


def released(fake: FakeCoordinator) -> list[dict[str, Any]]:
    bodies = [dict(body) for body in fake.released.values()]
    for body in bodies:
        body.pop("runtime", None)
    return bodies


class TestOnExhausted:
    def test_respond_answers_as_defender_would(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        fake.deny = DENIAL
        upstream = Upstream()
        transport = QuotaTransport(client, inner=upstream.transport, on_exhausted="respond")
        with httpx.Client(transport=transport) as http:
            response = http.get(INCIDENTS)
        assert response.status_code == 429
        assert response.headers["Retry-After"] == "3"  # whole seconds, rounded up
        assert response.headers[DENIED_HEADER] == "quota_exhausted"
        throttle = parse_throttle(429, {}, response.content)
        assert throttle is not None
        assert (throttle.code, throttle.retry_after) == ("429", 3.0)
        assert (throttle.calls, throttle.window) == (50, 60.0)
        assert response.request.url == INCIDENTS
        assert upstream.sent == [] and fake.released == {}

    def test_raise_is_the_default(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        fake.deny = DENIAL
        with (
            httpx.Client(transport=QuotaTransport(client, inner=Upstream().transport)) as http,
            pytest.raises(QuotaExhausted),
        ):
            http.get(INCIDENTS)

    async def test_async_respond(self, aclient: AsyncQuotaClient, fake: FakeCoordinator) -> None:
        fake.deny = {"error": "cooling_down", "retry_after": 0.2}
        transport = AsyncQuotaTransport(aclient, inner=Upstream().transport, on_exhausted="respond")
        async with httpx.AsyncClient(transport=transport) as http:
            response = await http.get(INCIDENTS)
        assert (response.status_code, response.headers["Retry-After"]) == (429, "1")
        assert response.headers[DENIED_HEADER] == "cooling_down"
        assert "Maximum allowed" not in response.text  # no limit named, none invented

    def test_bad_option(self, client: QuotaClient) -> None:
        with pytest.raises(ValueError, match="on_exhausted"):
            QuotaTransport(client, on_exhausted="return")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="unrouted"):
            QuotaTransport(client, unrouted="ignore")  # type: ignore[arg-type]


class TestUnrouted:
    def test_warns_once_per_host_and_template(
        self, client: QuotaClient, fake: FakeCoordinator, caplog: pytest.LogCaptureFixture
    ) -> None:
        upstream = Upstream()
        with (
            caplog.at_level(logging.WARNING, "quotagate.client"),
            httpx.Client(transport=QuotaTransport(client, inner=upstream.transport)) as http,
        ):
            for url in (GRAPH_ME, GRAPH_ME, f"{GRAPH_ME}/messages", "https://example.com/x"):
                assert http.get(url).status_code == 200
        warned = [r.getMessage() for r in caplog.records]
        assert len(warned) == 2
        assert "GET:/v1.0/me on graph.microsoft.com matches no route" in warned[0]
        assert len(upstream.sent) == 4 and fake.calls == []

    def test_raise_refuses_before_sending(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        upstream = Upstream()
        transport = QuotaTransport(client, inner=upstream.transport, unrouted="raise")
        with httpx.Client(transport=transport) as http:
            with pytest.raises(UnroutedRequest, match=r"GET:/v1\.0/me"):
                http.get(GRAPH_ME)
            assert http.get("https://example.com/v1.0/me").status_code == 200  # not Microsoft's
        assert len(upstream.sent) == 1 and fake.calls == []

    def test_pass_is_quiet(
        self, client: QuotaClient, fake: FakeCoordinator, caplog: pytest.LogCaptureFixture
    ) -> None:
        transport = QuotaTransport(client, inner=Upstream().transport, unrouted="pass")
        with caplog.at_level(logging.WARNING), httpx.Client(transport=transport) as http:
            http.get(GRAPH_ME)
        assert caplog.records == [] and fake.calls == []

    def test_a_graph_batch_is_told_or_refused(
        self, client: QuotaClient, fake: FakeCoordinator, caplog: pytest.LogCaptureFixture
    ) -> None:
        batch = "https://graph.microsoft.com/v1.0/$batch"
        body = {"requests": [{"id": "1", "method": "GET", "url": "/security/incidents"}]}
        upstream = Upstream()
        with (
            caplog.at_level(logging.WARNING, "quotagate.client"),
            httpx.Client(transport=QuotaTransport(client, inner=upstream.transport)) as http,
        ):
            http.post(batch, json=body)
        (warned,) = [r.getMessage() for r in caplog.records]
        # `$batch` is no name of the path templates (letters only): it shows as an id.
        assert "POST:/v1.0/_id_ on graph.microsoft.com matches no route" in warned
        transport = QuotaTransport(client, inner=upstream.transport, unrouted="raise")
        with httpx.Client(transport=transport) as http, pytest.raises(UnroutedRequest):
            http.post(batch, json=body)
        assert len(upstream.sent) == 1 and fake.calls == []

    def test_sdk_paths_are_routed(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        transport = QuotaTransport(client, inner=Upstream().transport, unrouted="raise")
        with httpx.Client(transport=transport) as http:
            http.post(
                "https://graph.microsoft.com/v1.0//security/microsoft.graph.security.runHuntingQuery"
            )
            http.get("https://graph.microsoft.com/beta/security/alerts%5Fv2")
            http.get("https://api.security.microsoft.com//api//incidents/")
        apis = [body["api"] for body in fake.bodies("/v1/leases")]
        assert apis == ["graph.hunting", "graph.security", "m365d.incidents"]


class TestCallersRequest:
    def test_resending_the_same_request_routes_again(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        upstream = Upstream(429, {"error": {"code": "429", "message": CALLS_429}})
        with httpx.Client(transport=QuotaTransport(client, inner=upstream.transport)) as http:
            request = http.build_request("GET", INCIDENTS, headers={"X-Trace": "1"})
            before = (request.url, list(request.headers.raw), dict(request.extensions))
            for _ in range(3):
                http.send(request)
            after = (request.url, list(request.headers.raw), dict(request.extensions))
        assert before == after
        assert len(fake.bodies("/v1/leases")) == 3
        assert all(sent is request for sent in upstream.sent)


class TestReleaseNamesTheLimit:
    def test_calls_limit_from_the_body(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        upstream = Upstream(429, {"error": {"code": "429", "message": CALLS_429}})
        with httpx.Client(transport=QuotaTransport(client, inner=upstream.transport)) as http:
            http.get(INCIDENTS)
        assert client.flush(timeout=5)
        assert released(fake) == [
            {
                "outcome": "throttled",
                "status_code": 429,
                "retry_after": 8.0,
                "limit": {"amount": 30, "window": 60.0},
            }
        ]

    def test_runtime_429_names_no_limit(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        body = {"error": {"code": "TooManyRequests", "message": RUNTIME_429}}
        upstream = Upstream(429, body)
        hunting = "https://api.security.microsoft.com/api/advancedhunting/run"
        with httpx.Client(transport=QuotaTransport(client, inner=upstream.transport)) as http:
            http.post(hunting, json={"Query": "DeviceInfo"})
        assert client.flush(timeout=5)
        assert released(fake) == [{"outcome": "throttled", "status_code": 429, "retry_after": 37.0}]


def scripted(*times: float) -> Callable[[], float]:
    """A clock that reads `times`, one per call."""
    values = iter(times)
    return lambda: next(values)


class TestLeaseAge:
    """The lease's time to live runs from the acquire reply, on the sender's clock; a
    lease with too little left is released `not_called` and replaced."""

    def test_a_lease_about_to_expire_is_replaced(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        upstream = Upstream()
        # Lease 1 arrives at 0 and is looked at 59.5 s later, with 0.5 s of its 60 left;
        # lease 2 is looked at 0.1 s after it came.
        clock = scripted(0.0, 59.5, 100.0, 100.1)
        transport = QuotaTransport(client, inner=upstream.transport, clock=clock)
        with httpx.Client(transport=transport) as http:
            assert http.get(INCIDENTS).status_code == 200
        assert client.flush(timeout=5)
        assert len(upstream.sent) == 1
        assert fake.released["L1"] == {"outcome": "not_called"}
        assert fake.released["L2"]["outcome"] == "ok"

    def test_a_short_lease_keeps_a_quarter_of_its_ttl(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        fake.expires_in = 2.0  # headroom: 0.5 s, not the default 1 s
        transport = QuotaTransport(client, inner=Upstream().transport, clock=scripted(0.0, 1.4))
        with httpx.Client(transport=transport) as http:
            http.get(INCIDENTS)
        assert client.flush(timeout=5)
        assert list(fake.released) == ["L1"]

    def test_leases_that_never_last_give_up(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        upstream = Upstream()
        ticks = iter(range(0, 10_000, 60))
        transport = QuotaTransport(client, inner=upstream.transport, clock=lambda: next(ticks))
        with httpx.Client(transport=transport) as http, pytest.raises(QuotaError, match="ttl"):
            http.get(INCIDENTS)
        assert client.flush(timeout=5)
        assert upstream.sent == []
        assert released(fake) == [{"outcome": "not_called"}] * 3

    async def test_async_twin(self, aclient: AsyncQuotaClient, fake: FakeCoordinator) -> None:
        upstream = Upstream()
        transport = AsyncQuotaTransport(
            aclient, inner=upstream.transport, clock=scripted(0.0, 60.0, 61.0, 61.0)
        )
        async with httpx.AsyncClient(transport=transport) as http:
            await http.get(INCIDENTS)
        assert await aclient.flush(timeout=5)
        assert len(upstream.sent) == 1
        assert [body["outcome"] for body in fake.released.values()] == ["not_called", "ok"]


# -- proxies ----------------------------------------------------------------------------


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    with forward_proxy() as found:
        yield found


PLAIN_INCIDENTS = "http://api.security.microsoft.com/api/incidents"  # a proxy sees http


@pytest.fixture
def no_env_proxy(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    return monkeypatch


class TestProxy:
    def test_proxy_on_the_transport(
        self, client: QuotaClient, fake: FakeCoordinator, proxy: tuple[str, list[str]]
    ) -> None:
        url, seen = proxy
        with httpx.Client(transport=QuotaTransport(client, proxy=url)) as http:
            assert http.get(PLAIN_INCIDENTS).json()["via"] == "proxy"
        assert seen == [PLAIN_INCIDENTS]
        assert [body["api"] for body in fake.bodies("/v1/leases")] == ["m365d.incidents"]

    def test_environment_proxy_for_the_default_inner_transport(
        self,
        client: QuotaClient,
        fake: FakeCoordinator,
        proxy: tuple[str, list[str]],
        no_env_proxy: pytest.MonkeyPatch,
    ) -> None:
        url, seen = proxy
        no_env_proxy.setenv("HTTP_PROXY", url)
        with httpx.Client(transport=QuotaTransport(client)) as http:
            assert http.get(PLAIN_INCIDENTS).json()["via"] == "proxy"
        assert seen == [PLAIN_INCIDENTS]
        assert len(fake.bodies("/v1/leases")) == 1

    async def test_async_environment_proxy(
        self,
        aclient: AsyncQuotaClient,
        fake: FakeCoordinator,
        proxy: tuple[str, list[str]],
        no_env_proxy: pytest.MonkeyPatch,
    ) -> None:
        url, seen = proxy
        no_env_proxy.setenv("HTTP_PROXY", url)
        async with httpx.AsyncClient(transport=AsyncQuotaTransport(aclient)) as http:
            assert (await http.get(PLAIN_INCIDENTS)).json()["via"] == "proxy"
        assert seen == [PLAIN_INCIDENTS]

    def test_trust_env_false_ignores_the_environment(
        self, client: QuotaClient, no_env_proxy: pytest.MonkeyPatch
    ) -> None:
        no_env_proxy.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
        assert isinstance(QuotaTransport(client, trust_env=False).inner, httpx.HTTPTransport)

    def test_a_proxy_and_an_inner_transport_are_one_too_many(self, client: QuotaClient) -> None:
        with pytest.raises(ValueError, match="proxy"):
            QuotaTransport(client, inner=Upstream().transport, proxy="http://127.0.0.1:9")

    def test_a_proxy_on_the_httpx_client_skips_the_transport(
        self, client: QuotaClient, fake: FakeCoordinator, proxy: tuple[str, list[str]]
    ) -> None:
        """httpx's own behaviour, which the README warns of: pass `proxy=` to the
        transport, not to the Client."""
        url, seen = proxy
        with httpx.Client(proxy=url, transport=QuotaTransport(client)) as http:
            http.get(PLAIN_INCIDENTS)
        assert seen == [PLAIN_INCIDENTS]
        assert fake.calls == []  # no lease: the request never met the transport
