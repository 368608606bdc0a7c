"""Fixtures of the client tests: a fake coordinator and clients talking to it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from quotagate.client import AsyncQuotaClient, QuotaClient

from .fakes import TENANT, URL, FakeCoordinator


@pytest.fixture
def fake() -> FakeCoordinator:
    return FakeCoordinator()


@pytest.fixture
def client(fake: FakeCoordinator) -> Iterator[QuotaClient]:
    with QuotaClient(URL, TENANT, "s3cret", transport=fake.transport) as quota:
        yield quota


@pytest.fixture
async def aclient(fake: FakeCoordinator) -> AsyncIterator[AsyncQuotaClient]:
    async with AsyncQuotaClient(URL, TENANT, "s3cret", transport=fake.transport) as quota:
        yield quota
