"""Property tests: the Lua engine on a real server against the reference model, and the
core promise checked directly on grant times."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from quotagate.coordinator.engine import Denial, Engine, Grant
from quotagate.coordinator.errors import InvalidRequest, UnknownLease
from quotagate.coordinator.leases import LeaseRef
from quotagate.coordinator.policy import Kind, Limit, Policy, PolicySet, Scope
from quotagate.coordinator.store import connect

from .model import Model
from .strategies import (
    EPOCH_MS,
    KEYS,
    Acquire,
    Advance,
    Look,
    Op,
    Release,
    Renew,
    late_operations,
    operations,
    policies,
)
from .topologies import Topology

pytestmark = pytest.mark.server

PROPERTY = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass
class Run:
    """What a schedule did: grants (time, cost, key, lease id), the refunded lease ids, and
    for each lease the last moment its call could reach the upstream (its release, less the
    processing time the upstream reported, if it did; else its expiry: a client never sends
    on an expired lease)."""

    grants: list[tuple[int, int, str, str]] = field(default_factory=list)
    at: dict[str, int] = field(default_factory=dict)  # lease id -> its place in grants
    refunded: set[str] = field(default_factory=set)
    last_send: dict[str, int] = field(default_factory=dict)
    granted: dict[str, int] = field(default_factory=dict)
    denials: int = 0


async def _snapshot(engine: Engine, tenant: str, now: int) -> object:
    """Everything a denial must leave alone: usage of every key, and the live leases."""
    views = [await engine.usage(tenant, "p", key, now=now) for key in KEYS]
    ref = LeaseRef(tenant, "p", "", "0" * 32)
    state = await engine.redis.hgetall(f"qg:{{{ref.tenant}|p}}:s")
    live = {
        token: record
        for token, record in state.items()
        if b":" in token and int(record.split(b":")[3]) > now  # a lease, still live
    }
    return [(v.limits, v.in_flight, v.cooldown_ms) for v in views], live


async def _run(
    url: str,
    policy: Policy,
    ops: list[Op],
    *,
    check_model: bool,
    recovery: tuple[int, int] | None = None,
) -> Run:
    client = connect(url)
    share = None if recovery is None else recovery[1] / 1000
    engine = Engine(client, PolicySet(apis={"p": policy}), recovery_share=share)
    if recovery is not None:
        engine.recovery = recovery[0]  # as after a failover the engine saw
    tenant = f"t-{uuid.uuid4().hex}"
    model = Model(policy, recovery=recovery)
    now = EPOCH_MS
    leases: list[str] = []
    run = Run()
    try:
        for op in ops:
            if isinstance(op, Advance):
                now += op.ms
            elif isinstance(op, Acquire):
                estimate = policy.runtime_estimate_ms if op.estimate is None else op.estimate
                klass = policy.priority_class(op.priority)
                if (
                    policy.impossible_cost(op.cost)
                    or policy.impossible_for_class(op.cost, klass)
                    or policy.impossible_runtime(estimate, klass)
                ):
                    with pytest.raises(InvalidRequest):
                        await engine.acquire(
                            tenant, "p", op.key, op.cost, op.estimate, priority=op.priority, now=now
                        )
                    continue
                before = None if check_model else await _snapshot(engine, tenant, now)
                result = await engine.acquire(
                    tenant, "p", op.key, op.cost, op.estimate, priority=op.priority, now=now
                )
                if isinstance(result, Grant):
                    assert result.granted_at_ms == now
                    leases.append(result.lease_id)
                    run.at[result.lease_id] = len(run.grants)
                    run.grants.append((now, op.cost, op.key, result.lease_id))
                    run.last_send[result.lease_id] = result.expires_at_ms
                    run.granted[result.lease_id] = now
                else:
                    assert isinstance(result, Denial)
                    run.denials += 1
                    if before is not None:
                        assert await _snapshot(engine, tenant, now) == before
                if check_model:
                    if model.aged(policy.class_rank(op.priority), now):
                        event("a lower class had aged")
                    token = result.lease_id if isinstance(result, Grant) else "denied"
                    expected = model.acquire(
                        token,
                        op.key,
                        op.cost,
                        estimate,
                        policy.lease_ttl_ms,
                        now,
                        1000 if klass is None else klass.share_permille,
                        policy.class_rank(op.priority),
                    )
                    assert isinstance(result, Grant) == expected.granted, (op, expected, result)
                    if isinstance(result, Grant):
                        assert result.expires_at_ms == expected.expiry
                    else:
                        assert result.retry_after_ms == expected.retry_ms, (op, expected, result)
                        assert result.soonest_ms == expected.soonest, (op, expected, result)
                        assert result.reason == (
                            "cooling_down" if expected.bound == 0 else "quota_exhausted"
                        )
                        bound = policy.limits[expected.bound - 1] if expected.bound else None
                        assert result.limit == bound
            elif isinstance(op, Release) and leases:
                lease_id = leases[op.lease % len(leases)]
                retry = op.retry_ms
                if op.outcome == "throttled" and retry is None:
                    retry = policy.shortest_calls_window_ms
                calls, keep = op.parts if op.parts is not None else (None, 0)
                ending = engine.release(
                    lease_id,
                    op.outcome,
                    retry_after_ms=op.retry_ms,
                    runtime_ms=op.runtime_ms,
                    runtime_upstream=op.upstream,
                    calls=calls,
                    keep=keep,
                    now=now,
                )
                if op.parts is not None and not policy.releases_in_parts:
                    with pytest.raises(InvalidRequest):
                        await ending
                    continue
                before = None if check_model else await _snapshot(engine, tenant, now)
                try:
                    await ending
                    outcome = "released"
                except UnknownLease:
                    outcome = "gone"
                except InvalidRequest:
                    outcome = "exceeds"
                    event("parts above the lease's cost, refused")
                    if before is not None:
                        assert await _snapshot(engine, tenant, now) == before
                if outcome == "released":
                    # The upstream's own processing time: the call arrived by then.
                    ran = op.runtime_ms if op.upstream and op.runtime_ms is not None else 0
                    sent = max(run.granted[lease_id], now - ran)
                    if op.parts is None:
                        if op.outcome == "not_called":
                            run.refunded.add(lease_id)
                        run.last_send[lease_id] = sent
                    else:
                        event("a lease ended in parts" + (", some kept" if keep else ""))
                        _in_parts(run, lease_id, op.outcome, calls or 0, keep, sent)
                if check_model:
                    expected = model.release(
                        lease_id,
                        op.outcome,
                        retry,
                        op.runtime_ms,
                        now,
                        upstream=op.upstream,
                        calls=calls,
                        keep=keep,
                    )
                    assert outcome == {"unknown": "gone", "expired": "gone"}.get(
                        expected, expected
                    ), (op, expected)
            elif isinstance(op, Renew) and leases:
                lease_id = leases[op.lease % len(leases)]
                renewed: int | str = "gone"
                with contextlib.suppress(UnknownLease):
                    renewed = left = await engine.renew(lease_id, op.ttl_ms, now=now)
                    run.last_send[lease_id] = now + left
                if check_model:
                    expected_renew = model.renew(lease_id, op.ttl_ms, now)
                    assert renewed == (
                        expected_renew if isinstance(expected_renew, int) else "gone"
                    )
            elif isinstance(op, Look) and check_model:
                view = await engine.usage(tenant, "p", op.key, now=now)
                cooldown, in_flight, per_limit = model.usage(op.key, now)
                assert view.cooldown_ms == cooldown
                assert view.in_flight == in_flight
                assert [(u.used, u.resets_in_ms) for u in view.limits] == per_limit
    finally:
        await client.aclose()
    return run


def _in_parts(run: Run, lease_id: str, outcome: str, calls: int, keep: int, sent: int) -> None:
    """A lease ended in parts: its `calls` units become a call of their own that reached
    the upstream by `sent` (none for not_called), `keep` units stay in flight under the
    lease, and the rest were never called."""
    at = run.at[lease_id]
    granted, _, key, _ = run.grants[at]
    if outcome != "not_called" and calls > 0:
        part = f"{lease_id}.{len(run.grants)}"
        run.grants.append((granted, calls, key, part))
        run.last_send[part] = sent
    if keep > 0:
        run.grants[at] = (granted, keep, key, lease_id)
    else:
        run.refunded.add(lease_id)  # nothing of it is left to call


# After a loss of the store at a moment near the start, only a share of each limit.
recoveries = st.one_of(
    st.none(),
    st.tuples(st.integers(EPOCH_MS - 20_000, EPOCH_MS + 20_000), st.sampled_from([0, 500, 700])),
)


@given(policy=policies(), ops=operations, recovery=recoveries)
@PROPERTY
def test_engine_agrees_with_reference_model(
    store: Topology, policy: Policy, ops: list[Op], recovery: tuple[int, int] | None
) -> None:
    asyncio.run(_run(store.url, policy, ops, check_model=True, recovery=recovery))


@given(policy=policies(calls_only=True), ops=st.one_of(operations, late_operations))
@PROPERTY
def test_leases_ended_in_parts_agree_with_the_model_and_every_window(
    store: Topology, policy: Policy, ops: list[Op]
) -> None:
    """Calls limits alone, whose leases may end in parts (the gateway's blocks of calls):
    the engine agrees with the model, and no upstream window holds more than its limit
    wherever each part's calls arrive between the grant and the release of that part."""
    asyncio.run(_run(store.url, policy, ops, check_model=True))
    run = asyncio.run(_run(store.url, policy, ops, check_model=False))
    calls = [
        (granted, run.last_send[lease_id], cost, key)
        for granted, cost, key, lease_id in run.grants
        if lease_id not in run.refunded
    ]
    worst = max(_worst_window(lim, calls) for lim in policy.limits)
    target(worst, label="fullest upstream window, leases in parts")


@given(policy=policies(), ops=operations)
@PROPERTY
def test_no_window_ever_holds_more_than_its_limit(
    store: Topology, policy: Policy, ops: list[Op]
) -> None:
    """Exact sliding check on grant times; denials change nothing (checked inside the run)."""
    run = asyncio.run(_run(store.url, policy, ops, check_model=False))
    calls = [
        (at, cost, key) for at, cost, key, lease_id in run.grants if lease_id not in run.refunded
    ]
    fullest = max(
        (_fullest(lim, calls) for lim in policy.limits if lim.kind is Kind.CALLS), default=0.0
    )
    target(fullest, label="fullest exact window")


def _fullest(lim: Limit, calls: list[tuple[int, int, str]]) -> float:
    """The fullest exact window [t, t + W) of `lim` over calls (arrival, cost, key), as a
    share of its amount; asserts that none holds more than the amount."""
    groups: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for at, cost, key in calls:
        groups[key if lim.scope is Scope.KEY else ""].append((at, cost))
    fullest = 0.0
    for arrivals in groups.values():
        for start, _ in arrivals:
            in_window = sum(c for at, c in arrivals if start <= at < start + lim.window_ms)
            fullest = max(fullest, in_window / lim.amount)
            assert in_window <= lim.amount, (lim, start, sorted(arrivals))
    return fullest


def _worst_window(lim: Limit, calls: list[tuple[int, int, int, str]]) -> float:
    """The most that any upstream window [t, t + W) of `lim` can hold when each call
    (first_send, last_send, cost, key) arrives anywhere in [first_send, last_send], placed
    by an adversary, as a share of the amount; asserts that it never exceeds the amount.

    A window can hold exactly the calls whose span meets it, so the worst windows start
    at a span's end (past it, that call no longer meets the window)."""
    groups: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for first, last, cost, key in calls:
        groups[key if lim.scope is Scope.KEY else ""].append((first, last, cost))
    worst = 0.0
    for spans in groups.values():
        for _, start, _ in spans:
            meets = [(f, la, c) for f, la, c in spans if la >= start and f < start + lim.window_ms]
            held = sum(c for _, _, c in meets)
            worst = max(worst, held / lim.amount)
            assert held <= lim.amount, (lim, start, sorted(meets))
    return worst


@given(policy=policies(), ops=st.one_of(operations, late_operations))
@PROPERTY
def test_no_upstream_window_holds_more_than_its_limit_wherever_calls_arrive(
    store: Topology, policy: Policy, ops: list[Op]
) -> None:
    """Design rule 3: a call reaches the upstream anywhere between its grant and its
    release (or its expiry, if it is not released in time: a client never sends on an
    expired lease). For every window of every calls limit, the adversary puts into it
    every call whose span meets it, and it still holds no more than the limit."""
    run = asyncio.run(_run(store.url, policy, ops, check_model=False))
    calls = [
        (granted, run.last_send[lease_id], cost, key)
        for granted, cost, key, lease_id in run.grants
        if lease_id not in run.refunded
    ]
    worst = max(
        (_worst_window(lim, calls) for lim in policy.limits if lim.kind is Kind.CALLS),
        default=0.0,
    )
    target(worst, label="fullest upstream window")
