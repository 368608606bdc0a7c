"""httpx transports that take a lease for every routed request.

Swap one into an `httpx.Client` (or an SDK built on httpx) and each request the route
table knows waits for a lease, goes out through the inner transport, and releases the
lease with what happened (the table in `_gate`). The body is read in full to find that,
then handed back in a fresh stream, so streaming callers still work. The release goes out
in the background (the client's sender), so the caller waits for one round trip to the
coordinator, the acquire.

A lease that does not come within `wait` raises `QuotaExhausted`, or with
`on_exhausted="respond"` becomes the 429 the upstream would give (`Retry-After`,
Defender's body), so an SDK's own retry and error types apply. A request to a Microsoft
host that no route matches is told once per path template (`unrouted="warn"`), refused
(`"raise"`) or passed quietly (`"pass"`); other hosts pass.

Proxies: httpx sends a request through a proxy by its own transport, so a proxy given to
the `httpx.Client` (`proxy=`, `mounts=`) skips this one, and a client with `transport=`
ignores `HTTPS_PROXY` and friends. Give `proxy=` to the transport instead: its default
inner transport uses it, or else (`trust_env=True`) the environment's proxy settings, as
httpx reads them. The caller's request is never changed, so an SDK that sends the same
request object again (a retry) is routed again.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from collections.abc import Callable, Iterable

import httpx

from ._async import AsyncQuotaClient
from ._gate import HEADROOM, Gate, OnExhausted, Unrouted, exhausted_answer, settle_broken
from ._sync import QuotaClient
from .exceptions import QuotaExhausted
from .lease import Lease
from .routes import DEFENDER_ROUTES, Route, RouteTable

# Failures that leave before a byte of the request was sent: nothing to charge.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


ProxyType = str | httpx.URL | httpx.Proxy


def env_proxies() -> bool:
    """Whether the environment names a proxy that httpx would use (`HTTP_PROXY`,
    `HTTPS_PROXY`, `ALL_PROXY`, any case)."""
    return any(scheme in urllib.request.getproxies() for scheme in ("http", "https", "all"))


class _ThroughClient(httpx.BaseTransport):
    """Sends through an `httpx.Client`, which picks the environment's proxy per URL (and
    honours `NO_PROXY`) exactly as httpx does for a client built without a transport."""

    def __init__(self) -> None:
        self._client = httpx.Client(trust_env=True, timeout=None)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self._client.send(request, stream=True)

    def close(self) -> None:
        self._client.close()


class _AsyncThroughClient(httpx.AsyncBaseTransport):
    def __init__(self) -> None:
        self._client = httpx.AsyncClient(trust_env=True, timeout=None)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._client.send(request, stream=True)

    async def aclose(self) -> None:
        await self._client.aclose()


def default_inner(proxy: ProxyType | None, trust_env: bool) -> httpx.BaseTransport:
    """httpx's network transport: through `proxy`, else through the environment's proxy
    when `trust_env` and one is set, else direct."""
    if proxy is not None:
        return httpx.HTTPTransport(proxy=proxy)
    if trust_env and env_proxies():
        return _ThroughClient()
    return httpx.HTTPTransport(trust_env=trust_env)


def default_async_inner(proxy: ProxyType | None, trust_env: bool) -> httpx.AsyncBaseTransport:
    """The asyncio twin of `default_inner`."""
    if proxy is not None:
        return httpx.AsyncHTTPTransport(proxy=proxy)
    if trust_env and env_proxies():
        return _AsyncThroughClient()
    return httpx.AsyncHTTPTransport(trust_env=trust_env)


def _path(request: httpx.Request) -> str:
    """The request's path as sent, still percent-encoded, without the query."""
    return request.url.raw_path.split(b"?", 1)[0].decode("ascii")


def _denied(request: httpx.Request, denial: QuotaExhausted) -> httpx.Response:
    answer = exhausted_answer(denial)
    return httpx.Response(
        answer.status_code, headers=answer.headers, content=answer.body, request=request
    )


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
    settle_broken(lease, response.status_code, response.headers, time.monotonic() - started)


def _fresh(response: httpx.Response, raw: bytes) -> httpx.Response:
    return httpx.Response(
        response.status_code,
        headers=response.headers,
        stream=httpx.ByteStream(raw),
        extensions=response.extensions,
    )


class _Gated:
    """What the twins share besides the gate's rules: the options they read back."""

    gate: Gate

    @property
    def routes(self) -> RouteTable:
        return self.gate.routes

    @property
    def wait(self) -> float:
        return self.gate.wait


class QuotaTransport(_Gated, httpx.BaseTransport):
    """Leases from `client` around each routed request; `wait` is seconds to wait for one;
    `priority` names the class of the api's policy every lease asks for (None: its default).
    `inner` sends the requests (default: httpx's, through `proxy` or, with `trust_env`, the
    environment's proxy); `headroom` is seconds a lease must have left to be sent on;
    `clock` is the monotonic clock that lease ages are read on. The client is not closed
    with the transport; the inner transport is."""

    def __init__(
        self,
        client: QuotaClient,
        routes: RouteTable | Iterable[Route] = DEFENDER_ROUTES,
        inner: httpx.BaseTransport | None = None,
        wait: float = 30.0,
        *,
        on_exhausted: OnExhausted = "raise",
        unrouted: Unrouted = "warn",
        proxy: ProxyType | None = None,
        trust_env: bool = True,
        headroom: float = HEADROOM,
        clock: Callable[[], float] = time.monotonic,
        priority: str | None = None,
    ) -> None:
        if inner is not None and proxy is not None:
            raise ValueError("give the proxy to the inner transport, or no inner transport")
        self.client = client
        self.gate = Gate(
            routes,
            wait=wait,
            on_exhausted=on_exhausted,
            unrouted=unrouted,
            headroom=headroom,
            clock=clock,
            priority=priority,
        )
        self.inner = inner if inner is not None else default_inner(proxy, trust_env)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        found = self.gate.route(request.method, request.url.host, _path(request))
        if found is None:
            return self.inner.handle_request(request)
        with self.gate.held(self.client, found) as lease:
            if isinstance(lease, QuotaExhausted):
                return _denied(request, lease)
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


class AsyncQuotaTransport(_Gated, httpx.AsyncBaseTransport):
    """The asyncio twin of `QuotaTransport`."""

    def __init__(
        self,
        client: AsyncQuotaClient,
        routes: RouteTable | Iterable[Route] = DEFENDER_ROUTES,
        inner: httpx.AsyncBaseTransport | None = None,
        wait: float = 30.0,
        *,
        on_exhausted: OnExhausted = "raise",
        unrouted: Unrouted = "warn",
        proxy: ProxyType | None = None,
        trust_env: bool = True,
        headroom: float = HEADROOM,
        clock: Callable[[], float] = time.monotonic,
        priority: str | None = None,
    ) -> None:
        if inner is not None and proxy is not None:
            raise ValueError("give the proxy to the inner transport, or no inner transport")
        self.client = client
        self.gate = Gate(
            routes,
            wait=wait,
            on_exhausted=on_exhausted,
            unrouted=unrouted,
            headroom=headroom,
            clock=clock,
            priority=priority,
        )
        self.inner = inner if inner is not None else default_async_inner(proxy, trust_env)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        found = self.gate.route(request.method, request.url.host, _path(request))
        if found is None:
            return await self.inner.handle_async_request(request)
        async with self.gate.aheld(self.client, found) as lease:
            if isinstance(lease, QuotaExhausted):
                return _denied(request, lease)
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
