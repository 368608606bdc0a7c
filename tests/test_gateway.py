"""The gateway over real HTTP: tools with no quotagate code (httpx, requests, curl) reach
the Defender emulator through `/gateway/{host}/...` on a real port, under leases of the
real coordinator; what it refuses before any connection; bodies that stream with flat
memory; a 429 that pauses the workers that use the Python client."""

from __future__ import annotations

import asyncio
import base64
import gzip
import http.client
import json
import logging
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import redis
import requests
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route as WebRoute

from quotagate.client import (
    DEFENDER_ROUTES,
    QuotaClient,
    QuotaExhausted,
    QuotaTransport,
    RouteTable,
    parse_throttle,
)
from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer, free_port
from quotagate.coordinator.gateway import PEEK, PathRefused, Upstream, tenant_from_token
from quotagate.coordinator.policy import load_policies
from quotagate.coordinator.settings import Settings

from .conftest import TEST_POLICIES, _wipe
from .emulator import DefenderEmulator
from .service import serve_in_thread

pytestmark = pytest.mark.server

DEFENDER = "api.security.microsoft.com"
GRAPH = "graph.microsoft.com"
ECHO = "echo.example.com"  # an extra host (gateway_hosts), sent to the echo server
TENANT = "contoso/app1"
INCIDENTS = "/api/incidents"
TOKEN = "gateway-test-token-0123456789"


