"""The gateway: `/gateway/{host}/{path}?{query}` forwarded to `https://{host}/{path}?{query}`
under a lease, for tools that can set a base URL but cannot load Python.

What it does with one request, in order:

1. The target. Only a host of the route table (the Defender and Graph hosts) or one that
   the settings add is forwarded to, named exactly: an IP literal, a port, userinfo, a
   percent-escape or any other host is refused (403) before any connection, and so is a
   path that could mean another path upstream than here (escaped slashes, dot segments;
   400). `gateway_upstreams` sends a host to another base URL (sovereign cloud, egress
   proxy, test upstream). Redirects are handed back, never followed.
2. Who pays. The tenant is `X-Quotagate-Tenant`, else `<tid>/<appid>` (or `azp`) from the
   claims of the request's own bearer token, decoded and not verified: it only picks whose
   budget is charged, Microsoft verifies the token. With tokens configured, quotagate's own
   token travels in `X-Quotagate-Token`; `Authorization` goes upstream untouched and is
   never logged.
3. The lease, taken in-process through the app's `Waiting`, for the (api, key) that the
   client's route table gives; `X-Quotagate-Wait` (seconds, capped by `max_wait`) and
   `X-Quotagate-Priority` as in an acquire. No lease within the wait: a 429 in the
   upstream's own shape with `Retry-After`, so the tool's retry logic applies. A path no
   route matches passes without a lease, marked `X-Quotagate: uncoordinated` (or is
   refused, with `gateway_unrouted: refuse`). A coordinated answer says so in
   `X-Quotagate: coordinated`, with `X-Quotagate-Api` and `X-Quotagate-Waited` (seconds).
   A busy scope's calls share blocks of call units instead (`blocks.py`): one lease of
   several, handed out a call at a time with no store call in between.
4. The call. Bodies stream both ways; only what the outcome needs is held: a small error
   body (up to `PEEK` bytes, where throttles are told), and for an api with run-time limits
   the last `PEEK` bytes of the answer, where `Stats.ExecutionTime` is. Upstream calls go
   out on one aiohttp session (`Upstream`): the exact path and query as given, no headers
   the tool did not send besides `Host` and the body's framing, encoded bodies passed
   through as they came (only the outcome's peek decodes them). The outcome is
   the client's own (`Lease.report`, `quotagate.client.parsing`): a 429 releases as
   `throttled` before the tool sees it, so the whole fleet pauses first; other releases
   leave the critical path, batched with those of other calls (`releases.py`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import re
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

import aiohttp
import anyio
import httpx
import yarl
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from quotagate.client.lease import Lease, outcome_for_status
from quotagate.client.lease import Outcome as Said
from quotagate.client.parsing import execution_time, parse_throttle
from quotagate.client.routes import DEFENDER_HOSTS, GRAPH_HOSTS, RouteMatch, RouteTable
from quotagate.client.routes import endpoint_key as endpoint_template

from .auth import OPEN, Authorizer, Principal
from .blocks import HOLD, Block, Blocks, keep_alive
from .engine import Denial, Engine, Grant, Outcome, Release
from .errors import BackendUnavailable, InvalidRequest, QuotagateError, Unauthorized, UnknownLease
from .policy import Kind
from .releases import DRAIN_TIMEOUT, ReleaseSender
from .replies import error_reply
from .settings import Settings
from .waiting import Ask, Waiting

log = logging.getLogger("quotagate")

PREFIX = "/gateway/"
PEEK = 64 * 1024  # bytes of an answer held to read its outcome
WARNED = 1024  # unrouted path templates warned about at most (paths come from clients)
# Headers of one connection, not of the message (RFC 9110, 7.6.1), and those of ours.
HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
_NOT_FORWARDED = frozenset({b"host", b"expect", b"content-length"})
_OURS = b"x-quotagate-"
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?")
_SENDABLE = re.compile(r"[!-~]*")  # what a request target may hold, sent byte for byte
# Failures that leave before a byte of the request was sent: nothing to charge. A
# connection that could not be made (refused, DNS, TLS, the egress proxy), or none
# within the connect timeout (a free one from the pool included).
NOT_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
# Headers aiohttp adds to a request that lacks them: the tool's request goes as it sent it
# (`Host` and the body's framing, Content-Length or chunked, are the only ones added).
_NOT_ADDED = frozenset({"User-Agent", "Accept", "Accept-Encoding", "Content-Type"})


class HostRefused(QuotagateError):
    code = "host_not_allowed"
    status = 403


class PathRefused(QuotagateError):
    code = "invalid_path"
    status = 400


class TenantMissing(QuotagateError):
    code = "tenant_required"
    status = 400


class Unrouted(QuotagateError):
    code = "unrouted"
    status = 404


@dataclass(frozen=True)
class Target:
    host: str  # as named in the gateway path, lower case
    path: str  # decoded, for the route table
    url: str  # where the request goes


def upstream_session(settings: Settings) -> aiohttp.ClientSession:
    """The session of the upstream calls (in a running event loop): redirects are the
    tool's business (`allow_redirects=False` on each call), and no cookie is kept: the
    session serves every tenant, so one tenant's cookie must never reach another's call.
    At most `gateway_connections`, each kept alive; `gateway_timeout` is how long the
    upstream may stay silent, and how long a call may wait for a connection. Not
    `trust_env`: that would read the environment's proxies on every call and add
    credentials from `.netrc`; `Upstream` reads the proxies once."""
    connector = aiohttp.TCPConnector(
        limit=settings.gateway_connections,
        limit_per_host=0,
        # Idle connections go before a server's usual 5 s keep-alive closes them
        # under a request that is being sent.
        keepalive_timeout=4.0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        timeout=aiohttp.ClientTimeout(
            total=None,
            connect=settings.gateway_timeout,
            sock_connect=10.0,
            sock_read=settings.gateway_timeout,
        ),
        auto_decompress=False,
        skip_auto_headers=_NOT_ADDED,
    )


Proxy = tuple[yarl.URL | None, str | None]  # the proxy, its Proxy-Authorization


class Upstream:
    """The client of the upstream calls: one aiohttp session, made on first use (it
    belongs to the running event loop). aiohttp's connector takes a connection from a
    queue of idle ones per host and gives it back the same way, so one pool's cost per
    call does not grow with its connections, and C parses the answers.

    The environment's proxy settings (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`;
    `proxies` instead, as `urllib.request.getproxies` gives them) are read once, as the
    gateway starts, and apply to every call (an egress proxy)."""

    CHOSEN = 1024  # proxy choices remembered at most (one per upstream host and scheme)

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        proxies: Mapping[str, str] | None = None,
    ) -> None:
        self._make = session
        self._session: aiohttp.ClientSession | None = None
        self.proxies = dict(urllib.request.getproxies() if proxies is None else proxies)
        self._chosen: dict[tuple[str, str], Proxy] = {}

    def proxy(self, url: yarl.URL) -> Proxy:
        """The proxy a call to `url` goes through, and the `Proxy-Authorization` its
        credentials make: (None, None) for none."""
        key = (url.scheme, url.raw_authority)
        chosen = self._chosen.get(key)
        if chosen is None:
            named = self.proxies.get(url.scheme) or self.proxies.get("all")
            if not named or _bypassed(url, self.proxies.get("no", "")):
                chosen = (None, None)
            else:
                proxy = yarl.URL(named if "://" in named else f"http://{named}")
                login = None
                if proxy.user is not None:
                    login = aiohttp.encode_basic_auth(proxy.user, proxy.password or "")
                chosen = (proxy.with_user(None), login)
            if len(self._chosen) < self.CHOSEN:
                self._chosen[key] = chosen
        return chosen

    @classmethod
    def from_settings(cls, settings: Settings) -> Upstream:
        return cls(lambda: upstream_session(settings))

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = self._make()
        return self._session

    async def send(
        self,
        method: str,
        url: yarl.URL,
        headers: list[tuple[str, str]],
        body: AsyncIterator[bytes] | None,
    ) -> aiohttp.ClientResponse:
        """The answer, its body not read yet: `release` it once read, or `close` it."""
        proxy, login = self.proxy(url)
        proxy_headers = None
        if login is not None:  # to the proxy: in its CONNECT, or in a request it forwards
            if url.scheme == "https":
                proxy_headers = {"Proxy-Authorization": login}
            else:
                headers = [*headers, ("Proxy-Authorization", login)]
        return await self.session.request(
            method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            proxy=proxy,
            proxy_headers=proxy_headers,
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def _bypassed(url: yarl.URL, no_proxy: str) -> bool:
    """Whether `NO_PROXY` exempts `url`: `*`, its host, or a domain it is in (a leading dot
    or none), each with or without a port."""
    host = (url.host or "").lower()
    for entry in no_proxy.lower().replace(" ", "").split(","):
        name, _, port = entry.partition(":") if entry.count(":") == 1 else (entry, "", "")
        if port and port != str(url.port):
            continue
        name = name.lstrip(".").strip("[]")
        if name == "*" or (name and (host == name or host.endswith("." + name))):
            return True
    return False


def tenant_from_token(authorization: str | None) -> str | None:
    """`<tid>/<appid>` (or `azp` for the app) from a bearer token's claims, unverified."""
    scheme, _, token = (authorization or "").partition(" ")
    parts = token.strip().split(".")
    if scheme.lower() != "bearer" or len(parts) != 3 or len(parts[1]) > 16384:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, binascii.Error):  # includes UnicodeDecodeError
        return None
    if not isinstance(claims, dict):
        return None
    tid, app = claims.get("tid"), claims.get("appid") or claims.get("azp")
    if isinstance(tid, str) and tid and isinstance(app, str) and app:
        return f"{tid}/{app}"
    return None


