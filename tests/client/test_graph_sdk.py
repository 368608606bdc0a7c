"""Microsoft's Graph SDK (msgraph-sdk, kiota's middleware in front) over
`AsyncQuotaTransport`, against the real coordinator and the emulator on real ports.
Graph's v1.0 SDK has no tiIndicators (a beta API): its routes are checked in test_routes.

The SDK addresses `graph.microsoft.com`; the inner transport moves each request to the
emulator's port, so the route table sees what the SDK sent. Nothing leaves loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from kiota_abstractions.authentication import (
    AccessTokenProvider,
    AllowedHostsValidator,
    BaseBearerTokenAuthenticationProvider,
)
from kiota_abstractions.base_request_configuration import RequestConfiguration
from kiota_http.middleware.options import RetryHandlerOption
from msgraph import GraphRequestAdapter, GraphServiceClient
from msgraph.generated.models.o_data_errors.o_data_error import ODataError
from msgraph.generated.security.microsoft_graph_security_run_hunting_query.run_hunting_query_post_request_body import (  # noqa: E501
    RunHuntingQueryPostRequestBody,
)
from msgraph_core import GraphClientFactory

from quotagate.client import AsyncQuotaClient, AsyncQuotaTransport, Lease
from quotagate.coordinator.embedded import EmbeddedServer

from ..emulator import DEFENDER_ENDPOINTS, GRAPH_ENDPOINTS, DefenderEmulator
from ..service import serve_in_thread
from .upstreams import AsyncToEmulator, coordinator

pytestmark = [
    pytest.mark.server,
    # The SDK's generated modules, imported on first use, warn about their own classes.
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:msgraph\..*"),
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:kiota_abstractions\..*"),
]

TENANT = "contoso/app1"
TOKEN = "contoso-app1"  # the upstream's caller, as the emulator counts it
GRAPH = "graph.microsoft.com"
POLICIES = """
margin: 0
apis:
  graph.security:
    lease_ttl: 10s
    limits: [{calls: 100, per: 1m}]
  graph.hunting:
    lease_ttl: 10s
    limits: [{calls: 100, per: 1m}]
"""
# One hunting call per second: a second one at once is denied.
TIGHT = """
margin: 0
apis:
  graph.hunting:
    lease_ttl: 10s
    limits: [{calls: 1, per: 1s, granularity: 100ms}]
  graph.security:
    lease_ttl: 10s
    limits: [{calls: 1, per: 1m}]
