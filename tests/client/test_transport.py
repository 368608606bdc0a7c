"""The transports: lease around each routed request, release with what happened."""

from __future__ import annotations

import asyncio
import gzip
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from quotagate.client import (
    AsyncQuotaClient,
    AsyncQuotaTransport,
    QuotaClient,
    QuotaExhausted,
    QuotaTransport,
    Route,
)

from .fakes import TENANT, URL, FakeCoordinator

INCIDENTS = "https://api.security.microsoft.com/api/incidents"
HUNTING = "https://api.security.microsoft.com/api/advancedhunting/run"
MACHINE = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"
LIVE = f"https://api.securitycenter.microsoft.com/api/machines/{MACHINE}/runliveresponse"

Upstream = Callable[[httpx.Request], httpx.Response]


def respond(status: int, **kwargs: Any) -> Upstream:
    return lambda request: httpx.Response(status, **kwargs)


def failing(error: type[httpx.TransportError]) -> Upstream:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error("upstream trouble", request=request)

    return handler


class BrokenStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    def __iter__(self) -> Iterator[bytes]:
        yield b'{"partial":'
        raise httpx.ReadError("connection reset")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b'{"partial":'
        raise httpx.ReadError("connection reset")


def call(
    client: QuotaClient, upstream: Upstream, method: str = "GET", url: str = INCIDENTS
) -> httpx.Response:
    transport = QuotaTransport(client, inner=httpx.MockTransport(upstream))
    try:
        with httpx.Client(transport=transport) as http:
            return http.request(method, url)
    finally:
        assert client.flush(timeout=5)  # the release goes out in the background


def only_release(fake: FakeCoordinator) -> dict[str, Any]:
    (body,) = fake.released.values()
    return body


def without_runtime(body: dict[str, Any]) -> dict[str, Any]:
    assert isinstance(body.pop("runtime"), float)
    return body


