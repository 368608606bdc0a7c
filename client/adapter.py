"""`QuotaAdapter`: the transport's leases for `requests` (extra `quotagate[requests]`).

    session = requests.Session()
    session.mount("https://", QuotaAdapter(quota))

Each request the route table knows waits for a lease, goes out through `inner` (another
adapter; default: requests' own `HTTPAdapter`, with the Session's proxies and TLS
settings), and is released with what happened, as the httpx transports do (the table in
`_gate`): 429s parsed, `Stats.ExecutionTime` as the run time, long calls renewed, a lease
too old to send on replaced, `on_exhausted` and `unrouted` alike. The body is read in
full to settle the outcome; `response.content`, `.json()` and `iter_content()` work as
usual, `response.raw` is spent.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import BaseAdapter, HTTPAdapter
from requests.exceptions import ProxyError
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import MaxRetryError, NewConnectionError

from ._gate import HEADROOM, Gate, OnExhausted, Unrouted, exhausted_answer, settle_broken
from ._sync import QuotaClient
from .exceptions import QuotaExhausted
from .routes import DEFENDER_ROUTES, Route, RouteTable


def not_sent(exc: BaseException) -> bool:
    """Whether requests failed before a byte of the request left: nothing to charge."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    # A proxy's failure may come after the proxy sent the request on: charged.
    if not isinstance(exc, requests.ConnectionError) or isinstance(exc, ProxyError):
        return False
    cause = exc.args[0] if exc.args else None
    reason = cause.reason if isinstance(cause, MaxRetryError) else cause
    return isinstance(reason, NewConnectionError)  # name resolution failures included


def _denied(request: requests.PreparedRequest, denial: QuotaExhausted) -> requests.Response:
    answer = exhausted_answer(denial)
    response = requests.Response()
    response.status_code = answer.status_code
    response.headers = CaseInsensitiveDict(answer.headers)
    response._content = answer.body  # requests' own way to build a read response
    response.encoding = "utf-8"
    response.reason = "Too Many Requests"
    response.url = request.url or ""
    response.request = request
    return response


class QuotaAdapter(HTTPAdapter):
    """Leases from `client` around each routed request sent through the Session it is
    mounted on; the options are those of `QuotaTransport`. `adapter_options` (e.g.
    `pool_maxsize`, `max_retries`) build the default inner adapter: this one's own pool.
    Closing it closes `inner`, not the client."""

    def __init__(
        self,
        client: QuotaClient,
        routes: RouteTable | Iterable[Route] = DEFENDER_ROUTES,
        inner: BaseAdapter | None = None,
        wait: float = 30.0,
        *,
        on_exhausted: OnExhausted = "raise",
        unrouted: Unrouted = "warn",
        headroom: float = HEADROOM,
        clock: Callable[[], float] = time.monotonic,
        priority: str | None = None,
        **adapter_options: Any,
    ) -> None:
        super().__init__(**adapter_options)
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
        self.inner = inner

    def _send_inner(self, request: requests.PreparedRequest, **options: Any) -> requests.Response:
        if self.inner is not None:
            return self.inner.send(request, **options)
        return super().send(request, **options)

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: float | tuple[float, float] | tuple[float, None] | None = None,
        verify: bool | str = True,
        cert: bytes | str | tuple[bytes | str, bytes | str] | None = None,
        proxies: Mapping[str, str] | None = None,
    ) -> requests.Response:
        options: dict[str, Any] = {
            "stream": stream,
            "timeout": timeout,
            "verify": verify,
            "cert": cert,
            "proxies": proxies,
        }
        url = urlsplit(request.url or "")
        found = self.gate.route(request.method or "GET", url.hostname or "", url.path)
        if found is None:
            return self._send_inner(request, **options)
        with self.gate.held(self.client, found) as lease:
            if isinstance(lease, QuotaExhausted):
                return _denied(request, lease)
            started = time.monotonic()
            try:
                response = self._send_inner(request, **options)
            except BaseException as exc:
                if not_sent(exc):
                    lease.set_outcome("not_called")
                else:
                    lease.set_outcome("failed", runtime=time.monotonic() - started)
                raise
            try:
                content = response.content  # decoded; kept for the caller
            except BaseException:
                settle_broken(
                    lease, response.status_code, response.headers, time.monotonic() - started
                )
                raise
            lease.record_answer(
                response.status_code, response.headers, content, time.monotonic() - started
            )
            return response

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        super().close()
