"""The lease clients against a fake coordinator: requests, replies, errors, outcomes."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable

import httpx
import pytest

from quotagate.client import (
    AsyncQuotaClient,
    BadRequest,
    CoordinatorUnavailable,
    Forbidden,
    Lease,
    QuotaClient,
    QuotaError,
    QuotaExhausted,
    Unauthorized,
    UnknownApi,
    UnknownLease,
)
from quotagate.client._releases import TRIES, Release, ReleaseBook, lease_prefix, retry_delay

from .fakes import TENANT, URL, FakeCoordinator


class Boom(Exception):
    pass


def answering(status: int, body: object, headers: dict[str, str] | None = None) -> QuotaClient:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body, headers=headers)

    return QuotaClient(URL, TENANT, transport=httpx.MockTransport(handler))


class TestRequests:
    def test_acquire_sends_the_lease_request(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        lease = client.acquire("mde.api", "GET:/api/machines", cost=2, wait=1.5, runtime_estimate=3)
        assert fake.calls == [
            (
                "POST",
                "/v1/leases",
                {
                    "tenant": TENANT,
                    "api": "mde.api",
                    "key": "GET:/api/machines",
                    "cost": 2,
                    "wait": 1.5,
                    "runtime_estimate": 3,
                },
            )
        ]
        assert fake.headers[0]["Authorization"] == "Bearer s3cret"
        assert lease == Lease("L1", TENANT, "mde.api", "GET:/api/machines", 2, 60.0, 0.0)

    def test_no_token_no_header(self, fake: FakeCoordinator) -> None:
        with QuotaClient(URL, TENANT, transport=fake.transport) as quota:
            quota.acquire("m365d.incidents")
        assert "Authorization" not in fake.headers[0]
        assert fake.calls[0][2] == {"tenant": TENANT, "api": "m365d.incidents", "cost": 1}

    def test_release_renew_usage_policies(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        lease = client.acquire("m365d.incidents")
        assert client.renew(lease, ttl=30) == 60.0
        client.release(lease, "throttled", status_code=429, retry_after=2.5, runtime=0.25)
        assert client.usage("m365d.incidents", key="k1")["key"] == "k1"
        assert "m365d.incidents" in client.policies()["policies"]
        assert fake.paths() == [
            "/v1/leases",
            "/v1/leases/L1/renew",
            "/v1/leases/L1/release",
            "/v1/usage/contoso/app1/m365d.incidents",  # sent as contoso%2Fapp1
            "/v1/policies",
        ]
        assert fake.bodies("/renew") == [{"ttl": 30}]
        assert fake.released["L1"] == {
            "outcome": "throttled",
            "status_code": 429,
            "retry_after": 2.5,
            "runtime": 0.25,
        }

    def test_release_by_id_defaults_to_ok(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        client.release(client.acquire("m365d.incidents").lease_id)
        assert fake.released["L1"] == {"outcome": "ok"}

    def test_invalid_tenant_and_mode(self) -> None:
        with pytest.raises(ValueError, match="tenant"):
            QuotaClient(URL, "{bad}")
        with pytest.raises(ValueError, match="on_unavailable"):
            QuotaClient(URL, TENANT, on_unavailable="maybe")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="release_queue"):
            QuotaClient(URL, TENANT, release_queue=-1)


class TestErrors:
    def test_quota_exhausted(self) -> None:
        body = {
            "error": "quota_exhausted",
            "detail": "calls limit",
            "retry_after": 12.25,
            "limit": {"kind": "calls", "amount": 50, "window": 60},
        }
        with (
            answering(429, body, {"Retry-After": "13"}) as quota,
            pytest.raises(QuotaExhausted) as caught,
        ):
            quota.acquire("m365d.incidents")
        error = caught.value
        assert (error.retry_after, error.code, error.status_code) == (12.25, "quota_exhausted", 429)
        assert error.limit == {"kind": "calls", "amount": 50, "window": 60}

    def test_cooling_down_uses_the_header_without_body_time(self) -> None:
        body = {"error": "cooling_down", "detail": "throttled upstream"}
        with (
            answering(429, body, {"Retry-After": "7"}) as quota,
            pytest.raises(QuotaExhausted) as caught,
        ):
            quota.acquire("m365d.incidents")
        assert (caught.value.code, caught.value.retry_after, caught.value.limit) == (
            "cooling_down",
            7.0,
            None,
        )

    @pytest.mark.parametrize(
        ("status", "code", "kind"),
        [
            (401, "unauthorized", Unauthorized),
            (403, "forbidden", Forbidden),
            (400, "bad_request", BadRequest),
            (422, "invalid_request", BadRequest),
            (404, "unknown_api", UnknownApi),
            (404, "unknown_lease", UnknownLease),
            (404, "not_found", QuotaError),
            (503, "backend_unavailable", CoordinatorUnavailable),
            (502, None, CoordinatorUnavailable),
            (500, "internal", QuotaError),
        ],
    )
    def test_status_mapping(self, status: int, code: str | None, kind: type[QuotaError]) -> None:
        with (
            answering(status, {"error": code, "detail": "why"}) as quota,
            pytest.raises(kind) as caught,
        ):
            quota.acquire("m365d.incidents")
        assert type(caught.value) is kind
        assert (caught.value.status_code, caught.value.code, caught.value.detail) == (
            status,
            code,
            "why",
        )

    def test_fastapi_detail_list_is_text(self) -> None:
        body = {"detail": [{"loc": ["body", "cost"], "msg": "too big"}]}
        with answering(422, body) as quota, pytest.raises(BadRequest) as caught:
            quota.acquire("m365d.incidents", cost=10_000)
        assert caught.value.detail is not None and "too big" in caught.value.detail

    @pytest.mark.parametrize(
        "error",
        [
            httpx.ConnectError("refused"),
            httpx.ConnectTimeout("slow"),
            httpx.ReadTimeout("slow"),
            httpx.RemoteProtocolError("eof"),
        ],
    )
    def test_transport_errors_translate(self, error: httpx.TransportError) -> None:
        def handler(request: httpx.Request) -> httpx.Response:
            raise error

        transport = httpx.MockTransport(handler)
        with (
            QuotaClient(URL, TENANT, transport=transport) as quota,
            pytest.raises(CoordinatorUnavailable) as caught,
        ):
            quota.acquire("m365d.incidents")
        assert caught.value.__cause__ is error

    def test_grant_without_lease_id(self) -> None:
        with (
            answering(200, {"expires_in": 1}) as quota,
            pytest.raises(QuotaError, match="lease_id"),
        ):
            quota.acquire("m365d.incidents")


LeaseBlock = Callable[[Lease], None]


class TestLeaseOutcomes:
    def outcome(
        self, client: QuotaClient, fake: FakeCoordinator, block: LeaseBlock
    ) -> dict[str, object]:
        try:
            with client.lease("m365d.incidents") as lease:
                block(lease)
        except Boom:
            pass
        assert client.flush(timeout=5)  # the release goes out in the background
        return fake.released[lease.lease_id]

    def test_normal_exit_is_ok(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        assert self.outcome(client, fake, lambda lease: None) == {"outcome": "ok"}

    def test_raise_before_the_call_is_not_called(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        def block(lease: Lease) -> None:
            raise Boom

        assert self.outcome(client, fake, block) == {"outcome": "not_called"}

    def test_raise_after_mark_called_is_failed(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        def block(lease: Lease) -> None:
            lease.mark_called()
            raise Boom

        assert self.outcome(client, fake, block) == {"outcome": "failed"}

    def test_reported_answer(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        answer = httpx.Response(
            429,
            json={"error": {"code": "429", "message": "You can send requests again in 8 seconds."}},
        )
        assert self.outcome(client, fake, lambda lease: lease.report(answer)) == {
            "outcome": "throttled",
            "status_code": 429,
            "retry_after": 8.0,
        }

    def test_reported_answer_then_raise_keeps_it(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        def block(lease: Lease) -> None:
            lease.report(httpx.Response(429, headers={"Retry-After": "2.128"}))
            raise Boom

        assert self.outcome(client, fake, block)["outcome"] == "throttled"

    def test_reported_hunting_answer(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        answer = httpx.Response(200, json={"Stats": {"ExecutionTime": 4.5}, "Results": []})
        assert self.outcome(client, fake, lambda lease: lease.report(answer, runtime=9.0)) == {
            "outcome": "ok",
            "status_code": 200,
            "runtime": 4.5,
            "runtime_upstream": True,
        }

    @pytest.mark.parametrize(("status", "outcome"), [(204, "ok"), (404, "failed"), (500, "failed")])
    def test_reported_status(
        self, client: QuotaClient, fake: FakeCoordinator, status: int, outcome: str
    ) -> None:
        body = self.outcome(client, fake, lambda lease: lease.report(httpx.Response(status)))
        assert body == {"outcome": outcome, "status_code": status}

    def test_explicit_outcome(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        def block(lease: Lease) -> None:
            lease.set_outcome("failed", status_code=503, runtime=1.5)

        assert self.outcome(client, fake, block) == {
            "outcome": "failed",
            "status_code": 503,
            "runtime": 1.5,
        }

    def test_bad_outcome_refused(self, client: QuotaClient) -> None:
        with client.lease("m365d.incidents") as lease, pytest.raises(ValueError):
            lease.set_outcome("great")  # type: ignore[arg-type]

    def test_denied_lease_runs_no_block(self, client: QuotaClient, fake: FakeCoordinator) -> None:
        fake.deny = {"error": "quota_exhausted", "retry_after": 3.0, "limit": None}
        with pytest.raises(QuotaExhausted), client.lease("m365d.incidents"):
            pytest.fail("the block must not run")
        assert client.flush(timeout=5)
        assert fake.released == {}

    def test_failed_release_does_not_mask_the_block(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        with client.lease("m365d.incidents") as lease:
            fake.released[lease.lease_id] = {}  # the coordinator answers unknown_lease
        with pytest.raises(Boom), client.lease("m365d.incidents") as lease:
            fake.down = True
            raise Boom


class TestAsync:
    async def test_acquire_and_release(
        self, aclient: AsyncQuotaClient, fake: FakeCoordinator
    ) -> None:
        lease = await aclient.acquire("mde.api", "GET:/api/alerts")
        assert await aclient.renew(lease) == 60.0
        await aclient.release(lease, "ok", status_code=200)
        assert (await aclient.usage("mde.api"))["key"] is None
        assert "policies" in await aclient.policies()
        assert fake.released["L1"] == {"outcome": "ok", "status_code": 200}
        assert fake.headers[0]["Authorization"] == "Bearer s3cret"

    async def test_outcomes(self, aclient: AsyncQuotaClient, fake: FakeCoordinator) -> None:
        async with aclient.lease("m365d.incidents"):
            pass
        with pytest.raises(Boom):
            async with aclient.lease("m365d.incidents"):
                raise Boom
        with pytest.raises(Boom):
            async with aclient.lease("m365d.incidents") as lease:
                lease.mark_called()
                raise Boom
        assert await aclient.flush(timeout=5)
        assert [fake.released[f"L{i}"]["outcome"] for i in (1, 2, 3)] == [
            "ok",
            "not_called",
            "failed",
        ]

    async def test_denied(self, aclient: AsyncQuotaClient, fake: FakeCoordinator) -> None:
        fake.deny = {"error": "cooling_down", "retry_after": 4.5}
        with pytest.raises(QuotaExhausted) as caught:
            await aclient.acquire("m365d.incidents", wait=1.0)
        assert (caught.value.code, caught.value.retry_after) == ("cooling_down", 4.5)

    async def test_unreachable(self, fake: FakeCoordinator) -> None:
        fake.down = True
        async with AsyncQuotaClient(URL, TENANT, transport=fake.transport) as quota:
            with pytest.raises(CoordinatorUnavailable):
                await quota.acquire("m365d.incidents")


class TestReleaseBook:
    """The bookkeeping both background senders share, in virtual time."""

    def test_first_in_first_out(self) -> None:
        book = ReleaseBook(size=4)
        assert book.add("a", {"outcome": "ok"}) and book.add("b", {"outcome": "failed"})
        first, second = book.take(0.0), book.take(0.0)
        assert isinstance(first, Release) and isinstance(second, Release)
        assert (first.lease_id, second.lease_id, first.tries) == ("a", "b", 1)
        assert book.take(0.0) is None and book.unfinished == 2
        book.sent(first)
        book.sent(second)
        assert book.unfinished == 0

    def test_bounded_by_what_is_unfinished(self) -> None:
        book = ReleaseBook(size=2)
        assert book.add("a", {}) and book.add("b", {})
        taken = book.take(0.0)
        assert not book.add("c", {})  # one being sent still counts
        assert isinstance(taken, Release)
        book.sent(taken)
        assert book.add("c", {})
        assert not ReleaseBook(size=0).add("a", {})

    def test_transient_failures_are_retried_with_backoff(self) -> None:
        book = ReleaseBook(size=4)
        book.add("a", {})
        now, waits = 0.0, []
        while isinstance(release := book.take(now), Release):
            book.failed(release, CoordinatorUnavailable("down"), now)
            due = book.take(now)
            if due is None:
                break
            assert isinstance(due, float) and due > 0
            waits.append(due)
            now += due
        assert waits == pytest.approx([retry_delay(n) for n in range(1, TRIES)])
        assert waits == sorted(waits) and waits[1] == pytest.approx(2 * waits[0])
        assert book.unfinished == 0  # given up after TRIES tries

    @pytest.mark.parametrize(
        ("error", "retried"),
        [
            (CoordinatorUnavailable("refused"), True),
            (QuotaError("internal", status_code=500), True),
            (UnknownLease("gone", status_code=404, code="unknown_lease"), False),
            (BadRequest("no", status_code=422), False),
            (Unauthorized("who", status_code=401), False),
        ],
    )
    def test_what_is_retried(self, error: QuotaError, retried: bool) -> None:
        book = ReleaseBook(size=4)
        book.add("a", {})
        release = book.take(0.0)
        assert isinstance(release, Release)
        book.failed(release, error, 0.0)
        assert (book.unfinished == 1) is retried

    def test_stop_gives_up_what_is_left(self, caplog: pytest.LogCaptureFixture) -> None:
        book = ReleaseBook(size=4)
        for name in ("a.0123456789abcdef", "b.fedcba9876543210"):
            book.add(name, {})
        release = book.take(0.0)
        assert isinstance(release, Release)
        assert book.stop("closing") == 1
        assert book.unfinished == 1  # the one being sent finishes on its own
        book.failed(release, CoordinatorUnavailable("down"), 0.0)  # no retry once stopped
        assert book.unfinished == 0 and not book.add("c", {})
        messages = [r.getMessage() for r in caplog.records]
        assert any("b.fedcba98…" in m and "closing" in m for m in messages)
        assert not any("fedcba9876543210" in m for m in messages)

    def test_lease_prefix(self) -> None:
        assert lease_prefix("c2NvcGU.0123456789abcdef") == "c2NvcGU.01234567…"
        assert lease_prefix("L1") == "L1…"


class TestBackgroundReleases:
    def test_sent_in_order_after_the_block(
        self, client: QuotaClient, fake: FakeCoordinator
    ) -> None:
        for _ in range(3):
            with client.lease("m365d.incidents"):
                pass
        assert client.flush(timeout=5)
        assert list(fake.released) == ["L1", "L2", "L3"]

    def test_no_queue_sends_in_the_caller(self, fake: FakeCoordinator) -> None:
        with QuotaClient(URL, TENANT, transport=fake.transport, release_queue=0) as quota:
            with quota.lease("m365d.incidents"):
                pass
            assert fake.released == {"L1": {"outcome": "ok"}}  # no flush needed
            assert not [t for t in threading.enumerate() if t.name == "quotagate-release"]

    def test_close_stops_the_thread(self, fake: FakeCoordinator) -> None:
        with QuotaClient(URL, TENANT, transport=fake.transport) as quota:
            with quota.lease("m365d.incidents"):
                pass
        assert fake.released == {"L1": {"outcome": "ok"}}
        assert not [t for t in threading.enumerate() if t.name == "quotagate-release"]

    async def test_async_no_queue_sends_in_the_caller(self, fake: FakeCoordinator) -> None:
        async with AsyncQuotaClient(
            URL, TENANT, transport=fake.transport, release_queue=0
        ) as quota:
            async with quota.lease("m365d.incidents"):
                pass
            assert fake.released == {"L1": {"outcome": "ok"}}

    def test_async_client_over_two_event_loops(self, fake: FakeCoordinator) -> None:
        quota = AsyncQuotaClient(URL, TENANT, transport=fake.transport)

        async def one_call() -> None:
            async with quota.lease("m365d.incidents"):
                pass
            assert await quota.flush(timeout=5)

        asyncio.run(one_call())
        asyncio.run(one_call())  # the first loop is closed: the sender moves to this one
        asyncio.run(quota.aclose())
        assert list(fake.released) == ["L1", "L2"]

    def test_a_block_that_outlives_its_client_does_not_raise(
        self, fake: FakeCoordinator, caplog: pytest.LogCaptureFixture
    ) -> None:
        quota = QuotaClient(URL, TENANT, transport=fake.transport)
        with quota.lease("m365d.incidents") as lease:
            quota.close()
        (warning,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert lease_prefix(lease.lease_id) in warning.getMessage()
        assert fake.released == {}

    def test_idle_connections_expire_before_the_server_closes_them(self) -> None:
        import uvicorn

        server_keep_alive = uvicorn.Config(app=None).timeout_keep_alive
        assert QuotaClient.limits().keepalive_expiry < server_keep_alive
        assert AsyncQuotaClient.limits().max_connections == 100  # httpx's own pool otherwise
