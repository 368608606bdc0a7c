"""The gateway's blocks of calls (`coordinator/blocks.py`) on a real server: who gets one
and how large, what each release charges, a throttle inside a block; and over HTTP, many
workers through the gateway: far fewer store calls than calls, every call charged, and
no upstream window ever above its limit wherever the calls landed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as WebRoute

from quotagate.coordinator.app import create_app
from quotagate.coordinator.blocks import HOLD, MOST, SHARE, Block, Blocks
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.engine import Denial, Engine, Grant, Release
from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.releases import ReleaseSender
from quotagate.coordinator.settings import Settings
from quotagate.coordinator.waiting import Ask, FleetLines

from .conftest import _wipe
from .service import serve_in_thread

pytestmark = pytest.mark.server

POLICIES_TEXT = """
margin: 0
apis:
  wide:
    lease_ttl: 10s
    limits: [{calls: 6400, per: 10s, granularity: 100ms}]
  narrow:
    lease_ttl: 10s
    limits: [{calls: 320, per: 10s, granularity: 100ms}]
  timed:
    lease_ttl: 10s
    runtime_estimate: 1s
    limits: [{calls: 6400, per: 10s}, {runtime: 600s, per: 10s}]
  slots:
    lease_ttl: 10s
    limits: [{calls: 6400, per: 10s}, {concurrent: 50}]
  probed:
    lease_ttl: 10s
    limits: [{calls: 6400, per: 10s, assured: 0.5}]