def _connection_tokens(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    named = set(HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b","))
    return named


def _end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """`headers` without the hop-by-hop ones (those `Connection` names too), Proxy-*."""
    hop = _connection_tokens(headers)
    return [
        (name, value)
        for name, value in headers
        if (low := name.lower()) not in hop and not low.startswith(b"proxy-")
    ]


class _Inbox:
    """The request body as ASGI messages, read once. `gone` looks for a disconnect the
    way Starlette does, but keeps a body message it finds for `body()`. A request that
    has waited less than `FRESH` seconds is taken to be there still: the look costs more
    than the rest of a call through the gateway, and one that comes at once would find
    nothing (a client gone by then is found when its answer is sent)."""

    FRESH = 0.05

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._held: deque[Message] = deque()
        self._gone = False
        self._since = time.monotonic()

    async def gone(self) -> bool:
        if not self._gone and time.monotonic() - self._since >= self.FRESH:
            message: Message = {}
            with anyio.CancelScope() as scope:
                scope.cancel()  # only a message that is there already
                message = await self._receive()
            if message.get("type") == "http.disconnect":
                self._gone = True
            elif message.get("type") == "http.request":
                self._held.append(message)
        return self._gone

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            message = self._held.popleft() if self._held else await self._receive()
            if message["type"] == "http.disconnect":
                self._gone = True
                raise ConnectionResetError("the client went away while sending its body")
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


