"""Contract tests of HTTP API v1 through real HTTP (uvicorn on a free port)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.settings import Settings

from .conftest import _wipe
from .service import serve_in_thread

pytestmark = pytest.mark.server

INCIDENTS = {"tenant": "contoso/app-1", "api": "m365d.incidents"}


@pytest.fixture
def http(coordinator_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=coordinator_url, timeout=10) as client:
        yield client


def acquire(http: httpx.Client, **body: object) -> httpx.Response:
    return http.post("/v1/leases", json={**INCIDENTS, **body})


def test_acquire_replies_with_the_lease(http: httpx.Client) -> None:
    reply = acquire(http, key="GET:/api/incidents", holder="playbook-7")
    assert reply.status_code == 200
    lease = reply.json()
    assert set(lease) == {"lease_id", "tenant", "api", "key", "cost", "expires_in", "waited"}
    assert lease["tenant"] == "contoso/app-1" and lease["api"] == "m365d.incidents"
    assert lease["key"] == "GET:/api/incidents" and lease["cost"] == 1
    assert lease["expires_in"] == 60.0


def test_the_51st_incidents_call_in_a_minute_gets_429_with_the_exact_wait(
    http: httpx.Client,
) -> None:
    leases = [acquire(http).json()["lease_id"] for _ in range(50)]
    assert len(set(leases)) == 50
    for lease in leases:  # each call answered: its charge sits at its release
        assert http.post(f"/v1/leases/{lease}/release", json={"outcome": "ok"}).status_code == 200
    before = time.monotonic()
    denied = acquire(http)
    usage = http.get("/v1/usage/contoso/app-1/m365d.incidents").json()
    between = time.monotonic() - before
    assert denied.status_code == 429
    body = denied.json()
    assert body["error"] == "quota_exhausted"
    assert body["limit"] == {"kind": "calls", "amount": 50, "window": 60.0}
    assert denied.headers["Retry-After"] == str(math.ceil(body["retry_after"]))
    # The wait ends when the oldest counted bucket leaves the window: the same instant
    # that usage reports a moment later, on the same Redis clock.
    oldest_ends = usage["limits"][0]["resets_in"]
    assert 0 <= body["retry_after"] - oldest_ends <= between + 0.001
    assert 59 < body["retry_after"] <= 62


def test_not_called_makes_room_again(http: httpx.Client) -> None:
    leases = [acquire(http).json()["lease_id"] for _ in range(50)]
    assert acquire(http).status_code == 429
    released = http.post(f"/v1/leases/{leases[7]}/release", json={"outcome": "not_called"})
    assert released.json() == {"released": True}
    assert acquire(http).status_code == 200


def test_a_throttled_release_pauses_every_worker(http: httpx.Client) -> None:
    lease = acquire(http).json()["lease_id"]
    other_tenant = http.post("/v1/leases", json={**INCIDENTS, "tenant": "fabrikam"})
    assert other_tenant.status_code == 200
    released = http.post(
        f"/v1/leases/{lease}/release",
        json={"outcome": "throttled", "status_code": 429, "retry_after": 2.5},
    )
    assert released.status_code == 200
    paused = acquire(http, holder="another-worker")
    assert paused.status_code == 429
    assert paused.json()["error"] == "cooling_down"
    assert 2.0 < paused.json()["retry_after"] <= 2.5
    assert paused.headers["Retry-After"] == "3"
    assert http.get("/v1/usage/contoso/app-1/m365d.incidents").json()["cooldown"] > 2.0
    assert http.post("/v1/leases", json={**INCIDENTS, "tenant": "fabrikam"}).status_code == 200


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tenant": "a{b}"}, "tenant"),
        ({"tenant": "a|b"}, "tenant"),
        ({"tenant": ""}, "tenant"),
        ({"api": "M365D"}, "api"),
        ({"key": "{x}"}, "key"),
        ({"cost": 0}, "cost"),
        ({"cost": -1}, "cost"),
        ({"cost": 1.5}, "cost"),
        ({"cost": "2"}, "cost"),
        ({"cost": 51}, "cost"),
        ({"wait": -1}, "wait"),
        ({"runtime_estimate": -3}, "runtime_estimate"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_acquire_is_422_naming_the_field(
    http: httpx.Client, body: dict[str, object], field: str
) -> None:
    reply = acquire(http, **body)
    assert reply.status_code == 422, reply.text
    assert reply.json()["error"] == "invalid_request"
    assert reply.json()["field"] == field
    assert field in reply.json()["detail"]
    usage = http.get("/v1/usage/contoso/app-1/m365d.incidents").json()
    assert usage["limits"][0]["used"] == 0


def test_non_finite_numbers_are_refused(http: httpx.Client) -> None:
    for text in ('{"tenant": "t", "api": "m365d.incidents", "wait": NaN}',
                 '{"tenant": "t", "api": "m365d.incidents", "wait": Infinity}'):  # fmt: skip
        reply = http.post("/v1/leases", content=text, headers={"content-type": "application/json"})
        assert reply.status_code == 422


def test_unknown_api_and_unknown_lease_are_404(http: httpx.Client) -> None:
    reply = acquire(http, api="m365d.nothing")
    assert (reply.status_code, reply.json()["error"]) == (404, "unknown_api")
    assert http.get("/v1/usage/contoso/m365d.nothing").status_code == 404
    assert http.get("/v1/policies/m365d.nothing").status_code == 404
    for lease_id in ("nope", "Y29udG9zb3xtMzY1ZC5pbmNpZGVudHN8." + "0" * 32):
        for action, body in (("release", {"outcome": "ok"}), ("renew", {})):
            reply = http.post(f"/v1/leases/{lease_id}/{action}", json=body)
            assert (reply.status_code, reply.json()["error"]) == (404, "unknown_lease")


def test_released_twice_is_404_and_changes_nothing(http: httpx.Client) -> None:
    lease = acquire(http).json()["lease_id"]
    assert http.post(f"/v1/leases/{lease}/release", json={"outcome": "ok"}).status_code == 200
    again = http.post(f"/v1/leases/{lease}/release", json={"outcome": "not_called"})
    assert again.status_code == 404
    assert http.get("/v1/usage/contoso/app-1/m365d.incidents").json()["limits"][0]["used"] == 1


def test_release_validates_its_body(http: httpx.Client) -> None:
    lease = acquire(http).json()["lease_id"]
    for body, field in (
        ({"outcome": "maybe"}, "outcome"),
        ({"outcome": "ok", "retry_after": -1}, "retry_after"),
        ({"outcome": "ok", "runtime": "long"}, "runtime"),
        ({"outcome": "ok", "status_code": 1000}, "status_code"),
        ({"outcome": "ok", "runtime": 1, "runtime_upstream": "yes"}, "runtime_upstream"),
        ({}, "outcome"),
    ):
        reply = http.post(f"/v1/leases/{lease}/release", json=body)
        assert reply.status_code == 422 and reply.json()["field"] == field, reply.text
    assert http.post(f"/v1/leases/{lease}/release", json={"outcome": "ok"}).status_code == 200
    # The upstream's own run time (the client says so) is accepted beside `runtime`.
    other = acquire(http).json()["lease_id"]
    upstream = {"outcome": "ok", "runtime": 0.5, "runtime_upstream": True}
    assert http.post(f"/v1/leases/{other}/release", json=upstream).status_code == 200


def test_renew(http: httpx.Client) -> None:
    lease = http.post("/v1/leases", json={"tenant": "t", "api": "sessions", "key": "m1"}).json()
    reply = http.post(f"/v1/leases/{lease['lease_id']}/renew", json={"ttl": 30})
    assert reply.json() == {"expires_in": 30.0}
    assert http.post(f"/v1/leases/{lease['lease_id']}/renew").status_code == 200
    assert http.post(f"/v1/leases/{lease['lease_id']}/renew", json={"ttl": 0}).status_code == 422


def test_usage_lists_every_limit_in_policy_order(http: httpx.Client) -> None:
    http.post("/v1/leases", json={"tenant": "t", "api": "sessions", "key": "m1"})
    reply = http.get("/v1/usage/t/sessions", params={"key": "m1"})
    assert reply.status_code == 200
    usage = reply.json()
    assert (usage["tenant"], usage["api"], usage["key"]) == ("t", "sessions", "m1")
    assert usage["in_flight"] == 1 and usage["cooldown"] == 0
    kinds = [(lim["kind"], lim["scope"], lim["used"], lim["remaining"]) for lim in usage["limits"]]
    assert kinds == [
        ("calls", "api", 1, 99),
        ("concurrent", "api", 1, 1),
        ("concurrent", "key", 1, 0),
    ]
    for lim in usage["limits"]:
        assert set(lim) == {
            "kind",
            "amount",
            "configured",
            "window",
            "scope",
            "used",
            "remaining",
            "resets_in",
        }
        assert lim["amount"] == lim["configured"]  # nothing learned


def test_policies(http: httpx.Client) -> None:
    everything = http.get("/v1/policies").json()["policies"]
    assert "m365d.incidents" in everything and "fast" in everything
    hunting = http.get("/v1/policies/m365d.advanced-hunting").json()
    assert hunting["limits"][1] == {
        "kind": "runtime",
        "amount": 600.0,
        "window": 3600.0,
        "scope": "api",
        "granularity": 60.0,
        "margin": 0.36,  # 100 ppm of the hour: the clock-rate margin
    }


def test_health_and_readiness(http: httpx.Client) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}


def test_wait_holds_the_request_until_it_can_grant(http: httpx.Client) -> None:
    fast = {"tenant": "t", "api": "fast"}
    for _ in range(20):
        lease = http.post("/v1/leases", json=fast).json()["lease_id"]  # the call is made
        assert http.post(f"/v1/leases/{lease}/release", json={"outcome": "ok"}).status_code == 200
    refused = http.post("/v1/leases", json={**fast, "wait": 0.01})
    assert refused.status_code == 429  # the earliest grant lies beyond the wait
    waited = http.post("/v1/leases", json={**fast, "wait": 3})
    assert waited.status_code == 200, waited.text
    assert waited.json()["waited"] > 0


def test_unknown_routes_and_methods_answer_json(http: httpx.Client) -> None:
    reply = http.get("/v2/nothing")
    assert (reply.status_code, reply.json()["error"]) == (404, "not_found")
    assert http.get("/v1/leases").status_code == 405


def test_oversized_bodies_get_413(http: httpx.Client) -> None:
    reply = http.post(
        "/v1/leases", content=b"x" * 70_000, headers={"content-type": "application/json"}
    )
    assert reply.status_code == 413


TOKENS = {"contoso-token-0123456789": ["contoso/*"], "admin-token-0123456789ab": ["*"]}


@pytest.fixture
def secured(valkey_server: EmbeddedServer) -> Iterator[str]:
    _wipe(valkey_server.url)
    settings = Settings(redis_url=valkey_server.url, tokens=TOKENS)
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_tokens_guard_every_tenant_call(secured: str) -> None:
    contoso = {"Authorization": "Bearer contoso-token-0123456789"}
    admin = {"Authorization": "Bearer admin-token-0123456789ab"}
    with httpx.Client(base_url=secured) as http:
        assert http.post("/v1/leases", json=INCIDENTS).status_code == 401
        wrong = {"Authorization": "Bearer contoso-token-0123456789x"}
        assert http.post("/v1/leases", json=INCIDENTS, headers=wrong).status_code == 401
        assert http.post("/v1/leases", json=INCIDENTS, headers=contoso).status_code == 200
        other = {**INCIDENTS, "tenant": "fabrikam/app"}
        assert http.post("/v1/leases", json=other, headers=contoso).status_code == 403
        theirs = http.post("/v1/leases", json=other, headers=admin).json()["lease_id"]
        for action, body in (("release", {"outcome": "not_called"}), ("renew", {})):
            reply = http.post(f"/v1/leases/{theirs}/{action}", json=body, headers=contoso)
            assert (reply.status_code, reply.json()["error"]) == (403, "forbidden")
        assert (
            http.get("/v1/usage/fabrikam/app/m365d.incidents", headers=contoso).status_code == 403
        )
        usage = http.get("/v1/usage/fabrikam/app/m365d.incidents", headers=admin).json()
        assert usage["limits"][0]["used"] == 1 and usage["in_flight"] == 1
        assert http.get("/v1/usage/contoso/a/m365d.incidents", headers=contoso).status_code == 200


def test_redis_down_is_503_and_the_service_recovers(tmp_path: Path) -> None:
    server = EmbeddedServer().start()
    settings = Settings(redis_url=server.url, request_timeout=1.0)
    try:
        with (
            serve_in_thread(create_app(settings)) as url,
            httpx.Client(base_url=url, timeout=10) as http,
        ):
            assert acquire(http).status_code == 200
            server.kill()
            down = acquire(http)
            assert down.status_code == 503
            assert down.json()["error"] == "backend_unavailable"
            assert down.headers["Retry-After"] == "1"
            assert http.get("/readyz").status_code == 503
            server = EmbeddedServer(port=server.port).start()
            assert acquire(http).status_code == 200
            assert http.get("/readyz").status_code == 200
    finally:
        server.stop()


def test_a_client_that_leaves_while_waiting_leaves_nothing_behind(http: httpx.Client) -> None:
    fast = {"tenant": "t", "api": "fast"}
    for _ in range(20):
        assert http.post("/v1/leases", json=fast).status_code == 200
    retry_after = http.post("/v1/leases", json=fast).json()["retry_after"]
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/leases", json={**fast, "wait": 4}, timeout=0.2)
    # The server wakes at the retry time, finds the client gone, and takes nothing; by
    # then the 20 grants have left the 1 s window, so any grant would show as used.
    time.sleep(retry_after + 0.3)
    usage = http.get("/v1/usage/t/fast").json()
    assert usage["limits"][0]["used"] == 0, usage


def test_waiters_are_served_first_come_first_served(coordinator_url: str) -> None:
    single = {"tenant": "t", "api": "single", "wait": 5}
    clients = [httpx.Client(base_url=coordinator_url, timeout=10) for _ in range(6)]
    served: list[int] = []

    def waiter(number: int) -> None:
        reply = clients[number].post("/v1/leases", json=single)
        if reply.status_code == 200:
            served.append(number)
            done(clients[number], reply)

    def done(client: httpx.Client, reply: httpx.Response) -> None:  # the call was made
        release = f"/v1/leases/{reply.json()['lease_id']}/release"
        assert client.post(release, json={"outcome": "ok"}).status_code == 200

    try:
        for client in clients:  # connect first, so each request leaves when it is sent
            assert client.get("/healthz").status_code == 200
        first = clients[5].post("/v1/leases", json=single)
        assert first.status_code == 200
        threads = []
        for number in range(5):
            threads.append(threading.Thread(target=waiter, args=(number,)))
            threads[-1].start()
            time.sleep(0.1)  # each joins the line before the next arrives
        done(clients[5], first)
        for thread in threads:
            thread.join()
    finally:
        for client in clients:
            client.close()
    assert served == [0, 1, 2, 3, 4]
