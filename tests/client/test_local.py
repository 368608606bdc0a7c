"""The local fallback: the limiter's arithmetic (with `now`), lenient policies, and the
client switching to it and back."""

from __future__ import annotations

from typing import Any

import pytest

from quotagate.client import (
    AsyncQuotaClient,
    BadRequest,
    CoordinatorUnavailable,
    Lease,
    QuotaClient,
    QuotaExhausted,
)
from quotagate.client.local import LocalLimiter
from quotagate.client.policies import parse_policies
from quotagate.client.policy_core import Kind, Limit, Policy, PolicySet, Scope

from .fakes import POLICIES, TENANT, URL, FakeCoordinator


def limiter(*limits: Limit, ttl: float = 60.0, estimate: float = 0.0) -> LocalLimiter:
    policy = Policy(
        "api", limits, lease_ttl_ms=round(ttl * 1000), runtime_estimate_ms=round(estimate * 1000)
    )
    return LocalLimiter(TENANT, PolicySet({"api": policy}))


def calls(amount: int, window: float, margin: float = 0.0, scope: Scope = Scope.API) -> Limit:
    """A calls limit, in seconds."""
    return Limit(
        Kind.CALLS, amount, round(window * 1000), margin_ms=round(margin * 1000), scope=scope
    )


def grant(local: LocalLimiter, now: float, key: str = "", cost: int = 1) -> Lease:
    return local.acquire("api", key, cost, None, now)


def denial(local: LocalLimiter, now: float, key: str = "", cost: int = 1) -> QuotaExhausted:
    with pytest.raises(QuotaExhausted) as caught:
        grant(local, now, key, cost)
    return caught.value


class TestLimiter:
    def test_calls_in_an_exact_window_widened_by_the_margin(self) -> None:
        local = limiter(calls(2, 60.0, 1.0))
        grant(local, 0.0)
        grant(local, 1.0)
        refused = denial(local, 2.0)
        assert refused.retry_after == pytest.approx(59.0)
        assert refused.limit == {"kind": "calls", "amount": 2, "window": 60.0, "scope": "api"}
        assert refused.code == "quota_exhausted" and refused.status_code is None
        assert denial(local, 60.9).retry_after == pytest.approx(0.1)
        grant(local, 61.0)

    def test_cost_counts_units(self) -> None:
        local = limiter(calls(5, 10.0))
        grant(local, 0.0, cost=3)
        grant(local, 1.0, cost=1)
        assert denial(local, 2.0, cost=2).retry_after == pytest.approx(8.0)
        with pytest.raises(BadRequest):
            grant(local, 2.0, cost=6)

    def test_key_scope_counts_per_key(self) -> None:
        local = limiter(calls(1, 60.0, 1.0, Scope.KEY))
        grant(local, 0.0, "a")
        grant(local, 0.0, "b")
        denial(local, 0.5, "a")

    def test_not_called_refunds(self) -> None:
        local = limiter(calls(1, 60.0, 1.0))
        lease = grant(local, 0.0)
        assert local.release(lease, {"outcome": "not_called"}, 0.5)
        grant(local, 0.6)
        assert not local.release(lease, {"outcome": "ok"}, 0.7)  # released already

    def test_concurrency_per_key_and_api(self) -> None:
        local = limiter(
            Limit(Kind.CONCURRENT, 2), Limit(Kind.CONCURRENT, 1, scope=Scope.KEY), ttl=30.0
        )
        first = grant(local, 0.0, "m1")
        assert denial(local, 1.0, "m1").retry_after == pytest.approx(29.0)
        grant(local, 1.0, "m2")
        assert denial(local, 2.0, "m3").retry_after == pytest.approx(28.0)
        local.release(first, {"outcome": "ok"}, 3.0)
        grant(local, 3.0, "m1")
        grant(local, 31.5, "m3")  # the m2 lease expired

    def test_renew_extends_the_lease(self) -> None:
        local = limiter(Limit(Kind.CONCURRENT, 1), ttl=10.0)
        lease = grant(local, 0.0)
        assert local.renew(lease, 9.0) == 10.0
        denial(local, 15.0)
        assert local.renew(lease, 25.0) is None

    def test_runtime_reported_replaces_the_estimate(self) -> None:
        local = limiter(Limit(Kind.RUNTIME, 10_000, 60_000), estimate=6.0)
        lease = grant(local, 0.0)
        assert denial(local, 1.0).retry_after == pytest.approx(59.0)
        local.release(lease, {"outcome": "ok", "runtime": 1.0}, 2.0)
        grant(local, 3.0)

    def test_throttled_release_cools_the_api_down(self) -> None:
        local = limiter(calls(100, 60.0))
        lease = grant(local, 0.0)
        local.release(lease, {"outcome": "throttled", "retry_after": 5.0}, 1.0)
        refused = denial(local, 2.0)
        assert (refused.code, refused.retry_after, refused.limit) == ("cooling_down", 4.0, None)
        grant(local, 6.0)

    def test_unknown_api(self) -> None:
        local = limiter(calls(1, 1.0))
        assert not local.knows("other")
        with pytest.raises(KeyError):
            local.acquire("other", "", 1, None, 0.0)