@dataclass
class _Tail:
    """The last `PEEK` bytes or more of a stream, in its chunks."""

    chunks: deque[bytes] = field(default_factory=deque)
    size: int = 0

    def add(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        while self.size - len(self.chunks[0]) >= PEEK:
            self.size -= len(self.chunks.popleft())

    def execution_time(self) -> float | None:
        """`Stats.ExecutionTime` from the end of a hunting answer, where `Stats` is."""
        text = b"".join(self.chunks)
        at = max(text.rfind(b'"Stats"'), text.rfind(b'"stats"'))
        if at < 0:
            return None
        colon = text.find(b":", at + 7)
        try:
            stats, _ = json.JSONDecoder().raw_decode(text[colon + 1 :].decode().lstrip())
        except ValueError:  # includes UnicodeDecodeError
            return None
        return execution_time({"Stats": stats})


class Gateway:
    """Forwards gateway requests; one per app, holding the upstream clients."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        waiting: Waiting,
        authorizer: Authorizer,
        upstream: Upstream,
        routes: RouteTable | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.waiting = waiting
        self.authorizer = authorizer
        self.upstream = upstream
        self.routes = routes if routes is not None else RouteTable()
        self.upstreams = dict(settings.gateway_upstreams)
        route_hosts = {host for route in self.routes for host in route.hosts}
        self.hosts = frozenset(
            {*DEFENDER_HOSTS, *GRAPH_HOSTS, *route_hosts, *settings.gateway_hosts, *self.upstreams}
        )
        # Where each host's requests must land: checked on the built request too.
        self._authorities = {
            host: (yarl.URL(base).host, yarl.URL(base).explicit_port)
            for host, base in self.upstreams.items()
        }
        self._warned: set[tuple[str, str]] = set()
        self.releases = ReleaseSender(engine, waiting)
        self.blocks = Blocks(
            engine, waiting, self.releases, hold=HOLD if settings.gateway_blocks else 0.0
        )
        self.background: set[asyncio.Task[None]] = set()  # throttled parts of blocks

    async def aclose(self) -> None:
        """Close the blocks, send the releases queued, then close the upstream client."""
        self.blocks.close()
        if self.background:
            await asyncio.wait(self.background, timeout=DRAIN_TIMEOUT)
        await self.releases.aclose()
        await self.upstream.aclose()

    # -- the request --------------------------------------------------------------------

    def target(self, raw_path: bytes, query: bytes) -> Target:
        """Where a gateway path goes; HostRefused or PathRefused before any connection."""
        text = raw_path.decode("latin-1")
        if not text.startswith(PREFIX):
            raise PathRefused(f"gateway paths are {PREFIX}{{host}}/{{path}}")
        named, slash, rest = text[len(PREFIX) :].partition("/")
        host = named.lower()
        if not _HOST.fullmatch(host) or host not in self.hosts:
            raise HostRefused(
                f"the gateway forwards only to the route table's hosts and those settings add"
                f" (gateway_hosts), named exactly: not {named[:100]!r}"
            )
        path = unquote(slash + rest) or "/"
        escaped = re.search(r"%(2f|5c)", rest, re.IGNORECASE)
        if escaped or "\\" in path or any(seg in (".", "..") for seg in path.split("/")):
            raise PathRefused("escaped slashes and dot segments are refused in gateway paths")
        if not _SENDABLE.fullmatch(text + query.decode("latin-1")):
            raise PathRefused("a gateway path and query are printable ASCII, sent as given")
        base = self.upstreams.get(host, f"https://{host}")
        url = base + (slash + rest or "/") + ("?" + query.decode("latin-1") if query else "")
        return Target(host, path, url)

    def principal(self, request: Request) -> Principal:
        """Who is asking, from quotagate's own token (`Authorization` is the upstream's)."""
        if not self.authorizer.enabled:
            return OPEN
        token = request.headers.get("x-quotagate-token")
        if not token:
            raise Unauthorized("send quotagate's token in X-Quotagate-Token")
        return self.authorizer.principal(f"Bearer {token}")

    @staticmethod
    def tenant(request: Request) -> str:
        named = request.headers.get("x-quotagate-tenant")
        tenant = named or tenant_from_token(request.headers.get("authorization"))
        if not tenant:
            raise TenantMissing(
                "name the tenant in X-Quotagate-Tenant, or send a bearer token whose claims"
                " hold tid and appid (or azp)"
            )
        return tenant

    def wait(self, request: Request) -> float:
        asked = request.headers.get("x-quotagate-wait")
        if asked is None:
            return min(self.settings.gateway_wait, self.settings.max_wait)
        try:
            seconds = float(asked)
        except ValueError:
            seconds = -1.0
        if not math.isfinite(seconds) or seconds < 0:
            raise InvalidRequest("X-Quotagate-Wait", "seconds to wait, a number >= 0")
        return min(seconds, self.settings.max_wait)

    def unrouted(self, method: str, target: Target) -> None:
        if self.settings.gateway_unrouted == "refuse":
            raise Unrouted(f"no route of the gateway matches {method} {target.path}")
        template = endpoint_template(method, target.path)
        if (target.host, template) not in self._warned and len(self._warned) < WARNED:
            self._warned.add((target.host, template))
            log.warning("gateway: %s %s has no route: passed uncoordinated", target.host, template)

    async def forward(self, request: Request) -> Response:
        scope = request.scope
        target = self.target(scope.get("raw_path") or scope["path"].encode(), scope["query_string"])
        who = self.principal(request)
        method = request.method
        found = self.routes.match(method, target.host, target.path)
        inbox = _Inbox(request.receive)
        if found is None:
            self.unrouted(method, target)
            marks = {b"x-quotagate": b"uncoordinated"}
            return await self._send(request, target, inbox, None, marks)
        tenant = self.tenant(request)
        who.check(tenant)
        priority = request.headers.get("x-quotagate-priority")
        ask = Ask(
            tenant=tenant,
            api=found.api,
            key=found.key,
            wait=self.wait(request),
            priority=priority or None,  # a class name, checked by the engine
            holder="gateway",
        )
        asked = time.monotonic()
        block = self.blocks.take(ask)
        if block is not None:
            call = _Call(self, block.grant, block)
        else:
            granted, block = await self.blocks.acquire(ask, inbox.gone)
            result = granted or await self.waiting.acquire(ask, inbox.gone)
            if result is None:
                return error_reply(499, "client_closed", "the client disconnected while waiting")
            if isinstance(result, Denial):
                return exhausted_reply(result, target.host, found)
            call = _Call(self, result, block)
        waited = f"{time.monotonic() - asked:.3f}".encode()
        marks = {b"x-quotagate": b"coordinated", b"x-quotagate-waited": waited}
        return await self._send(request, target, inbox, call, marks)

    async def _send(
        self,
        request: Request,
        target: Target,
        inbox: _Inbox,
        call: _Call | None,
        marks: dict[bytes, bytes],
    ) -> Response:
        raw = request.headers.raw
        headers = [
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in _end_to_end(raw)
            if name not in _NOT_FORWARDED and not name.startswith(_OURS)
        ]
        sized = request.headers.get("content-length")
        if sized is not None and sized.isdigit():
            headers.append(("Content-Length", sized))
        has_body = (sized is not None and sized != "0") or "transfer-encoding" in request.headers
        try:
            # As given: `encoded` keeps yarl from quoting the path and query again.
            url = yarl.URL(target.url, encoded=True)
        except ValueError as exc:
            if call is not None:
                await call.release_now("not_called")
            raise PathRefused(f"not a URL the gateway can send: {exc}") from exc
        landing = self._authorities.get(target.host, (target.host, None))
        if (url.host, url.explicit_port) != landing:  # never another host
            if call is not None:
                await call.release_now("not_called")
            raise PathRefused("the path would leave the host it names")
        body = inbox.body() if has_body else None
        try:
            upstream = await self.upstream.send(request.method, url, headers, body)
        except NOT_SENT as exc:
            if call is not None:
                await call.release_now("not_called")
            return error_reply(502, "upstream_unreachable", f"{target.host}: {type(exc).__name__}")
        except (aiohttp.ClientError, OSError) as exc:  # OSError: TimeoutError too
            if call is not None:
                await call.release_now("failed")
            status, code = (
                (504, "upstream_timeout")
                if isinstance(exc, TimeoutError)
                else (502, "upstream_failed")
            )
            return error_reply(status, code, f"{target.host}: {type(exc).__name__}")
        out = _end_to_end(list(upstream.raw_headers))
        out.extend(marks.items())
        if call is not None:
            out.append((b"x-quotagate-api", call.grant.api.encode()))
        return await _Relay.start(call, upstream, out)


class _Call:
    """One leased call, from its grant to its release: a lease of its own, or a unit of
    a block (`blocks.py`), whose release goes to the block."""

    def __init__(self, gateway: Gateway, grant: Grant, block: Block | None = None) -> None:
        self.gateway = gateway
        self.grant = grant
        self.block = block
        self.started = time.monotonic()
        self.lease = Lease(
            grant.lease_id,
            grant.tenant,
            grant.api,
            grant.key,
            grant.cost,
            grant.expires_in_ms / 1000,
            0.0,
        )
        policy = gateway.engine.policy(grant.tenant, grant.api)
        self.timed = any(limit.kind is Kind.RUNTIME for limit in policy.limits)
        # A timer, not a task, until a call lives long enough to need its lease renewed
        # (a block renews its own).
        self._renewal: asyncio.TimerHandle | asyncio.Task[None] | None = None
        if block is None:
            ttl = grant.expires_in_ms / 1000
            loop = asyncio.get_running_loop()
            self._renewal = loop.call_later(ttl / 2, self._start_renewal, ttl)

    @property
    def runtime(self) -> float:
        return time.monotonic() - self.started

    def _start_renewal(self, ttl: float) -> None:
        """Half the time to live has gone: renew now, then every half of it."""
        self._renewal = asyncio.create_task(
            keep_alive(self.gateway.engine, self.grant.lease_id, self.grant.api, ttl, now=True)
        )

    def report(
        self,
        status: int,
        upstream: aiohttp.ClientResponse,
        body: bytes | None,
        runtime: float | None,
    ) -> None:
        """The outcome of the answer (`body`: all of it, or None when not held), as the
        client reads one (`Lease.report`; without a body, what its status line and
        headers say, as the client's transport does for a body that broke off).
        `runtime`: what the answer's own `Stats.ExecutionTime` said, if it was read."""
        reported = runtime is not None
        runtime = runtime if runtime is not None else self.runtime
        if body is None and status != 429:  # only a 429 says a throttle without a body
            self.lease.set_outcome(
                outcome_for_status(status), status, runtime=runtime, runtime_upstream=reported
            )
            return
        headers = _headers(upstream)
        if body is None:
            throttle = parse_throttle(status, headers, b"")
            if throttle is None:
                outcome = outcome_for_status(status)
                self.lease.set_outcome(outcome, status, runtime=runtime, runtime_upstream=reported)
            else:
                self.lease.set_outcome(
                    "throttled", status, throttle.retry_after, runtime, runtime_upstream=reported
                )
            return
        peek = httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))
        with contextlib.suppress(httpx.DecodingError):
            peek.read()  # decodes gzip etc.; left unread, `report` skips the body
        self.lease.report(peek, runtime=runtime)

    def finish(self, outcome: Said | None = None) -> Release:
        """The release of this call, its renewal stopped (`outcome` overrides the one
        reported)."""
        if outcome is not None:
            self.lease.set_outcome(outcome, runtime=self.runtime)
        if self._renewal is not None:
            self._renewal.cancel()
        body = self.lease.release_body()
        retry_after = body.get("retry_after")
        runtime = body.get("runtime")
        named = body.get("limit")  # what a throttled answer said its limit is
        if body["outcome"] == Outcome.THROTTLED:
            log.warning(
                "gateway: upstream throttled tenant=%s api=%s status=%s retry_after=%s",
                self.grant.tenant,
                self.grant.api,
                body.get("status_code"),
                retry_after,
            )
        return Release(
            self.grant.lease_id,
            body["outcome"],
            retry_after_ms=None if retry_after is None else math.ceil(retry_after * 1000),
            runtime_ms=None if runtime is None else math.ceil(runtime * 1000),
            named=None
            if named is None
            else (int(named["amount"]), math.ceil(named["window"] * 1000)),
            runtime_upstream=body.get("runtime_upstream", False),
        )

    async def release_now(self, outcome: Said | None = None) -> None:
        """Release before going on: after a 429 (the fleet pauses before the tool hears
        of it) and for a call that never reached the upstream."""
        release = self.finish(outcome)
        if self.block is not None:
            if release.outcome == Outcome.THROTTLED:
                await self.block.end_throttled(release)
            else:
                self.block.end(release.outcome)
            return
        try:
            released = await self.gateway.engine.release(
                release.lease_id,
                release.outcome,
                retry_after_ms=release.retry_after_ms,
                runtime_ms=release.runtime_ms,
                named=release.named,
                runtime_upstream=release.runtime_upstream,
            )
        except (UnknownLease, BackendUnavailable) as exc:
            log.warning("gateway: releasing a lease of %s failed: %s", self.grant.api, exc)
            return
        if released.woke:
            self.gateway.waiting.released(self.grant.tenant, self.grant.api)

    def release_later(self) -> None:
        """Release off the critical path, with the releases of other calls that end
        meanwhile (`ReleaseSender`); `Gateway.aclose` drains them. A block's unit goes
        back to its block (a throttle, told only by the headers of an answer too long to
        hold, is released at once all the same)."""
        if self.block is not None and self.lease.outcome != "throttled":
            self.block.end(self.lease.outcome or "ok")  # the outcome is all a block needs
            return
        release = self.finish()
        if self.block is None:
            self.gateway.releases.send(release, self.grant.tenant, self.grant.api)
        else:
            task = asyncio.create_task(self.block.end_throttled(release))
            self.gateway.background.add(task)
            task.add_done_callback(self.gateway.background.discard)


