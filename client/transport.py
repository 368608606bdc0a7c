"""httpx transports that take a lease for every routed request.

Swap one into an `httpx.Client` (or an SDK built on httpx) and each request the route
table knows waits for a lease, goes out through the inner transport, and releases the
lease with what happened:

| what happened                               | release                                       |
|---------------------------------------------|-----------------------------------------------|
| inner transport could not connect           | `not_called` (the charge is refunded)         |
| inner transport failed after that           | `failed`, runtime                             |
| answer read, throttled (429 or its codes)   | `throttled`, status, retry_after if given, runtime |
| answer read, status below 400               | `ok`, status, runtime                         |
| answer read, other status                   | `failed`, status, runtime                     |

runtime is `Stats.ExecutionTime` of a hunting answer, else the measured wall time. The
body is read in full to find those, then handed back in a fresh stream, so streaming
callers still work. The release goes out in the background (the client's sender), so
the caller waits for one round trip to the coordinator, the acquire. A denied lease
raises `QuotaExhausted`; unrouted requests pass straight through.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable

import httpx

from ._async import AsyncQuotaClient
from ._sync import QuotaClient
from .lease import Lease
from .parsing import parse_throttle
from .routes import DEFENDER_ROUTES, Route, RouteTable

# Failures that leave before a byte of the request was sent: nothing to charge.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def _table(routes: RouteTable | Iterable[Route]) -> RouteTable:
    return routes if isinstance(routes, RouteTable) else RouteTable(routes, defaults=())


# The raw stream, not `iter_raw()`: a response built in memory (mock transports, caches)
# counts as consumed already, while its `ByteStream` can still be iterated.
def _sync_stream(response: httpx.Response) -> httpx.SyncByteStream:
    if not isinstance(response.stream, httpx.SyncByteStream):
        raise TypeError("the inner transport returned a response without a sync stream")
    return response.stream


def _async_stream(response: httpx.Response) -> httpx.AsyncByteStream:
    if not isinstance(response.stream, httpx.AsyncByteStream):
        raise TypeError("the inner transport returned a response without an async stream")
    return response.stream


def _settle(lease: Lease, response: httpx.Response, raw: bytes, started: float) -> None:
    """Record the outcome an answer shows, its body included."""
    peek = httpx.Response(
        response.status_code, headers=response.headers, stream=httpx.ByteStream(raw)
    )
    with contextlib.suppress(httpx.DecodingError):
        peek.read()  # decodes gzip etc.; left unread, `report` skips the body
    lease.report(peek, runtime=time.monotonic() - started)


def _settle_broken(lease: Lease, response: httpx.Response, started: float) -> None:
    """Record the outcome of an answer whose body broke off: the call failed, unless its
    status line and headers already say throttled."""
    runtime = time.monotonic() - started
    throttle = parse_throttle(response.status_code, response.headers, b"")
    if throttle is None:
        lease.set_outcome("failed", response.status_code, runtime=runtime)
    else:
        lease.set_outcome("throttled", response.status_code, throttle.retry_after, runtime)


def _fresh(response: httpx.Response, raw: bytes) -> httpx.Response:
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=response.extensions,
    )


class QuotaTransport(httpx.BaseTransport):
    """Leases from `client` around each routed request; `wait` is seconds to wait for one.
    The client is not closed with the transport; the inner transport is."""

    def __init__(
        self,
        client: QuotaClient,
        routes: RouteTable | Iterable[Route] = DEFENDER_ROUTES,
        inner: httpx.BaseTransport | None = None,
        wait: float = 30.0,
    ) -> None:
        self.client = client
        self.routes = _table(routes)
        self.inner = inner if inner is not None else httpx.HTTPTransport()
        self.wait = wait

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        found = self.routes.match(request.method, request.url.host, request.url.path)
        if found is None:
            return self.inner.handle_request(request)
        with self.client.lease(found.api, found.key, wait=self.wait) as lease:
            started = time.monotonic()
            try:
                response = self.inner.handle_request(request)
            except NOT_SENT:
                lease.set_outcome("not_called")
                raise
            except BaseException:
                lease.set_outcome("failed", runtime=time.monotonic() - started)
                raise
            try:
                raw = b"".join(_sync_stream(response))
            except BaseException:
                _settle_broken(lease, response, started)
                raise
            finally:
                response.close()
            _settle(lease, response, raw, started)
            return _fresh(response, raw)

    def close(self) -> None:
        self.inner.close()


class AsyncQuotaTransport(httpx.AsyncBaseTransport):
    """The asyncio twin of `QuotaTransport`."""

    def __init__(
        self,
        client: AsyncQuotaClient,
        routes: RouteTable | Iterable[Route] = DEFENDER_ROUTES,
        inner: httpx.AsyncBaseTransport | None = None,
        wait: float = 30.0,
    ) -> None:
        self.client = client
        self.routes = _table(routes)
        self.inner = inner if inner is not None else httpx.AsyncHTTPTransport()
        self.wait = wait

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        found = self.routes.match(request.method, request.url.host, request.url.path)
        if found is None:
            return await self.inner.handle_async_request(request)
        async with self.client.lease(found.api, found.key, wait=self.wait) as lease:
            started = time.monotonic()
            try:
                response = await self.inner.handle_async_request(request)
            except NOT_SENT:
                lease.set_outcome("not_called")
                raise
            except BaseException:
                lease.set_outcome("failed", runtime=time.monotonic() - started)
                raise
            try:
                raw = b"".join([chunk async for chunk in _async_stream(response)])
            except BaseException:
                _settle_broken(lease, response, started)
                raise
            finally:
                await response.aclose()
            _settle(lease, response, raw, started)
            return _fresh(response, raw)

    async def aclose(self) -> None:
        await self.inner.aclose()
