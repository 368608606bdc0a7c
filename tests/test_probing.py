"""Probing (design rule 8): an upstream whose real limit is below the policy's refuses at
most one call per limit, whatever the interleaving of grants, arrivals and releases.

The upstream here counts every attempt in an exact sliding window at arrival (as
Defender does: throttled attempts count too) and names its real limit in each refusal; a
call arrives at any moment between its grant and its release, chosen by hypothesis. The
engine runs on a real server and is checked against the reference model as it goes.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings, target
from hypothesis import strategies as st

from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Denial, Engine, Grant
from quotagate.coordinator.errors import UnknownLease
from quotagate.coordinator.policy import Kind, Limit, Policy, PolicySet, Scope, make_policy
from quotagate.coordinator.store import connect

from .model import Model
from .strategies import EPOCH_MS

pytestmark = pytest.mark.server

PROPERTY = settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@dataclass(frozen=True)
class World:
    policy: Policy
    real: int  # the upstream's limit of the calls window


@st.composite
def worlds(draw: st.DrawFn) -> World:
    window = draw(st.sampled_from([10_000, 20_000]))
    granularity = draw(st.sampled_from([100, 1_000, 2_500]))
    amount = draw(st.integers(2, 8))
    share = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75]))
    assured = math.floor(amount * share)
    margin = draw(st.sampled_from([0, 0, 100]))
    scope = draw(st.sampled_from([Scope.API, Scope.KEY]))
    calls = Limit(Kind.CALLS, amount, window, granularity, margin, scope, assured=assured)
    limits: tuple[Limit, ...] = (calls,)
    if draw(st.booleans()):
        limits += (Limit(Kind.CONCURRENT, draw(st.integers(2, 6))),)
    ttl = draw(st.sampled_from([10_000, 30_000]))
    real = draw(st.integers(max(assured, 1), amount))
    return World(make_policy("p", limits, lease_ttl_ms=ttl), real)


# A schedule: ("acquire", n) n times, ("arrive", i), ("release", i), ("skip", i) (released
# unsent), ("advance", ms), ("settle", 0) (every call sent arrives, every answer is
# released); i picks among the leases that can take that step (and for a release, whether
# it reports the longest run time it can have had).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.integers(1, 4)),
        st.tuples(st.just("arrive"), st.integers(0, 20)),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("skip"), st.integers(0, 20)),
        st.tuples(st.just("advance"), st.sampled_from([1, 10, 100, 500, 2_000, 7_000])),
        st.just(("settle", 0)),
    ),
    max_size=60,
)


@dataclass
class Call:
    lease_id: str
    key: str
    granted: int
    expiry: int
    answer: str = ""  # "" not sent yet; "ok" | "throttled" once it arrived
    arrived: int = 0


async def _run(url: str, world: World, schedule: list[tuple[str, int]]) -> int:
    """Drive the schedule; returns the most calls the upstream refused on one counter (one
    per key for a limit of key scope: the upstream counts each path alone)."""
    client = connect(url)
    engine = Engine(client, PolicySet(apis={"p": world.policy}))
    model = Model(world.policy)
    tenant = f"t-{uuid.uuid4().hex}"
    window = world.policy.limits[0].window_ms
    now = EPOCH_MS
    calls: list[Call] = []
    per_key = world.policy.limits[0].scope is Scope.KEY
    attempts: dict[str, list[int]] = {"": [], "a": []}  # arrival times, per counter
    refused = {"": 0, "a": 0}
    plan = [
        expanded
        for step, pick in schedule
        for expanded in (
            [("acquire", pick)] * pick
            if step == "acquire"
            else [("arrive", 0)] * 8 + [("release", 0)] * 8
            if step == "settle"
            else [(step, pick)]
        )
    ]
    try:
        for step, pick in plan:
            unsent = [c for c in calls if not c.answer and c.expiry > now]
            answered = [c for c in calls if c.answer]
            if step == "advance":
                now += pick
            elif step == "acquire":
                key = "a" if pick % 2 else ""
                result = await engine.acquire(tenant, "p", key, now=now)
                token = result.lease_id if isinstance(result, Grant) else "denied"
                expected = model.acquire(token, key, 1, 0, world.policy.lease_ttl_ms, now)
                assert isinstance(result, Grant) == expected.granted, (expected, result)
                if isinstance(result, Grant):
                    calls.append(Call(result.lease_id, key, now, result.expires_at_ms))
                else:
                    assert isinstance(result, Denial)
                    assert (result.retry_after_ms, result.soonest_ms) == (
                        expected.retry_ms,
                        expected.soonest,
                    ), (expected, result)
            elif step == "arrive" and unsent:
                call = unsent[pick % len(unsent)]
                counter = call.key if per_key else ""
                held = sum(1 for at in attempts[counter] if now - window < at <= now)
                call.answer = "ok" if held < world.real else "throttled"
                call.arrived = now
                refused[counter] += call.answer == "throttled"
                attempts[counter].append(now)
            elif step in ("release", "skip") and (answered if step == "release" else unsent):
                call = (answered if step == "release" else unsent)[
                    pick % len(answered if step == "release" else unsent)
                ]
                calls.remove(call)
                outcome = call.answer or "not_called"
                named = (world.real, window) if outcome == "throttled" else None
                retry = 1 if outcome == "throttled" else None
                # The run time an upstream may report of its own: at most the time since
                # the arrival; or, as a client measures, any time (it bounds nothing).
                ran = now - call.arrived if outcome == "ok" and pick % 2 else None
                upstream = ran is not None and pick % 4 == 1
                if ran is not None and not upstream:
                    ran += pick % 7 * 100
                try:
                    await engine.release(
                        call.lease_id,
                        outcome,
                        retry_after_ms=retry,
                        runtime_ms=ran,
                        named=named,
                        runtime_upstream=upstream,
                        now=now,
                    )
                    released = "released"
                except UnknownLease:  # it expired
                    released = "gone"
                expected_release = model.release(
                    call.lease_id, outcome, retry, ran, now, named, upstream=upstream
                )
                assert released == ("released" if expected_release == "released" else "gone")
    finally:
        await client.aclose()
    return max(refused.values())


@given(world=worlds(), schedule=steps)
@PROPERTY
def test_an_upstream_below_the_policy_refuses_at_most_one_call(
    valkey_server: EmbeddedServer, world: World, schedule: list[tuple[str, int]]
) -> None:
    refused = asyncio.run(_run(valkey_server.url, world, schedule))
    target(refused, label="calls refused")
    assert refused <= 1, world