def jwt(claims: dict[str, Any]) -> str:
    """A bearer token shaped like Entra ID's (unsigned: the gateway only reads claims)."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2ln"


# -- the upstreams ------------------------------------------------------------------------


class Echo:
    """An upstream that says what it got: method, path as sent, query, headers, body size.
    `/redirect` points at another host, `/bytes/{n}` streams n bytes, `/sink` counts them,
    `/gzip` answers gzip-encoded, `/peer` names the port the request came from."""

    def __init__(self) -> None:
        self.hits: list[str] = []
        self.hunted_at: list[float] = []  # when each hunting request arrived (time.time())
        self.app = Starlette(
            routes=[
                WebRoute("/redirect", self.redirect, methods=["GET"]),
                WebRoute("/bytes/{n:int}", self.stream, methods=["GET"]),
                WebRoute("/sink", self.sink, methods=["POST", "PUT"]),
                WebRoute("/throttle", self.throttle, methods=["GET"]),
                WebRoute("/cookie", self.cookie, methods=["GET"]),
                WebRoute("/gzip", self.gzipped, methods=["GET"]),
                WebRoute("/api/incidents/gzipped", self.gzipped_throttle, methods=["GET"]),
                WebRoute("/peer", self.peer, methods=["GET"]),
                WebRoute("/api/advancedhunting/run", self.hunting, methods=["POST"]),
                WebRoute("/{path:path}", self.echo, methods=["GET", "POST", "DELETE", "PATCH"]),
            ]
        )
        self.elsewhere = ""  # where `/redirect` points

    async def echo(self, request: Request) -> Response:
        self.hits.append(request.url.path)
        body = await request.body()
        reply = {
            "method": request.method,
            "raw_path": request.scope["raw_path"].decode(),
            "query": request.scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in request.headers.raw],
            "size": len(body),
        }
        return JSONResponse(
            reply, headers={"Connection": "close, X-Private", "X-Private": "1", "Keep-Alive": "5"}
        )

    async def redirect(self, request: Request) -> Response:
        self.hits.append("/redirect")
        return RedirectResponse(self.elsewhere + "/stolen", 302)

    async def stream(self, request: Request) -> Response:
        count = request.path_params["n"]
        chunk = b"x" * (1 << 20)

        async def chunks() -> Any:
            left = count
            while left > 0:
                yield chunk[: min(left, len(chunk))]
                left -= len(chunk)

        return StreamingResponse(chunks(), headers={"Content-Length": str(count)})

    async def sink(self, request: Request) -> Response:
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
        return JSONResponse({"size": size})

    async def hunting(self, request: Request) -> Response:
        """A large hunting answer (more than the gateway holds), `Stats` at its end; with
        `?ran=S`, answered S seconds after the request arrived, reporting S as its run
        time."""
        self.hunted_at.append(time.time())
        row = json.dumps({"DeviceName": "d" * 200, "Timestamp": "2024-01-01T00:00:00Z"})
        ran = float(request.query_params.get("ran", "0"))
        await asyncio.sleep(ran)
        reported = json.dumps(ran or 4.25).encode()

        async def chunks() -> Any:
            yield b'{"Schema": [], "Results": ['
            for i in range(5000):
                yield (("," if i else "") + row).encode()
            yield b'], "Stats": {"ExecutionTime": ' + reported + b', "resource_usage": {}}}'

        return StreamingResponse(chunks(), media_type="application/json")

    async def cookie(self, request: Request) -> Response:
        return JSONResponse({}, headers={"Set-Cookie": "session=tenant-a; Path=/"})

    async def gzipped(self, request: Request) -> Response:
        return Response(GZIPPED, headers={"Content-Encoding": "gzip"}, media_type="text/plain")

    async def gzipped_throttle(self, request: Request) -> Response:
        """A 429 whose time to wait is only in its gzip-encoded body."""
        body = {"error": {"code": "429", "message": "Rate limit exceeded. Try again in 7 seconds."}}
        encoded = gzip.compress(json.dumps(body).encode(), mtime=0)
        return Response(encoded, 429, headers={"Content-Encoding": "gzip"})

    async def peer(self, request: Request) -> Response:
        assert request.client is not None
        return JSONResponse({"port": request.client.port})

    async def throttle(self, request: Request) -> Response:
        body = {"error": {"code": "TooManyRequests", "message": "Please retry again later."}}
        return JSONResponse(body, 429, headers={"Retry-After": "2.5"})


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[DefenderEmulator, str]]:
    upstream = DefenderEmulator(speed=60, latency=0.06)  # plain answers in 1 ms
    with serve_in_thread(upstream.app) as url:
        yield upstream, url


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[Echo, str]]:
    upstream = Echo()
    with serve_in_thread(upstream.app) as url:
        yield upstream, url


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[tuple[Echo, str]]:
    upstream = Echo()
    with serve_in_thread(upstream.app) as url:
        yield upstream, url


@pytest.fixture
def emulated(emulator: tuple[DefenderEmulator, str]) -> DefenderEmulator:
    upstream, _ = emulator
    upstream.clear()
    upstream.reset()
    return upstream


def _settings(
    valkey: EmbeddedServer,
    tmp_path: Path,
    emulator_url: str,
    echo_url: str,
    **extra: Any,
) -> Settings:
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(TEST_POLICIES)
    fields: dict[str, Any] = {
        "redis_url": valkey.url,
        "policies": policy_file,
        "max_wait": 5.0,
        "gateway_wait": 0.0,
        "gateway_hosts": [ECHO],
        "gateway_upstreams": {DEFENDER: emulator_url, GRAPH: emulator_url, ECHO: echo_url},
        **extra,
    }
    return Settings(**fields)


@pytest.fixture
def coordinator(
    valkey_server: EmbeddedServer,
    tmp_path: Path,
    emulator: tuple[DefenderEmulator, str],
    echo: tuple[Echo, str],
) -> Iterator[str]:
    _wipe(valkey_server.url)
    settings = _settings(valkey_server, tmp_path, emulator[1], echo[1])
    with serve_in_thread(create_app(settings)) as url:
        yield url


def usage(url: str, tenant: str, api: str) -> dict[str, Any]:
    found: dict[str, Any] = httpx.get(f"{url}/v1/usage/{tenant}/{api}").json()
    return found


def settled(url: str, tenant: str, api: str) -> dict[str, Any]:
    """Usage once nothing is in flight (releases leave the gateway's critical path)."""
    deadline = time.monotonic() + 5
    while (found := usage(url, tenant, api))["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


def calls_used(found: dict[str, Any]) -> int:
    return int(next(lim["used"] for lim in found["limits"] if lim["kind"] == "calls"))


# -- tools with no quotagate code ---------------------------------------------------------


def test_httpx_through_the_gateway(coordinator: str, emulated: DefenderEmulator) -> None:
    gw = f"{coordinator}/gateway/{DEFENDER}"
    with httpx.Client(base_url=gw, headers={"X-Quotagate-Tenant": TENANT}) as http:
        answers = [http.get(INCIDENTS, headers={"Authorization": "Bearer app1"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[0].headers["x-quotagate"] == "coordinated"
    assert answers[0].headers["x-quotagate-api"] == "m365d.incidents"
    assert answers[0].json()["value"] == []
    assert [a.caller for a in emulated.arrivals(INCIDENTS)] == ["app1"] * 3
    assert calls_used(settled(coordinator, TENANT, "m365d.incidents")) == 3


def test_requests_through_the_gateway(coordinator: str, emulated: DefenderEmulator) -> None:
    gw = f"{coordinator}/gateway/{DEFENDER}"
    token = jwt({"tid": "contoso", "appid": "app2"})
    with requests.Session() as session:
        session.headers["Authorization"] = f"Bearer {token}"
        answer = session.get(f"{gw}/api/incidents", params={"$top": "10"})
        hunted = session.post(
            f"{gw}/api/advancedhunting/run",
            json={"Query": "DeviceInfo | take 1"},
            headers={"x-emulator-runtime": "120"},  # emulated seconds: 2 s real at speed 60
        )
    assert answer.status_code == 200, answer.text
    assert hunted.status_code == 200
    ran = hunted.json()["Stats"]["ExecutionTime"]
    # The tenant comes from the token's claims; the run time from the answer's Stats.
    assert calls_used(settled(coordinator, "contoso/app2", "m365d.incidents")) == 1
    hunting = settled(coordinator, "contoso/app2", "m365d.advanced-hunting")
    runtime = [lim["used"] for lim in hunting["limits"] if lim["kind"] == "runtime"]
    assert runtime and all(abs(used - ran) < 0.01 for used in runtime)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_through_the_gateway(coordinator: str, emulated: DefenderEmulator) -> None:
    done = subprocess.run(
        [
            "curl",
            "--silent",
            "--show-error",
            "--include",
            "--header",
            "Authorization: Bearer app3",
            "--header",
            f"X-Quotagate-Tenant: {TENANT}",
            f"{coordinator}/gateway/{DEFENDER}/api/incidents?$top=5",
        ],
        capture_output=True,
        check=True,
        timeout=30,
    )
    head, _, body = done.stdout.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"x-quotagate: coordinated" in head.lower()
    assert json.loads(body)["value"] == []
    assert [a.caller for a in emulated.arrivals(INCIDENTS)] == ["app3"]


def test_forwarded_as_sent(
    coordinator: str, echo: tuple[Echo, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Path and query as sent, Authorization untouched (and in no log line), ours and
    hop-by-hop headers not forwarded, Host the upstream's; the answer's hop-by-hop
    headers dropped too."""
    caplog.set_level(logging.DEBUG)
    answer = httpx.post(
        f"{coordinator}/gateway/{ECHO}/api/a%20b/x?$filter=a%20eq%20'b'&x=1",
        content=b"payload",
        headers={
            "Authorization": "Bearer upstream-secret",
            "X-Quotagate-Tenant": TENANT,
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic eA==",
            "X-End": "2",
        },
    )
    assert answer.status_code == 200
    assert answer.headers["x-quotagate"] == "uncoordinated"  # no route names echo's host
    seen = answer.json()
    headers = dict(seen["headers"])
    assert seen["raw_path"] == "/api/a%20b/x"
    assert seen["query"] == "$filter=a%20eq%20'b'&x=1"
    assert seen["size"] == len(b"payload")
    assert headers["authorization"] == "Bearer upstream-secret"
    assert headers["x-end"] == "2"
    assert headers["host"] == echo[1].removeprefix("http://")
    for name in ("x-quotagate-tenant", "x-hop", "keep-alive", "proxy-authorization"):
        assert name not in headers
    assert "x-private" not in answer.headers
    assert "keep-alive" not in answer.headers
    assert caplog.records  # the unrouted host was logged ...
    assert not [r for r in caplog.records if "upstream-secret" in r.getMessage()]  # ... not this


def test_no_header_is_added_that_the_tool_did_not_send(
    coordinator: str, echo: tuple[Echo, str]
) -> None:
    """Beside `Host` and the body's framing, the upstream gets the tool's headers only:
    no User-Agent, Accept, Accept-Encoding or Content-Type of the gateway's client."""
    host, _, port = coordinator.removeprefix("http://").partition(":")
    seen = []
    for method, body in (("GET", None), ("POST", b"payload")):
        connection = http.client.HTTPConnection(host, int(port), timeout=10)
        try:
            connection.putrequest(method, f"/gateway/{ECHO}/bare", skip_accept_encoding=True)
            connection.putheader("X-One", "1")
            if body is not None:
                connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
            answer = connection.getresponse()
            assert answer.status == 200
            seen.append({name for name, _ in json.loads(answer.read())["headers"]})
        finally:
            connection.close()
    assert seen == [{"host", "x-one"}, {"host", "x-one", "content-length"}]


def test_path_and_query_go_exactly_as_given(coordinator: str, echo: tuple[Echo, str]) -> None:
    path = "/api/%7Euser/%41b+c!*'(),;=:@~x%25"
    query = "a=%7E&b=+%2B&c=%25&d&e=%2f&f=%E2%82%AC&g=a=b"
    status, body = raw_get(coordinator, f"/gateway/{ECHO}{path}?{query}")
    assert status == 200, body
    assert (body["raw_path"], body["query"]) == (path, query)


def test_a_target_that_cannot_go_byte_for_byte_is_refused(
    valkey_server: EmbeddedServer, tmp_path: Path, echo: tuple[Echo, str]
) -> None:
    """Bytes outside printable ASCII in a path or query: httptools refuses them itself,
    the gateway too, for a server (h11) that lets them through."""
    app = create_app(_settings(valkey_server, tmp_path, echo[1], echo[1]))
    before = len(echo[0].hits)
    with serve_in_thread(app) as url:
        host, _, port = url.removeprefix("http://").partition(":")
        with socket.create_connection((host, int(port)), timeout=10) as raw:
            raw.sendall(
                f"GET /gateway/{ECHO}/caf\xc3\xa9 HTTP/1.1\r\n".encode("latin-1")
                + b"Host: gateway\r\nConnection: close\r\n\r\n"
            )
            assert raw.recv(65536).startswith(b"HTTP/1.1 400")
        gateway = app.state.gateway
        for path, query in ((b"/caf\xc3\xa9", b""), (b"/x", b"q=\xe2\x82\xac"), (b"/x", b"a b")):
            with pytest.raises(PathRefused):
                gateway.target(f"/gateway/{ECHO}".encode() + path, query)
    assert len(echo[0].hits) == before


def test_a_chunked_body_goes_chunked(coordinator: str, echo: tuple[Echo, str]) -> None:
    def parts() -> Iterator[bytes]:
        yield from (b"z" * 1000 for _ in range(50))  # no length: httpx sends it chunked

    answer = httpx.post(f"{coordinator}/gateway/{ECHO}/sink", content=parts())
    assert answer.status_code == 200
    assert answer.json()["size"] == 50_000


def test_an_encoded_answer_passes_as_it_came(coordinator: str, echo: tuple[Echo, str]) -> None:
    host, _, port = coordinator.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", f"/gateway/{ECHO}/gzip", headers={"Accept-Encoding": "gzip"})
        answer = connection.getresponse()
        assert answer.getheader("content-encoding") == "gzip"
        assert answer.read() == GZIPPED  # byte for byte, not decoded
    finally:
        connection.close()


def test_an_encoded_429_is_read_for_its_outcome_and_passed_as_it_came(
    valkey_server: EmbeddedServer, tmp_path: Path, echo: tuple[Echo, str]
) -> None:
    _wipe(valkey_server.url)
    settings = _settings(valkey_server, tmp_path, echo[1], echo[1])
    headers = {"X-Quotagate-Tenant": TENANT}
    with serve_in_thread(create_app(settings)) as url:
        gw = f"{url}/gateway/{DEFENDER}/api/incidents/gzipped"
        throttled = httpx.get(gw, headers=headers)
        paused = httpx.get(gw, headers=headers)
    assert throttled.status_code == 429
    assert throttled.headers["content-encoding"] == "gzip"
    assert throttled.json()["error"]["message"].endswith("in 7 seconds.")  # httpx decodes
    # The wait was only in the encoded body: the gateway decoded it to pause the fleet.
    assert paused.headers["x-quotagate"] == "exhausted"
    assert int(paused.headers["retry-after"]) >= 5


def test_the_environments_proxy_carries_the_calls(
    valkey_server: EmbeddedServer,
    tmp_path: Path,
    echo: tuple[Echo, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An egress proxy named by `HTTP_PROXY` as the coordinator starts (here another
    echo server, which answers a proxy's request as its own) carries the gateway's
    upstream calls, but for the hosts `NO_PROXY` names."""
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    proxy = Echo()
    before = len(echo[0].hits)
    settings = _settings(valkey_server, tmp_path, echo[1], echo[1])
    with serve_in_thread(proxy.app) as proxy_url:
        monkeypatch.setenv("HTTP_PROXY", proxy_url.replace("://", "://egress:secret@"))
        with serve_in_thread(create_app(settings)) as url:
            status, body = raw_get(url, f"/gateway/{ECHO}/via/proxy?x=1")
    assert status == 200, body
    said = dict(body["headers"])
    assert said["proxy-authorization"] == "Basic ZWdyZXNzOnNlY3JldA=="  # the proxy's login
    assert proxy.hits == ["/via/proxy"]
    assert len(echo[0].hits) == before
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with serve_in_thread(create_app(settings)) as url:
        assert raw_get(url, f"/gateway/{ECHO}/direct")[0] == 200
    assert echo[0].hits[before:] == ["/direct"]


def test_upstream_connections_are_kept_alive(coordinator: str, echo: tuple[Echo, str]) -> None:
    with httpx.Client() as http:
        ports = {http.get(f"{coordinator}/gateway/{ECHO}/peer").json()["port"] for _ in range(20)}
    assert len(ports) == 1


def test_a_large_hunting_answer_charges_its_execution_time(
    valkey_server: EmbeddedServer, tmp_path: Path, echo: tuple[Echo, str]
) -> None:
    _wipe(valkey_server.url)
    settings = _settings(valkey_server, tmp_path, echo[1], echo[1])
    with serve_in_thread(create_app(settings)) as url:
        answer = httpx.post(
            f"{url}/gateway/{DEFENDER}/api/advancedhunting/run",
            json={"Query": "DeviceInfo"},
            headers={"X-Quotagate-Tenant": TENANT},
        )
        assert answer.status_code == 200
        assert len(answer.content) > 10 * PEEK
        assert answer.json()["Stats"]["ExecutionTime"] == 4.25
        hunting = settled(url, TENANT, "m365d.advanced-hunting")
    runtime = [lim["used"] for lim in hunting["limits"] if lim["kind"] == "runtime"]
    assert runtime == [4.25, 4.25]


def test_a_hunting_call_is_charged_at_its_latest_arrival_the_answer_allows(
    valkey_server: EmbeddedServer, tmp_path: Path, echo: tuple[Echo, str]
) -> None:
    """The answer's `Stats.ExecutionTime` is the upstream's own: the call arrived at least
    that long before the answer, so the release charges its call there, not at the
    release (design rule 3 needs only a charge no earlier than the arrival)."""
    _wipe(valkey_server.url)
    settings = _settings(valkey_server, tmp_path, echo[1], echo[1])
    upstream, _ = echo
    with serve_in_thread(create_app(settings)) as url:
        answer = httpx.post(
            f"{url}/gateway/{DEFENDER}/api/advancedhunting/run?ran=2",
            json={"Query": "DeviceInfo"},
            headers={"X-Quotagate-Tenant": TENANT},
            timeout=10,
        )
        assert answer.status_code == 200
        assert answer.json()["Stats"]["ExecutionTime"] == 2
        settled(url, TENANT, "m365d.advanced-hunting")
    arrived_ms = upstream.hunted_at[-1] * 1000
    policy = load_policies().apis["m365d.advanced-hunting"]
    calls = next(lim for lim in policy.limits if lim.kind.value == "calls")
    with redis.Redis.from_url(valkey_server.url) as store:
        counter = store.hgetall(f"qg:{{{TENANT}|m365d.advanced-hunting}}:c60000/1000")
    charged = [int(name) for name, units in counter.items() if name.isdigit() and int(units)]
    assert calls.granularity_ms == 1000 and len(charged) == 1
    # Released 2 s after the arrival (and a little more): charged at release - 2 s, so in
    # the arrival's bucket or the next one; never before the arrival, nor at the release.
    assert arrived_ms // 1000 <= charged[0] <= arrived_ms // 1000 + 1


def test_no_cookie_is_kept_between_calls(coordinator: str) -> None:
    """One upstream client serves every tenant: a cookie one answer sets goes to that
    tool, and never along with another call."""
    first = httpx.get(f"{coordinator}/gateway/{ECHO}/cookie")
    assert first.headers["set-cookie"].startswith("session=tenant-a")
    later = httpx.get(f"{coordinator}/gateway/{ECHO}/echo")
    assert "cookie" not in dict(later.json()["headers"])


def test_tenant_from_token_claims() -> None:
    assert tenant_from_token(f"Bearer {jwt({'tid': 't1', 'appid': 'a1'})}") == "t1/a1"
    assert tenant_from_token(f"Bearer {jwt({'tid': 't1', 'azp': 'a2'})}") == "t1/a2"
    assert tenant_from_token(f"Bearer {jwt({'tid': 't1'})}") is None
    assert tenant_from_token("Bearer not-a-jwt") is None
    assert tenant_from_token("Basic dXNlcjpwdw==") is None
    assert tenant_from_token(None) is None


def test_no_tenant_is_a_400_naming_both_ways(coordinator: str) -> None:
    answer = httpx.get(f"{coordinator}/gateway/{DEFENDER}{INCIDENTS}")
    assert answer.status_code == 400
    assert answer.json()["error"] == "tenant_required"
    assert "X-Quotagate-Tenant" in answer.json()["detail"]
    assert "tid" in answer.json()["detail"]


# -- never an open proxy ------------------------------------------------------------------


def raw_get(url: str, target: str) -> tuple[int, dict[str, Any]]:
    """GET `target` exactly as written (no client normalises it on the way)."""
    host, _, port = url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", target, headers={"X-Quotagate-Tenant": TENANT})
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        connection.close()


GZIPPED = gzip.compress(b"incidents " * 1000, mtime=0)

REFUSED_HOSTS = [
    "127.0.0.1",
    "[::1]",
    "[::ffff:127.0.0.1]",
    "169.254.169.254",
    "metadata.google.internal",
    "2130706433",
    "localhost",
    f"{DEFENDER}:8443",
    f"{DEFENDER}:443",
    f"user@{DEFENDER}",
    f"{DEFENDER}@evil.example",
    f"{DEFENDER}.evil.example",
    f"{DEFENDER}.",
    "evil.example",
    f"{DEFENDER}%2F@evil.example",
    f"evil.example%2F{DEFENDER}",
    "api.security.microsoft.com%00",
    "",
]


@pytest.mark.parametrize("host", REFUSED_HOSTS)
def test_other_hosts_are_refused_before_any_connection(
    valkey_server: EmbeddedServer, tmp_path: Path, host: str
) -> None:
    seen: list[object] = []

    async def record(session: object, context: object, params: object) -> None:
        seen.append(params)

    def recording() -> aiohttp.ClientSession:
        """The gateway's session, telling every request it starts (before connecting)."""
        traced = aiohttp.TraceConfig()
        traced.on_request_start.append(record)
        return aiohttp.ClientSession(trace_configs=[traced])

    settings = _settings(valkey_server, tmp_path, "http://127.0.0.1:9", "http://127.0.0.1:9")
    app = create_app(settings)
    with serve_in_thread(app) as url:
        app.state.gateway.upstream = Upstream(recording)
        status, body = raw_get(url, f"/gateway/{host}/api/incidents")
        assert raw_get(url, f"/gateway/{ECHO}/api/incidents")[0] == 502  # would be seen
    assert 400 <= status < 500, body
    assert body.get("error") in ("host_not_allowed", "invalid_path", "not_found"), body
    assert len(seen) == 1  # the request to the allowed host only


@pytest.mark.parametrize(
    "path",
    [
        "/api/machines%2F..%2F..%2Fother",
        "/api/../../other",
        "/api/./incidents",
        "/api%5Cincidents",
        "/api\\incidents",
    ],
)
def test_paths_that_could_mean_another_path_are_refused(coordinator: str, path: str) -> None:
    status, body = raw_get(coordinator, f"/gateway/{DEFENDER}{path}")
    assert status == 400, body
    assert body["error"] == "invalid_path"


@pytest.mark.parametrize("path", ["//evil.example/x", "/@evil.example/x", "/x@evil.example"])
def test_a_path_cannot_name_another_host(
    coordinator: str, echo: tuple[Echo, str], elsewhere: tuple[Echo, str], path: str
) -> None:
    status, body = raw_get(coordinator, f"/gateway/{ECHO}{path}")
    assert status == 200, body
    assert body["raw_path"] == path  # it reached the host it named, path and all
    assert elsewhere[0].hits == []


def test_a_redirect_is_handed_back_not_followed(
    coordinator: str, echo: tuple[Echo, str], elsewhere: tuple[Echo, str]
) -> None:
    upstream, _ = echo
    other, other_url = elsewhere
    upstream.elsewhere = other_url
    answer = httpx.get(f"{coordinator}/gateway/{ECHO}/redirect", follow_redirects=False)
    assert answer.status_code == 302
    assert answer.headers["location"] == f"{other_url}/stolen"
    assert other.hits == []


def test_unrouted_paths_pass_marked_or_are_refused(
    valkey_server: EmbeddedServer,
    tmp_path: Path,
    coordinator: str,
    emulated: DefenderEmulator,
    emulator: tuple[DefenderEmulator, str],
    echo: tuple[Echo, str],
) -> None:
    answer = httpx.get(f"{coordinator}/gateway/{DEFENDER}/other/path")
    assert answer.status_code == 200
    assert answer.headers["x-quotagate"] == "uncoordinated"
    settings = _settings(valkey_server, tmp_path, emulator[1], echo[1], gateway_unrouted="refuse")
    with serve_in_thread(create_app(settings)) as url:
        refused = httpx.get(f"{url}/gateway/{DEFENDER}/other/path")
    assert refused.status_code == 404
    assert refused.json()["error"] == "unrouted"
    assert len(emulated.arrivals("/other/path")) == 1


def test_a_graph_batch_passes_marked_and_logged_or_is_refused(
    valkey_server: EmbeddedServer,
    tmp_path: Path,
    coordinator: str,
    emulated: DefenderEmulator,
    emulator: tuple[DefenderEmulator, str],
    echo: tuple[Echo, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = {"requests": [{"id": "1", "method": "GET", "url": "/security/incidents"}]}
    headers = {"X-Quotagate-Tenant": TENANT}
    with caplog.at_level(logging.WARNING, "quotagate"):
        answer = httpx.post(
            f"{coordinator}/gateway/{GRAPH}/v1.0/$batch", json=body, headers=headers
        )
    assert answer.headers["x-quotagate"] == "uncoordinated"
    told = [r.getMessage() for r in caplog.records]
    assert f"gateway: {GRAPH} POST:/v1.0/_id_ has no route: passed uncoordinated" in told
    assert len(emulated.arrivals("/v1.0/$batch")) == 1
    settings = _settings(valkey_server, tmp_path, emulator[1], echo[1], gateway_unrouted="refuse")
    with serve_in_thread(create_app(settings)) as url:
        refused = httpx.post(f"{url}/gateway/{GRAPH}/v1.0/$batch", json=body, headers=headers)
    assert refused.status_code == 404
    assert refused.json()["error"] == "unrouted"
    assert len(emulated.arrivals("/v1.0/$batch")) == 1


def test_quotagate_token_in_its_own_header(
    valkey_server: EmbeddedServer,
    tmp_path: Path,
    emulator: tuple[DefenderEmulator, str],
    echo: tuple[Echo, str],
) -> None:
    _wipe(valkey_server.url)
    settings = _settings(
        valkey_server, tmp_path, emulator[1], echo[1], tokens={TOKEN: ["contoso/*"]}
    )
    with serve_in_thread(create_app(settings)) as url:
        gw = f"{url}/gateway/{DEFENDER}{INCIDENTS}"
        upstream = {"Authorization": "Bearer app1", "X-Quotagate-Tenant": TENANT}
        missing = httpx.get(gw, headers=upstream)
        wrong = httpx.get(gw, headers={**upstream, "X-Quotagate-Token": "x" * 20})
        other = httpx.get(
            gw, headers={**upstream, "X-Quotagate-Token": TOKEN, "X-Quotagate-Tenant": "fabrikam/a"}
        )
        unrouted = httpx.get(f"{url}/gateway/{DEFENDER}/other", headers=upstream)
        good = httpx.get(gw, headers={**upstream, "X-Quotagate-Token": TOKEN})
    assert (missing.status_code, wrong.status_code, other.status_code) == (401, 401, 403)
    assert unrouted.status_code == 401  # no token, no pass-through either
    assert good.status_code == 200


def test_bad_wait_header(coordinator: str) -> None:
    answer = httpx.get(
        f"{coordinator}/gateway/{DEFENDER}{INCIDENTS}",
        headers={"X-Quotagate-Tenant": TENANT, "X-Quotagate-Wait": "soon"},
    )
    assert answer.status_code == 422
    assert answer.json()["field"] == "X-Quotagate-Wait"


def test_an_upstream_that_cannot_be_reached_refunds(
    valkey_server: EmbeddedServer, tmp_path: Path, echo: tuple[Echo, str]
) -> None:
    _wipe(valkey_server.url)
    closed = f"http://127.0.0.1:{free_port()}"
    settings = _settings(valkey_server, tmp_path, closed, echo[1])
    with serve_in_thread(create_app(settings)) as url:
        answer = httpx.get(
            f"{url}/gateway/{DEFENDER}{INCIDENTS}", headers={"X-Quotagate-Tenant": TENANT}
        )
        assert answer.status_code == 502
        assert answer.json()["error"] == "upstream_unreachable"
        assert calls_used(settled(url, TENANT, "m365d.incidents")) == 0


def test_an_upstream_that_stays_silent_times_out(
    valkey_server: EmbeddedServer,
    tmp_path: Path,
    emulator: tuple[DefenderEmulator, str],
    emulated: DefenderEmulator,
    echo: tuple[Echo, str],
) -> None:
    _wipe(valkey_server.url)
    emulated.delay(INCIDENTS, 1.0)  # real seconds, past the gateway's timeout
    settings = _settings(valkey_server, tmp_path, emulator[1], echo[1], gateway_timeout=0.2)
    with serve_in_thread(create_app(settings)) as url:
        answer = httpx.get(
            f"{url}/gateway/{DEFENDER}{INCIDENTS}", headers={"X-Quotagate-Tenant": TENANT}
        )
        assert answer.status_code == 504
        assert answer.json()["error"] == "upstream_timeout"
        found = settled(url, TENANT, "m365d.incidents")
    assert found["in_flight"] == 0  # released (failed: the call may have reached it)
    assert calls_used(found) == 1


# -- throttles ----------------------------------------------------------------------------


def test_an_upstream_429_pauses_the_python_clients_of_the_tenant(
    coordinator: str, emulated: DefenderEmulator, emulator: tuple[DefenderEmulator, str]
) -> None:
    emulated.throttle(INCIDENTS, retry_after=3)
    gw = f"{coordinator}/gateway/{DEFENDER}"
    headers = {"X-Quotagate-Tenant": TENANT, "Authorization": "Bearer app1"}
    throttled = httpx.get(f"{gw}{INCIDENTS}", headers=headers)
    assert throttled.status_code == 429
    assert throttled.headers["retry-after"] == "3"  # the upstream's own answer
    assert "Maximum allowed" in throttled.json()["error"]["message"]

    # A worker on the Python client, same tenant: paused before it calls.
    routes = RouteTable(
        [replace(r, hosts={"127.0.0.1"}) for r in DEFENDER_ROUTES if r.hosts], defaults=()
    )
    with QuotaClient(coordinator, TENANT) as quota:
        with httpx.Client(transport=QuotaTransport(quota, routes, wait=0)) as worker:
            with pytest.raises(QuotaExhausted) as raised:
                worker.get(f"{emulator[1]}{INCIDENTS}")
    assert raised.value.retry_after is not None and raised.value.retry_after > 1

    # The next tool through the gateway gets a Defender-shaped 429 from quotagate.
    paused = httpx.get(f"{gw}{INCIDENTS}", headers=headers)
    assert paused.status_code == 429
    assert paused.headers["x-quotagate"] == "exhausted"
    assert int(paused.headers["retry-after"]) >= 2
    said = parse_throttle(429, paused.headers, paused.content)
    assert said is not None and said.code == "429" and said.retry_after is not None
    assert len(emulated.arrivals(INCIDENTS)) == 1  # neither reached the upstream


def test_graph_gets_graphs_429_shape(coordinator: str, emulated: DefenderEmulator) -> None:
    path = "/v1.0/security/alerts_v2"
    emulated.throttle(path, retry_after=3)
    gw = f"{coordinator}/gateway/{GRAPH}{path}"
    headers = {"X-Quotagate-Tenant": TENANT}
    assert httpx.get(gw, headers=headers).status_code == 429
    paused = httpx.get(gw, headers=headers)
    assert paused.headers["x-quotagate"] == "exhausted"
    error = paused.json()["error"]
    assert error["code"] == "TooManyRequests" and error["innerError"]["code"] == "429"


# -- waiting and long calls --------------------------------------------------------------

SHORT = (
    TEST_POLICIES
    + """  m365d.incidents:
    lease_ttl: 400ms
    limits: [{calls: 1, per: 500ms, granularity: 100ms}]
"""
)


def _short(valkey: EmbeddedServer, tmp_path: Path, upstream: str) -> Settings:
    _wipe(valkey.url)
    settings = _settings(valkey, tmp_path, upstream, upstream)
    assert settings.policies is not None
    settings.policies.write_text(SHORT)
    return settings


def test_a_request_waits_for_its_lease_with_its_body(
    valkey_server: EmbeddedServer, tmp_path: Path, echo: tuple[Echo, str]
) -> None:
    body = bytes(range(256)) * 1000  # several ASGI messages
    with serve_in_thread(create_app(_short(valkey_server, tmp_path, echo[1]))) as url:
        gw = f"{url}/gateway/{DEFENDER}/api/incidents/7"
        headers = {"X-Quotagate-Tenant": TENANT, "X-Quotagate-Wait": "3"}
        with httpx.Client(headers=headers) as http:
            first = http.patch(gw, content=body)
            second = http.patch(gw, content=body, headers={"X-Quotagate-Priority": "1"})
    assert first.status_code == second.status_code == 200
    assert first.json()["size"] == second.json()["size"] == len(body)
    assert float(second.headers["x-quotagate-waited"]) > 0.1  # the window had to pass


def test_a_long_call_keeps_its_lease(
    valkey_server: EmbeddedServer,
    tmp_path: Path,
    emulator: tuple[DefenderEmulator, str],
    emulated: DefenderEmulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulated.delay(INCIDENTS, 1.0)  # real seconds: more than twice the lease's 400 ms
    with serve_in_thread(create_app(_short(valkey_server, tmp_path, emulator[1]))) as url:
        answer = httpx.get(
            f"{url}/gateway/{DEFENDER}{INCIDENTS}", headers={"X-Quotagate-Tenant": TENANT}
        )
        assert answer.status_code == 200
        assert calls_used(settled(url, TENANT, "m365d.incidents")) == 1
    assert not [r for r in caplog.records if "failed" in r.getMessage()]


# -- bodies stream ------------------------------------------------------------------------


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


class Peak:
    """The highest resident set size of this process (coordinator, upstream and the
    tool all run in it) while the block runs, sampled."""

    def __init__(self) -> None:
        self.start = _rss()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss())

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


MB = 1 << 20
SIZE = 200 * MB


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_a_200_mb_body_streams_both_ways_with_flat_memory(
    coordinator: str, echo: tuple[Echo, str]
) -> None:
    chunk = b"y" * MB

    def generated() -> Iterator[bytes]:
        for _ in range(SIZE // MB):
            yield chunk

    gw = f"{coordinator}/gateway/{ECHO}"
    with httpx.Client(timeout=60) as http, Peak() as up:
        sent = http.post(f"{gw}/sink", content=generated(), headers={"Content-Length": str(SIZE)})
    assert sent.status_code == 200
    assert sent.json()["size"] == SIZE
    with httpx.Client(timeout=60) as http, Peak() as down:
        got = 0
        with http.stream("GET", f"{gw}/bytes/{SIZE}") as answer:
            for part in answer.iter_raw():
                got += len(part)
    assert got == SIZE
    # Buffering either body would grow the process by 200 MB.
    assert up.growth < 40 * MB, up.growth
    assert down.growth < 40 * MB, down.growth


def test_the_api_body_limit_still_holds_elsewhere(coordinator: str) -> None:
    big = httpx.post(f"{coordinator}/v1/leases", content=b"{" + b" " * (PEEK * 2) + b"}")
    assert big.status_code == 413


def test_a_429_that_names_a_lower_limit_teaches_it(
    coordinator: str, emulated: DefenderEmulator
) -> None:
    emulated.throttle(INCIDENTS, retry_after=1, limit=20, window=60)
    headers = {"X-Quotagate-Tenant": TENANT, "Authorization": "Bearer app1"}
    throttled = httpx.get(f"{coordinator}/gateway/{DEFENDER}{INCIDENTS}", headers=headers)
    assert throttled.status_code == 429
    first = settled(coordinator, TENANT, "m365d.incidents")["limits"][0]
    assert (first["amount"], first["configured"]) == (20, 50)


def test_the_readmes_requests_recipe_runs_as_written(
    coordinator: str, emulated: DefenderEmulator
) -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("## The gateway")[1].split("\n## ")[0]
    recipe = section.split("```python\n")[1].split("```")[0]
    namespace: dict[str, Any] = {"token": jwt({"tid": "contoso", "appid": "readme"})}
    exec(recipe.replace("http://quotagate:8080", coordinator), namespace)
    assert namespace["incidents"] == []
    assert emulated.arrivals("/api/incidents")[-1].caller.startswith("ey")  # its own token
    found = settled(coordinator, "contoso/readme", "m365d.incidents")
    assert calls_used(found) == 1  # charged to the tenant the token names