"""
POLICIES = parse_policies(POLICIES_TEXT)


async def nothing_gone() -> bool:
    return False


def blocks_on(redis_client: Redis) -> tuple[Engine, Blocks, ReleaseSender]:
    engine = Engine(redis_client, POLICIES)
    lines = FleetLines(engine)
    sender = ReleaseSender(engine, lines)
    return engine, Blocks(engine, lines, sender), sender


def busy(blocks: Blocks, ask: Ask, calls: int) -> None:
    """`calls` calls of the scope this second: its rate (there is no block to take yet)."""
    for _ in range(calls):
        assert blocks.take(ask) is None


async def a_block(blocks: Blocks, ask: Ask) -> Block:
    grant, block = await blocks.acquire(ask, nothing_gone)
    assert isinstance(grant, Grant) and block is not None
    return block


async def use(engine: Engine, api: str) -> tuple[int, int]:
    """(call units used: charged or in flight, leases in flight) of the api for contoso."""
    view = await engine.usage("contoso", api)
    return view.limits[0].used, view.in_flight


async def test_a_busy_scope_gets_a_block_sized_to_its_rate(redis_client: Redis) -> None:
    engine, blocks, sender = blocks_on(redis_client)
    ask = Ask("contoso", "wide")
    assert await blocks.acquire(ask, nothing_gone) == (None, None)  # not busy: no block
    busy(blocks, ask, 50)
    block = await a_block(blocks, ask)
    assert block.grant.cost == int(50 * HOLD)  # this second's calls over the hold
    assert await use(engine, "wide") == (block.grant.cost, 1)  # one lease
    taken = [blocks.take(ask) for _ in range(block.grant.cost)]  # the acquire took one
    assert taken[:-1] == [block] * (block.grant.cost - 1) and taken[-1] is None
    for _ in range(block.grant.cost - 2):
        block.end("ok")
    block.end("not_called")  # never reached the upstream: refunded
    assert await use(engine, "wide") == (block.grant.cost, 1)  # one call still runs
    block.end("failed")  # sent, so charged
    await sender.aclose()
    assert await use(engine, "wide") == (block.grant.cost - 1, 0)


async def test_units_not_handed_out_are_refunded_when_the_block_closes(
    redis_client: Redis,
) -> None:
    engine, blocks, sender = blocks_on(redis_client)
    ask = Ask("contoso", "wide")
    busy(blocks, ask, 300)
    block = await a_block(blocks, ask)
    assert block.grant.cost == 30
    block.end("ok")
    await asyncio.sleep(HOLD * 2)  # it closes by itself
    assert not block.open and blocks.take(ask) is None
    await sender.aclose()
    assert await use(engine, "wide") == (1, 0)


async def test_a_block_is_capped_and_taken_only_where_leases_may_end_in_parts(
    redis_client: Redis,
) -> None:
    _, blocks, sender = blocks_on(redis_client)
    sizes = {}
    for api in ("wide", "narrow", "timed", "slots", "probed"):
        ask = Ask("contoso", api)
        busy(blocks, ask, 5000)
        sizes[api] = blocks.size(ask)
    assert sizes == {"wide": MOST, "narrow": 320 // SHARE, "timed": 1, "slots": 1, "probed": 1}
    await sender.aclose()


async def test_a_scope_whose_block_is_denied_takes_none_for_a_while(
    redis_client: Redis,
) -> None:
    engine, blocks, sender = blocks_on(redis_client)
    for _ in range(320 - 3):
        lease = await engine.acquire("contoso", "narrow")
        assert isinstance(lease, Grant)
    ask = Ask("contoso", "narrow")
    busy(blocks, ask, 100)
    assert blocks.size(ask) == 5
    assert await blocks.acquire(ask, nothing_gone) == (None, None)  # 5 do not fit
    assert blocks.size(ask) == 1  # backing off: its calls take leases of their own
    assert isinstance(await engine.acquire("contoso", "narrow", cost=3), Grant)
    assert isinstance(await engine.acquire("contoso", "narrow"), Denial)
    await sender.aclose()


async def test_calls_that_come_together_share_one_block(redis_client: Redis) -> None:
    engine, blocks, sender = blocks_on(redis_client)
    ask = Ask("contoso", "wide")
    busy(blocks, ask, 200)
    got = await asyncio.gather(*(blocks.acquire(ask, nothing_gone) for _ in range(10)))
    made = {id(block) for _, block in got}
    assert len(made) == 1  # one acquire, ten units of it
    (block,) = {block for _, block in got if block is not None}
    assert block.handed == 10
    for _ in range(10):
        block.end("ok")
    block.close()
    await sender.aclose()
    assert await use(engine, "wide") == (10, 0)


async def test_a_throttle_in_a_block_pauses_the_fleet_at_once_keeping_its_calls_in_flight(
    redis_client: Redis,
) -> None:
    engine, blocks, sender = blocks_on(redis_client)
    ask = Ask("contoso", "wide")
    other = Ask("contoso", "wide", key="other")
    busy(blocks, ask, 100)
    busy(blocks, other, 100)
    block = await a_block(blocks, ask)
    neighbour = await a_block(blocks, other)
    assert blocks.take(ask) is block and blocks.take(ask) is block  # 3 calls in flight
    block.end("ok")
    await block.end_throttled(Release(block.grant.lease_id, "throttled", retry_after_ms=5_000))
    # Paused before the tool hears of it; both blocks of the api closed here.
    denial = await engine.acquire("contoso", "wide", "third")
    assert isinstance(denial, Denial) and denial.reason == "cooling_down"
    assert not block.open and not neighbour.open
    assert blocks.take(ask) is None and blocks.take(other) is None
    # 2 charged (the ok one and the throttled one), the third still in flight under the
    # block, which holds no more; the neighbour as it was, until its call ends.
    assert await use(engine, "wide") == (2 + 1 + neighbour.grant.cost, 2)
    block.end("ok")
    neighbour.end("ok")
    await sender.aclose()
    assert await use(engine, "wide") == (4, 0)


# -- over HTTP ------------------------------------------------------------------------------

WINDOW = 1.0
AMOUNT = 640  # calls per WINDOW seconds: blocks of up to 10


class Counting:
    """An upstream that notes when each call arrived (this process's clock)."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.lock = threading.Lock()
        self.app = Starlette(routes=[WebRoute("/{path:path}", self.answer, methods=["GET"])])

    async def answer(self, request: Request) -> Response:
        with self.lock:
            self.arrivals.append(time.monotonic())
        return JSONResponse({"value": []})


@pytest.fixture
def counting() -> Iterator[tuple[Counting, str]]:
    upstream = Counting()
    with serve_in_thread(upstream.app) as url:
        yield upstream, url


def _coordinator(valkey: EmbeddedServer, tmp_path: Path, upstream: str, text: str) -> Settings:
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(text)
    return Settings(
        redis_url=valkey.url,
        policies=policy_file,
        max_wait=10.0,
        gateway_wait=10.0,
        gateway_upstreams={"api.security.microsoft.com": upstream},
    )


def _scripts_run(url: str) -> int:
    stats = redis.Redis.from_url(url).info("commandstats")
    scripts = ("cmdstat_evalsha", "cmdstat_eval")
    return sum(int(value["calls"]) for name, value in stats.items() if name in scripts)


def _drive(url: str | list[str], workers: int, calls: int) -> list[int]:
    """`workers` threads, each `calls` calls through the gateway (of the coordinators in
    `url` in turn, one per worker); their statuses."""
    statuses: list[int] = []
    urls = [url] if isinstance(url, str) else url

    def worker(base: str) -> None:
        with httpx.Client(headers={"X-Quotagate-Tenant": "contoso/app1"}) as client:
            for _ in range(calls):
                target = f"{base}/gateway/api.security.microsoft.com/api/incidents"
                statuses.append(client.get(target, timeout=30).status_code)

    threads = [threading.Thread(target=worker, args=(urls[n % len(urls)],)) for n in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def _settled(url: str) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        found = httpx.get(f"{url}/v1/usage/contoso/app1/m365d.incidents").json()
        if not found["in_flight"] or time.monotonic() > deadline:
            return {"used": found["limits"][0]["used"], "in_flight": found["in_flight"]}
        time.sleep(0.02)


def test_workers_through_the_gateway_share_blocks_and_every_call_is_charged(
    valkey_server: EmbeddedServer, tmp_path: Path, counting: tuple[Counting, str]
) -> None:
    """A limit out of reach: the calls go in blocks (far fewer store scripts than two per
    call), and once the blocks have ended each call is charged exactly once."""
    _wipe(valkey_server.url)
    text = "margin: 0\napis:\n  m365d.incidents:\n    limits: [{calls: 100000, per: 1m}]\n"
    settings = _coordinator(valkey_server, tmp_path, counting[1], text)
    before = _scripts_run(valkey_server.url)
    with serve_in_thread(create_app(settings)) as url:
        statuses = _drive(url, 8, 150)
        assert statuses == [200] * 1200
        assert _settled(url) == {"used": 1200, "in_flight": 0}
    assert len(counting[0].arrivals) == 1200
    scripts = _scripts_run(valkey_server.url) - before
    assert scripts < 1200, scripts  # two per call without blocks


def test_no_upstream_window_holds_more_than_the_limit_through_blocks(
    valkey_server: EmbeddedServer, tmp_path: Path, counting: tuple[Counting, str]
) -> None:
    """A limit the workers of two coordinators overrun: blocks while there is room,
    leases of their own in the line once there is not; in no WINDOW of arrivals at the
    upstream more than AMOUNT calls, and nothing left in flight once the calls are done."""
    _wipe(valkey_server.url)
    text = (
        "margin: 0\napis:\n  m365d.incidents:\n    lease_ttl: 10s\n"
        f"    limits: [{{calls: {AMOUNT}, per: {WINDOW:g}s, granularity: 100ms}}]\n"
    )
    settings = _coordinator(valkey_server, tmp_path, counting[1], text)
    with (
        serve_in_thread(create_app(settings)) as one,
        serve_in_thread(create_app(settings)) as two,
    ):
        statuses = _drive([one, two], 12, 150)
        assert statuses.count(200) == len(counting[0].arrivals)
        settled = _settled(one)
    arrivals = sorted(counting[0].arrivals)
    fullest = max(
        sum(1 for other in arrivals[at:] if other < start + WINDOW)
        for at, start in enumerate(arrivals)
    )
    assert fullest <= AMOUNT, fullest
    assert len(arrivals) > 2 * AMOUNT  # the limit did bind
    assert settled["in_flight"] == 0
