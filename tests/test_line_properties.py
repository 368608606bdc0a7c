"""The line's order against a small model, in virtual time: on one concurrency slot, a
ticket is granted exactly when no lease holds the slot and no live ticket is ahead of it
(class rank, then arrival; a lower class that has aged goes ahead of the higher);
tickets not refreshed within TICKET_TTL_MS are gone."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from quotagate.coordinator.codec import RANK_SPAN
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import TICKET_TTL_MS, Engine, Grant
from quotagate.coordinator.policy import PolicySet, parse_policies

from .strategies import EPOCH_MS

pytestmark = pytest.mark.server

POLICIES = parse_policies(
    "apis: {slot: {lease_ttl: 10s, classes: {hi: {}, lo: {}}, limits: [{concurrent: 1}]}}"
)
# The same with an aging that a schedule reaches often (the default above is 100 s).
AGING = parse_policies(
    "apis: {slot: {lease_ttl: 10s, classes: {hi: {}, lo: {}}, aging: 3s,"
    " limits: [{concurrent: 1}]}}"
)
NAMES = ("a", "b", "c", "d")


@dataclass(frozen=True)
class Try:
    name: str
    priority: str
    wait_ms: int | None


@dataclass(frozen=True)
class Free:
    lease: int


@dataclass(frozen=True)
class Leave:
    name: str


@dataclass(frozen=True)
class Later:
    ms: int


@dataclass
class LineModel:
    aging: int
    leases: dict[str, int] = field(default_factory=dict)  # lease id -> expiry
    tickets: dict[str, tuple[int, int]] = field(default_factory=dict)  # -> (place, expiry)
    lo_stamp: int | None = None  # lo's last grant, or the first grant of all

    def alive(self, now: int) -> dict[str, tuple[int, int]]:
        self.tickets = {t: v for t, v in self.tickets.items() if v[1] > now}
        return self.tickets

    def in_line(self, place: int, now: int) -> int:
        """A place as it counts now: lo's go ahead of hi's once lo has aged."""
        aged = self.lo_stamp is not None and now - self.lo_stamp >= self.aging
        return place - 2 * RANK_SPAN if place // RANK_SPAN == 1 and aged else place

    def attempt(self, ticket: str, rank: int, wait_ms: int | None, now: int) -> bool:
        tickets = self.alive(now)
        queued = ticket in tickets
        place = tickets[ticket][0] if queued else rank * RANK_SPAN + now
        mine = self.in_line(place, now)
        ahead = [t for t, (p, _) in tickets.items() if self.in_line(p, now) < mine]
        held = [lease for lease, expiry in self.leases.items() if expiry > now]
        if not held and not ahead:
            tickets.pop(ticket, None)
            if rank == 1 or self.lo_stamp is None:
                self.lo_stamp = now
            return True
        if wait_ms is not None:  # a slot's soonest grant is at once: it always may wait
            tickets[ticket] = (place, now + TICKET_TTL_MS)
        else:
            tickets.pop(ticket, None)
        return False


schedules = st.lists(
    st.one_of(
        st.builds(
            Try,
            st.sampled_from(NAMES),
            st.sampled_from(["hi", "lo"]),
            st.sampled_from([None, 5_000, 5_000]),
        ),
        st.builds(Free, st.integers(0, 20)),
        st.builds(Leave, st.sampled_from(NAMES)),
        st.builds(Later, st.sampled_from([0, 1, 300, 700, 1_500, 2_500])),
    ),
    min_size=10,
    max_size=60,
)


async def _run(url: str, ops: list[object], policies: PolicySet) -> None:
    client = Redis.from_url(url)
    engine = Engine(client, policies)
    tenant = f"t-{uuid.uuid4().hex}"
    aging = policies.apis["slot"].aging_ms
    assert aging is not None
    model = LineModel(aging)
    now = EPOCH_MS
    granted: list[str] = []
    try:
        for op in ops:
            if isinstance(op, Later):
                now += op.ms
            elif isinstance(op, Try):
                # A ticket keeps one class for its life in line, as a request does.
                rank = 0 if op.priority == "hi" else 1
                ticket = f"{op.name}{rank}"
                result = await engine.acquire(
                    tenant,
                    "slot",
                    now=now,
                    priority=op.priority,
                    ticket=ticket,
                    line_wait_ms=op.wait_ms,
                )
                if rank == 1 and model.in_line(RANK_SPAN + now, now) < 0:
                    event("lo had aged")
                expected = model.attempt(ticket, rank, op.wait_ms, now)
                assert isinstance(result, Grant) == expected, (op, model, result)
                if isinstance(result, Grant):
                    granted.append(result.lease_id)
                    model.leases[result.lease_id] = result.expires_at_ms
            elif isinstance(op, Free) and granted:
                lease = granted[op.lease % len(granted)]
                if model.leases.pop(lease, 0) > now:
                    await engine.release(lease, "ok", now=now)
            elif isinstance(op, Leave):
                for rank in (0, 1):
                    ticket = f"{op.name}{rank}"
                    await engine.leave(tenant, "slot", "", ticket, now=now)
                    model.tickets.pop(ticket, None)
            waiting = (await engine.usage(tenant, "slot", now=now)).waiting
            assert waiting == len(model.alive(now)), (op, model)
    finally:
        await client.aclose()


@given(ops=schedules)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_line_agrees_with_its_model(redis_server: EmbeddedServer, ops: list[object]) -> None:
    asyncio.run(_run(redis_server.url, ops, POLICIES))


@given(ops=schedules)
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_the_line_with_aging_agrees_with_its_model(
    redis_server: EmbeddedServer, ops: list[object]
) -> None:
    asyncio.run(_run(redis_server.url, ops, AGING))