class TestPolicies:
    def test_the_coordinators_reply(self) -> None:
        reply: dict[str, Any] = {
            "policies": {
                "mde.live-response": {
                    "api": "mde.live-response",
                    "limits": [
                        {
                            "kind": "calls",
                            "amount": 10,
                            "window": 60.0,
                            "scope": "api",
                            "granularity": 1.0,
                            "margin": 1.0,
                        },
                        {
                            "kind": "concurrent",
                            "amount": 25,
                            "window": None,
                            "scope": "api",
                            "granularity": None,
                            "margin": None,
                        },
                        {
                            "kind": "concurrent",
                            "amount": 1,
                            "window": None,
                            "scope": "key",
                            "granularity": None,
                            "margin": None,
                        },
                    ],
                    "lease_ttl": 600.0,
                    "runtime_estimate": 0.0,
                },
            },
            "tenants": {
                "contoso/*": {
                    "mde.live-response": {"limits": [{"kind": "calls", "amount": 20, "window": 60}]}
                }
            },
        }
        book = parse_policies(reply)
        policy = book.resolve("fabrikam", "mde.live-response")
        assert policy == Policy(
            "mde.live-response",
            (
                Limit(Kind.CALLS, 10, 60_000, granularity_ms=1_000, margin_ms=1_000),
                Limit(Kind.CONCURRENT, 25),
                Limit(Kind.CONCURRENT, 1, scope=Scope.KEY),
            ),
            lease_ttl_ms=600_000,
        )
        # What the policy file would compile to: the core's defaults (granularity, margin).
        override = book.resolve("contoso/app1", "mde.live-response")
        assert override is not None and override.limits == (
            Limit(Kind.CALLS, 20, 60_000, granularity_ms=1_000, margin_ms=6),  # clock margin
        )

    def test_file_spelling_single_policy_and_list(self) -> None:
        spelled = {
            "api": "x",
            "limits": [{"calls": 50, "per": "1m"}, {"runtime": "10m", "per": "1h"}],
        }
        policy = parse_policies(spelled).resolve(TENANT, "x")
        assert policy is not None
        assert policy.limits == (
            Limit(Kind.CALLS, 50, 60_000, granularity_ms=1_000, margin_ms=6),
            Limit(Kind.RUNTIME, 600_000, 3_600_000, granularity_ms=60_000, margin_ms=360),
        )
        assert policy.runtime_estimate_ms == 10_000
        assert parse_policies([spelled]).resolve(TENANT, "x") == policy

    @pytest.mark.parametrize(
        "data",
        [
            None,
            "junk",
            {"policies": None},
            {"policies": {"x": {"limits": "many"}}},
            {"policies": {"x": {"limits": [{"kind": "calls", "amount": 0, "window": 60}]}}},
            {"policies": {"x": {"limits": [{"kind": "calls", "amount": 5}]}}},
            {"policies": {"x": {"limits": [{"kind": "bananas", "amount": 5, "window": 1}]}}},
        ],
    )
    def test_unreadable_means_unknown(self, data: object) -> None:
        assert parse_policies(data).resolve(TENANT, "x") is None


class TestFallback:
    def test_falls_back_and_returns(self, fake: FakeCoordinator) -> None:
        with QuotaClient(
            URL, TENANT, transport=fake.transport, on_unavailable="local", probe_interval=0
        ) as quota:
            assert not quota.acquire("m365d.incidents").local
            assert fake.paths().count("/v1/policies") == 1
            fake.down = True
            with quota.lease("m365d.incidents") as lease:
                assert lease.local and lease.lease_id.startswith("local.")
                assert quota.renew(lease) == 60.0
            quota.acquire("m365d.incidents")
            with pytest.raises(QuotaExhausted):  # the policy allows 2 per minute
                quota.acquire("m365d.incidents")
            fake.down = False
            assert not quota.acquire("m365d.incidents").local
            assert not quota.acquire("m365d.incidents").local
        assert fake.paths().count("/v1/policies") == 1
        assert "local." not in " ".join(fake.paths())

    def test_backend_unavailable_falls_back_too(self, fake: FakeCoordinator) -> None:
        with QuotaClient(
            URL, TENANT, transport=fake.transport, on_unavailable="local", policies=POLICIES
        ) as quota:
            fake.backend_down = True
            assert quota.acquire("m365d.incidents").local

    def test_no_policy_known_refuses(self, fake: FakeCoordinator) -> None:
        fake.down = True
        quota = QuotaClient(URL, TENANT, transport=fake.transport, on_unavailable="local")
        with quota, pytest.raises(CoordinatorUnavailable, match="no policy") as caught:
            quota.acquire("m365d.incidents")
        assert isinstance(caught.value.__cause__, CoordinatorUnavailable)

    def test_probes_at_most_every_interval(self, fake: FakeCoordinator) -> None:
        fake.down = True
        with QuotaClient(
            URL,
            TENANT,
            transport=fake.transport,
            on_unavailable="local",
            policies=POLICIES,
            probe_interval=3600,
        ) as quota:
            quota.acquire("m365d.incidents")
            fake.down = False
            assert quota.acquire("m365d.incidents").local
        assert fake.calls == []  # the first try never connected; the second was not made

    def test_local_wait_for_a_short_window(self, fake: FakeCoordinator) -> None:
        fake.down = True
        policies = {
            "q": {"limits": [{"kind": "calls", "amount": 1, "window": 0.1, "margin": 0.05}]}
        }
        with QuotaClient(
            URL, TENANT, transport=fake.transport, on_unavailable="local", policies=policies
        ) as quota:
            quota.acquire("q")
            with pytest.raises(QuotaExhausted):
                quota.acquire("q")
            assert quota.acquire("q", wait=1.0).waited > 0

    async def test_async_falls_back_and_returns(self, fake: FakeCoordinator) -> None:
        async with AsyncQuotaClient(
            URL, TENANT, transport=fake.transport, on_unavailable="local", probe_interval=0
        ) as quota:
            await quota.acquire("m365d.incidents")
            fake.down = True
            async with quota.lease("m365d.incidents") as lease:
                assert lease.local
                lease.set_outcome("not_called")
            assert (await quota.acquire("m365d.incidents")).local
            assert (await quota.acquire("m365d.incidents")).local  # the refund made room
            fake.down = False
            assert not (await quota.acquire("m365d.incidents")).local