class TestReleases:
    def test_ok(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        response = call(client, respond(200, json={"value": []}))
        assert response.json() == {"value": []}
        assert without_runtime(only_release(fake)) == {"outcome": "ok", "status_code": 200}
        assert fake.bodies("/v1/leases") == [
            {"tenant": TENANT, "api": "m365d.incidents", "cost": 1, "wait": 30.0}
        ]

    @pytest.mark.parametrize("status", [400, 404, 500, 503])
    def test_failed_status(self, client: QuotaClient, fake: FakeCoordinator, status: int) -> None:
        assert call(client, respond(status, text="no")).status_code == status
        assert without_runtime(only_release(fake)) == {"outcome": "failed", "status_code": status}

    def test_throttled_with_retry_after(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        body = {"error": {"code": "TooManyRequests", "message": "Please retry again later."}}
        call(client, respond(429, json=body, headers={"Retry-After": "2.128"}))
        assert without_runtime(only_release(fake)) == {
            "outcome": "throttled",
            "status_code": 429,
            "retry_after": 2.128,
        }

    def test_throttled_with_retry_in_body(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        message = (
            "API calls quota exceeded! Maximum allowed 30 per 00:01:00 for the key "
            "Destination+TenantID+AppID. You can send requests again in 8 seconds."
        )
        call(client, respond(429, json={"error": {"code": "429", "message": message}}))
        assert only_release(fake)["retry_after"] == 8.0

    def test_throttled_without_retry_time_sends_none(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        call(client, respond(429, text="slow down"))
        assert without_runtime(only_release(fake)) == {"outcome": "throttled", "status_code": 429}

    @pytest.mark.parametrize("error", [httpx.ConnectError, httpx.ConnectTimeout])
    def test_not_sent_is_not_called(
        self, client: QuotaClient, fake: FakeCoordinator, error: type[httpx.TransportError]
    ) -> None:
        with pytest.raises(error):
            call(client, failing(error))
        assert only_release(fake) == {"outcome": "not_called"}

    @pytest.mark.parametrize("error", [httpx.ReadTimeout, httpx.RemoteProtocolError])
    def test_failure_after_sending_is_failed(
        self, client: QuotaClient, fake: FakeCoordinator, error: type[httpx.TransportError]
    ) -> None:
        with pytest.raises(error):
            call(client, failing(error))
        assert without_runtime(only_release(fake)) == {"outcome": "failed"}

    def test_body_lost_midway_is_failed_with_status(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        with pytest.raises(httpx.ReadError):
            call(client, respond(200, stream=BrokenStream()))
        assert without_runtime(only_release(fake)) == {"outcome": "failed", "status_code": 200}

    def test_hunting_stats_are_the_runtime(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        answer = {"Stats": {"ExecutionTime": 4.621215}, "Schema": [], "Results": []}
        call(client, respond(200, json=answer), "POST", HUNTING)
        assert only_release(fake) == {
            "outcome": "ok",
            "status_code": 200,
            "runtime": 4.621215,
            "runtime_upstream": True,
        }
        assert fake.bodies("/v1/leases")[0]["api"] == "m365d.advanced-hunting"

    def test_compressed_stats_are_read(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        raw = gzip.compress(json.dumps({"Stats": {"ExecutionTime": 1.5}}).encode())
        headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
        response = call(client, respond(200, content=raw, headers=headers), "POST", HUNTING)
        assert response.json() == {"Stats": {"ExecutionTime": 1.5}}
        assert only_release(fake)["runtime"] == 1.5

    def test_live_response_key_is_the_machine(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        call(client, respond(201, json={}), "POST", LIVE)
        lease_request = fake.bodies("/v1/leases")[0]
        assert (lease_request["api"], lease_request["key"]) == ("mde.live-response", MACHINE)


class TestPassage:
    def test_unrouted_goes_straight_through(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        response = call(client, respond(200, text="hi"), url="https://example.com/api/incidents")
        assert response.text == "hi"
        assert fake.calls == []

    def test_denied_lease_raises_and_sends_nothing(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        fake.deny = {"error": "quota_exhausted", "retry_after": 40.0, "limit": {"kind": "calls"}}
        sent: list[httpx.Request] = []

        def upstream(request: httpx.Request) -> httpx.Response:
            sent.append(request)
            return httpx.Response(200)

        with pytest.raises(QuotaExhausted) as caught:
            call(client, upstream)
        assert caught.value.retry_after == 40.0
        assert sent == [] and fake.released == {}

    def test_streaming_callers_get_the_whole_body(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        payload = b"x" * 100_000
        transport = QuotaTransport(client, inner=httpx.MockTransport(respond(200, content=payload)))
        with httpx.Client(transport=transport) as http, http.stream("GET", INCIDENTS) as response:
            assert b"".join(response.iter_bytes()) == payload
        assert response.elapsed.total_seconds() >= 0
        assert client.flush(timeout=5)
        assert only_release(fake)["outcome"] == "ok"

    def test_custom_routes_and_wait(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        routes = [Route("svc.jobs", "/jobs/{id}", key="{id}")]
        transport = QuotaTransport(client, routes, httpx.MockTransport(respond(200)), wait=2.0)
        with httpx.Client(transport=transport) as http:
            http.get("https://svc.example/jobs/J7")
            http.get(INCIDENTS)  # not in the table any more: passes through
        assert fake.bodies("/v1/leases") == [
            {"tenant": TENANT, "api": "svc.jobs", "key": "j7", "cost": 1, "wait": 2.0}
        ]


class TestAsyncTransport:
    async def call(
        self,
        aclient: AsyncQuotaClient,
        upstream: Upstream,
        method: str = "GET",
        url: str = INCIDENTS,
    ) -> httpx.Response:
        transport = AsyncQuotaTransport(aclient, inner=httpx.MockTransport(upstream))
        try:
            async with httpx.AsyncClient(transport=transport) as http:
                return await http.request(method, url)
        finally:
            assert await aclient.flush(timeout=5)

    async def test_ok_and_stats(self, aclient: AsyncQuotaClient, fake: FakeCoordinator) -> None:
        answer = {"Stats": {"ExecutionTime": 2.0}, "Results": []}
        response = await self.call(aclient, respond(200, json=answer), "POST", HUNTING)
        assert response.json() == answer
        assert only_release(fake) == {
            "outcome": "ok",
            "status_code": 200,
            "runtime": 2.0,
            "runtime_upstream": True,
        }

    async def test_throttled(self, aclient: AsyncQuotaClient, fake: FakeCoordinator) -> None:
        await self.call(aclient, respond(429, headers={"Retry-After": "5"}))
        assert without_runtime(only_release(fake)) == {
            "outcome": "throttled",
            "status_code": 429,
            "retry_after": 5.0,
        }

    async def test_not_called_and_failed(
        self, aclient: AsyncQuotaClient, fake: FakeCoordinator
    ) -> None:
        with pytest.raises(httpx.ConnectError):
            await self.call(aclient, failing(httpx.ConnectError))
        with pytest.raises(httpx.ReadTimeout):
            await self.call(aclient, failing(httpx.ReadTimeout))
        with pytest.raises(httpx.ReadError):
            await self.call(aclient, respond(502, stream=BrokenStream()))
        assert fake.released["L1"] == {"outcome": "not_called"}
        assert without_runtime(fake.released["L2"]) == {"outcome": "failed"}
        assert without_runtime(fake.released["L3"]) == {"outcome": "failed", "status_code": 502}

    async def test_unrouted_and_denied(
        self, aclient: AsyncQuotaClient, fake: FakeCoordinator
    ) -> None:
        assert (
            await self.call(aclient, respond(204), url="https://example.com/")
        ).status_code == 204
        fake.deny = {"error": "quota_exhausted", "retry_after": 1.0}
        with pytest.raises(QuotaExhausted):
            await self.call(aclient, respond(200))
        assert fake.paths() == ["/v1/leases"]


class TestRenewal:
    def test_slow_call_renews_its_lease(self, fake: FakeCoordinator) -> None:
        fake.expires_in = 0.3

        def slow(request: httpx.Request) -> httpx.Response:
            assert fake.renewed.wait(timeout=5)
            return httpx.Response(200)

        with QuotaClient(URL, TENANT, transport=fake.transport) as quota:
            call(quota, slow)
        assert fake.paths()[:2] == ["/v1/leases", "/v1/leases/L1/renew"]
        assert fake.paths()[-1] == "/v1/leases/L1/release"

    def test_quick_call_does_not_renew(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        call(client, respond(200))
        assert not fake.renewed.is_set()

    async def test_slow_async_call_renews_its_lease(self, fake: FakeCoordinator) -> None:
        fake.expires_in = 0.3

        async def slow(request: httpx.Request) -> httpx.Response:
            for _ in range(500):
                if fake.renewed.is_set():
                    break
                await asyncio.sleep(0.01)
            return httpx.Response(200)

        async with AsyncQuotaClient(URL, TENANT, transport=fake.transport) as quota:
            transport = AsyncQuotaTransport(quota, inner=httpx.MockTransport(slow))
            async with httpx.AsyncClient(transport=transport) as http:
                await http.get(INCIDENTS)
        assert fake.renewed.is_set()
        assert fake.paths()[-1] == "/v1/leases/L1/release"

    def test_renewal_stops_when_the_call_ends(self, fake: FakeCoordinator) -> None:
        fake.expires_in = 0.06
        with QuotaClient(URL, TENANT, transport=fake.transport) as quota:
            with quota.lease("m365d.incidents"):
                assert fake.renewed.wait(timeout=5)
            assert quota.flush(timeout=5)
            renewals = len(fake.paths()) - 2  # minus the acquire and the release
            fake.renewed.clear()
            assert not fake.renewed.wait(timeout=0.15)
        assert renewals >= 1
        assert not [t for t in threading.enumerate() if t.name == "quotagate-renewal"]
