"""The fleet index (`coordinator/index.py`): this process's notes reach the store in the
background, and its reads see them before, while and after they are written."""

from __future__ import annotations

import asyncio

import pytest
import redis

from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.index import FleetIndex
from quotagate.coordinator.leases import LeaseRef
from quotagate.coordinator.store import connect

pytestmark = pytest.mark.server

HANG = 10.0  # a hang detector only


async def test_a_read_during_a_flush_sees_the_notes_on_their_way(
    valkey_server: EmbeddedServer,
) -> None:
    with redis.Redis.from_url(valkey_server.url) as admin:
        admin.flushall()
    client = connect(valkey_server.url)
    index = FleetIndex(client)
    pair = ("t-index", "m365d.incidents")
    ref = LeaseRef.new(*pair, "")
    try:
        index.seen(*pair, "")
        index.granted(*pair, "", ref.lease_id, "worker-1", 60_000)
        index.throttled(ref, holder="worker-1", status=429, retry_after=30.0)
        before = await index.holdings([pair])
        assert [h.holder for h in before[pair]] == ["worker-1"]
        with redis.Redis.from_url(valkey_server.url) as admin:
            # The flush's writes wait on the server; reads go on.
            admin.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
            try:
                flushing = asyncio.create_task(index.flush())
                async with asyncio.timeout(HANG):
                    while index._notes.granted:  # the notes taken for the write
                        await asyncio.sleep(0.001)
                during = await index.holdings([pair])
                active = await index.active()
                pauses = [(p.tenant, p.api) for p in await index.pauses()]
                throttles = [(t["tenant"], t["status"]) for t in await index.throttles()]
                assert not flushing.done()
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
        async with asyncio.timeout(HANG):
            await flushing
        after = await index.holdings([pair])
        assert during == before == after
        assert (*pair, "") in active
        assert pauses == [pair]
        assert throttles == [(pair[0], 429)]
        index.ended(ref)
        assert (await index.holdings([pair]))[pair] == []
    finally:
        await client.aclose()