"""
BASE_URLS = [None, f"https://{GRAPH}/v1.0"]  # httpx makes the second end in `/`: `v1.0//`


class FakeToken(AccessTokenProvider):
    """A bearer token without Entra ID: the emulator reads it as the caller."""

    async def get_authorization_token(
        self, uri: str, additional_authentication_context: dict[str, Any] | None = None
    ) -> str:
        return TOKEN

    def get_allowed_hosts_validator(self) -> AllowedHostsValidator:
        return AllowedHostsValidator([GRAPH])


class CountingClient(AsyncQuotaClient):
    """Counts leases granted and denied."""

    granted = 0
    denied = 0

    async def acquire(self, *args: Any, **kwargs: Any) -> Lease:
        try:
            lease = await super().acquire(*args, **kwargs)
        except Exception:
            self.denied += 1
            raise
        self.granted += 1
        return lease


@pytest.fixture
def emulator() -> DefenderEmulator:
    return DefenderEmulator(endpoints=DEFENDER_ENDPOINTS + GRAPH_ENDPOINTS, latency=0)


@pytest.fixture
def emulator_url(emulator: DefenderEmulator) -> Iterator[str]:
    with serve_in_thread(emulator.app) as url:
        yield url


@pytest.fixture
def graph_coordinator(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    with coordinator(valkey_server.url, tmp_path, POLICIES) as url:
        yield url


@pytest.fixture
def tight_coordinator(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    with coordinator(valkey_server.url, tmp_path, TIGHT) as url:
        yield url


@asynccontextmanager
async def graph_client(
    quota: AsyncQuotaClient, emulator_url: str, base_url: str | None = None, **options: Any
) -> AsyncIterator[tuple[GraphServiceClient, AsyncToEmulator]]:
    """The SDK as the msgraph-sdk recipe builds it, its requests moved to the emulator."""
    inner = AsyncToEmulator(emulator_url)
    transport = AsyncQuotaTransport(quota, inner=inner, **options)
    http = httpx.AsyncClient(transport=transport, **({"base_url": base_url} if base_url else {}))
    http = GraphClientFactory.create_with_default_middleware(client=http)
    auth = BaseBearerTokenAuthenticationProvider(FakeToken())
    adapter = GraphRequestAdapter(auth, client=http)
    try:
        yield GraphServiceClient(request_adapter=adapter), inner
    finally:
        await http.aclose()
        await transport.aclose()  # the SDK's transport in front does not close the one behind


def used(usage: dict[str, Any]) -> float:
    (limit,) = usage["limits"]
    return float(limit["used"])


def hunting_query() -> RunHuntingQueryPostRequestBody:
    return RunHuntingQueryPostRequestBody(query="DeviceInfo | take 1")


@pytest.mark.parametrize("base_url", BASE_URLS)
async def test_each_security_builder_takes_its_lease(
    graph_coordinator: str, emulator: DefenderEmulator, emulator_url: str, base_url: str | None
) -> None:
    async with (
        AsyncQuotaClient(graph_coordinator, TENANT) as quota,
        graph_client(quota, emulator_url, base_url, unrouted="raise") as (graph, inner),
    ):
        security = graph.security
        await security.alerts_v2.get()
        await security.alerts_v2.by_alert_id("da637578995287051192_756343937").get()
        await security.incidents.get()
        await security.incidents.by_incident_id("2972395").get()
        await security.secure_scores.get()
        await security.secure_score_control_profiles.get()
        await security.alerts.get()  # the legacy alerts API
        await security.threat_intelligence.hosts.by_host_id("contoso.com").get()
        await security.microsoft_graph_security_run_hunting_query.post(hunting_query())
        assert await quota.flush(timeout=5)
        assert used(await quota.usage("graph.security")) == 8
        assert used(await quota.usage("graph.hunting")) == 1

    assert {request.url.host for request in inner.seen} == {GRAPH}
    hunting = [r for r in inner.seen if r.url.path.endswith("runHuntingQuery")]
    assert [r.url.path.rsplit("/", 1)[-1] for r in hunting] == [
        "microsoft.graph.security.runHuntingQuery"
    ]
    if base_url is not None:  # what the issue saw: the empty segment, routed all the same
        assert all(r.url.path.startswith("/v1.0//security/") for r in inner.seen)
    arrivals = emulator.arrivals()
    assert [a.status for a in arrivals] == [200] * 9
    assert sorted({a.endpoint for a in arrivals}) == ["graph.hunting", "graph.security"]


async def test_kiota_retries_a_429_once_the_fleet_may(
    graph_coordinator: str, emulator: DefenderEmulator, emulator_url: str
) -> None:
    path = "/v1.0/security/alerts_v2"
    emulator.throttle(path, retry_after=1, times=1)
    async with (
        CountingClient(graph_coordinator, TENANT) as quota,
        graph_client(quota, emulator_url) as (graph, inner),
    ):
        await graph.security.alerts_v2.get()
        assert await quota.flush(timeout=5)
        usage = await quota.usage("graph.security")

    arrivals = emulator.arrivals(path)
    assert [a.status for a in arrivals] == [429, 200]
    # Each attempt took one lease, and each was charged once: the throttled one too.
    assert quota.granted == 2 and used(usage) == 2
    assert arrivals[1].at - arrivals[0].at >= 1.0  # kiota waited, and so did the lease
    assert inner.seen[0] is inner.seen[1]  # the same request object, routed again
    assert inner.seen[1].headers["Retry-Attempt"] == "1"


async def test_respond_lets_kiota_retry_a_denied_lease(
    tight_coordinator: str, emulator: DefenderEmulator, emulator_url: str
) -> None:
    async with (
        CountingClient(tight_coordinator, TENANT) as quota,
        graph_client(quota, emulator_url, wait=0.0, on_exhausted="respond") as (graph, inner),
    ):
        hunting = graph.security.microsoft_graph_security_run_hunting_query
        results = [await hunting.post(hunting_query())]
        assert await quota.flush(timeout=5)  # released: the window counts it from now
        results.append(await hunting.post(hunting_query()))  # denied, then retried by kiota
        assert await quota.flush(timeout=5)

    assert all(result is not None for result in results)
    assert quota.denied >= 1  # answered as Graph would, and retried by kiota
    # Only granted attempts reached the upstream, each once.
    assert quota.granted == len(inner.seen) == len(emulator.arrivals()) == 2
    assert [a.status for a in emulator.arrivals()] == [200, 200]


async def test_respond_gives_the_sdk_its_own_error(
    tight_coordinator: str, emulator: DefenderEmulator, emulator_url: str
) -> None:
    no_retry = RequestConfiguration[Any](options=[RetryHandlerOption(max_retries=0)])
    async with (
        AsyncQuotaClient(tight_coordinator, TENANT) as quota,
        graph_client(quota, emulator_url, wait=0.0, on_exhausted="respond") as (graph, inner),
    ):
        await graph.security.alerts_v2.get()
        with pytest.raises(ODataError) as caught:
            await graph.security.alerts_v2.get(request_configuration=no_retry)

    assert caught.value.response_status_code == 429
    assert caught.value.error is not None and caught.value.error.code == "429"
    assert "Maximum allowed 1 per 00:01:00" in (caught.value.error.message or "")
    assert len(inner.seen) == len(emulator.arrivals()) == 1