class _Relay(Response):
    """The upstream's answer, streamed to the tool; the lease is released at its end."""

    def __init__(
        self,
        call: _Call | None,
        upstream: aiohttp.ClientResponse,
        headers: list[tuple[bytes, bytes]],
        head: list[bytes],
        chunks: AsyncIterator[bytes] | None,
    ) -> None:
        super().__init__(status_code=upstream.status)
        self.raw_headers = headers
        self.call = call
        self.upstream = upstream
        self.head = head
        self.chunks = chunks

    @classmethod
    async def start(
        cls,
        call: _Call | None,
        upstream: aiohttp.ClientResponse,
        headers: list[tuple[bytes, bytes]],
    ) -> Response:
        """Read as much of the answer as its outcome needs: all of a small error body."""
        chunks = upstream.content.iter_any()  # as it came: not decoded
        status = upstream.status
        length = upstream.headers.get("content-length")
        small = length is None or (length.isdigit() and int(length) <= PEEK)
        if call is None or status < 400 or not small:
            return cls(call, upstream, headers, [], chunks)
        head: list[bytes] = []
        held = 0
        try:
            async for chunk in chunks:
                head.append(chunk)
                held += len(chunk)
                if held > PEEK:
                    return cls(call, upstream, headers, head, chunks)
        except (aiohttp.ClientError, OSError):
            upstream.close()
            call.report(status, upstream, None, None)
            if call.lease.outcome != "throttled":
                call.lease.set_outcome("failed", status, runtime=call.runtime)
            await call.release_now()
            return error_reply(502, "upstream_failed", "the upstream's answer broke off")
        upstream.release()
        body = b"".join(head)
        call.report(status, upstream, body, None)
        if call.lease.outcome == "throttled":
            await call.release_now()  # the fleet pauses before the tool hears of it
        else:
            call.release_later()
        return cls(None, upstream, headers, head, None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call, done = self.call, False
        tail = _Tail() if call is not None and call.timed else None
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            for chunk in self.head:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if tail is not None:
                    tail.add(chunk)
            if self.chunks is not None:
                async for chunk in self.chunks:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if tail is not None:
                        tail.add(chunk)
            # The upstream's connection goes back to the pool before the tool's last
            # byte, so the tool's next request finds it idle rather than opening another.
            self.upstream.release()
            done = True
            self._end(tail)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            if not done:
                if call is not None:
                    call.lease.set_outcome("failed", self.upstream.status, runtime=call.runtime)
                    call.release_later()
                self.upstream.close()  # the rest of the answer is not read: not reused

    def _end(self, tail: _Tail | None) -> None:
        """The whole answer was read: its outcome goes to the release sender."""
        if self.call is not None:
            runtime = tail.execution_time() if tail is not None else None
            self.call.report(self.upstream.status, self.upstream, None, runtime)
            self.call.release_later()


def _headers(upstream: aiohttp.ClientResponse) -> httpx.Headers:
    """The answer's headers as the client's outcome parsing reads them."""
    return httpx.Headers(list(upstream.raw_headers))


def exhausted_reply(denial: Denial, host: str, found: RouteMatch) -> Response:
    """No lease within the wait: a 429 as the upstream writes it (`defender.md`,
    "Throttled answers"), so the tool's own handling of throttles applies."""
    retry = max(math.ceil(denial.retry_after_ms / 1000), 1)
    if denial.limit is None:
        why = "the fleet is pausing after an upstream 429"
    elif denial.limit.kind is Kind.CONCURRENT:
        why = f"{denial.limit.amount} calls are in flight"
    else:
        shown = denial.limit.describe()
        why = f"its {shown['kind']} limit {shown['amount']:g} per {shown['window']:g} s is spent"
    message = (
        f"quotagate: {found.api} for this tenant: {why}. "
        f"You can send requests again in {retry} seconds."
    )
    request_id = str(uuid.uuid4())
    body: dict[str, Any]
    if host in GRAPH_HOSTS:
        inner = {"code": "429", "date": datetime.now(UTC).isoformat(), "request-id": request_id}
        body = {"error": {"code": "TooManyRequests", "message": message, "innerError": inner}}
    else:
        body = {"error": {"code": "429", "message": message, "target": request_id}}
    headers = {"Retry-After": str(retry), "X-Quotagate": "exhausted", "X-Quotagate-Api": found.api}
    return Response(json.dumps(body), 429, headers=headers, media_type="application/json")


__all__ = [
    "PEEK",
    "Gateway",
    "Target",
    "Upstream",
    "exhausted_reply",
    "tenant_from_token",
    "upstream_session",
]
