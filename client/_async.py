"""`AsyncQuotaClient`: the asyncio twin of `QuotaClient` (same methods, awaited)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import httpx

from ._base import LEASES, LOCAL_POLL, BaseQuotaClient, Call, OnUnavailable, reply, translate_error
from ._releases import QUEUE_SIZE, AsyncReleaseSender, log_unsent
from ._renewal import AsyncRenewal
from .exceptions import CoordinatorUnavailable, QuotaError, QuotaExhausted
from .lease import Lease, Outcome

logger = logging.getLogger("quotagate.client")


class AsyncQuotaClient(BaseQuotaClient):
    """Leases for `tenant` from the coordinator at `url`; see `QuotaClient`. Background
    releases go out from a task on the event loop; `aclose()` drains them."""

    def __init__(
        self,
        url: str,
        tenant: str,
        token: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        timeout: float = 5.0,
        on_unavailable: OnUnavailable = "fail",
        policies: Mapping[str, Any] | None = None,
        probe_interval: float = 1.0,
        release_queue: int = QUEUE_SIZE,
    ) -> None:
        super().__init__(
            url,
            tenant,
            token,
            timeout=timeout,
            on_unavailable=on_unavailable,
            policies=policies,
            probe_interval=probe_interval,
            release_queue=release_queue,
        )
        self._http = httpx.AsyncClient(
            base_url=url,
            headers=self.headers,
            transport=transport,
            timeout=timeout,
            limits=self.limits(),
        )
        # Merged once: the acquire is on the caller's path, and httpx would merge it again
        # with the base URL on every request.
        self._lease_url = self._http.build_request("POST", LEASES).url
        self._releases = AsyncReleaseSender(self._post_release, release_queue)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Send the releases still queued, close the connections."""
        await self._releases.aclose()
        await self._http.aclose()

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until no release handed to the background is left unsent (each was sent,
        or given up and logged); False when `timeout` seconds passed first."""
        return await self._releases.flush(timeout)

    async def _send(self, call: Call) -> dict[str, Any]:
        try:
            response = await self._http.request(
                call.method,
                self._lease_url if call.path == LEASES else call.path,
                json=call.json,
                params=call.params,
                timeout=self.timeout_for(call),
            )
        except httpx.HTTPError as exc:
            raise translate_error(self.url, exc) from exc
        return reply(response)

    # -- leases -----------------------------------------------------------------------

    @asynccontextmanager
    async def lease(
        self,
        api: str,
        key: str | None = None,
        cost: int = 1,
        wait: float = 0.0,
        runtime_estimate: float | None = None,
        *,
        priority: str | None = None,
    ) -> AsyncIterator[Lease]:
        """Hold a lease for the block; renew it while the block runs; release it after,
        in the background."""
        lease = await self.acquire(api, key, cost, wait, runtime_estimate, priority=priority)
        renewal = AsyncRenewal(lease, self.renew)
        raised = False
        try:
            yield lease
        except BaseException:
            raised = True
            raise
        finally:
            await renewal.stop()
            await self._release_later(lease, lease.release_body(raised))

    async def acquire(
        self,
        api: str,
        key: str | None = None,
        cost: int = 1,
        wait: float = 0.0,
        runtime_estimate: float | None = None,
        *,
        priority: str | None = None,
    ) -> Lease:
        """A lease, waiting up to `wait` seconds (server-side) for one; `priority` names a
        class of the api's policy (the local limiter, during an outage, ignores it)."""
        key = key or ""
        start = time.monotonic()
        cause: CoordinatorUnavailable | None = None
        if self.coordinator_due(start):
            try:
                data = await self._send(
                    self.lease_call(api, key, cost, wait, runtime_estimate, priority)
                )
            except CoordinatorUnavailable as exc:
                if self.on_unavailable == "fail":
                    raise
                self.went_down(time.monotonic(), exc)
                cause = exc
            else:
                self.came_back()
                if self.wants_policies:
                    await self._cache_policies()
                return self.lease_from(data, api, key, cost)
        return await self._acquire_local(api, key, cost, wait, runtime_estimate, start, cause)

    async def _acquire_local(
        self,
        api: str,
        key: str,
        cost: int,
        wait: float,
        runtime_estimate: float | None,
        start: float,
        cause: CoordinatorUnavailable | None,
    ) -> Lease:
        while True:
            now = time.monotonic()
            try:
                return self.local_lease(api, key, cost, runtime_estimate, now, now - start, cause)
            except QuotaExhausted as denial:
                if denial.retry_after > start + wait - now:
                    raise
                await asyncio.sleep(min(denial.retry_after, LOCAL_POLL))

    async def _cache_policies(self) -> None:
        try:
            self.cache_policies(await self._send(self.policies_call(None)))
        except QuotaError as exc:
            logger.info("policies not cached for the local fallback: %s", exc)

    async def release(
        self,
        lease: Lease | str,
        outcome: Outcome | None = None,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
        runtime: float | None = None,
    ) -> None:
        """End a lease with its outcome (default: what the lease recorded, else `ok`)."""
        body = self.release_body(lease, outcome, status_code, retry_after, runtime)
        await self._release(lease, body)

    async def _release_later(self, lease: Lease, body: dict[str, Any]) -> None:
        """Hand the release to the background; send it now when the queue is full or the
        lease is local. Never raises: the block's own result matters more."""
        if not lease.local and self._releases.put(lease.lease_id, body):
            return
        try:
            await self._release(lease, body)
        except Exception as exc:  # e.g. the client was closed meanwhile
            log_unsent(lease.lease_id, exc)

    async def _post_release(self, lease_id: str, body: dict[str, Any]) -> None:
        await self._send(self.release_call(lease_id, body))

    async def _release(self, lease: Lease | str, body: dict[str, Any]) -> None:
        if isinstance(lease, Lease) and lease.local:
            return self.release_locally(lease, body)
        lease_id = lease.lease_id if isinstance(lease, Lease) else lease
        await self._send(self.release_call(lease_id, body))

    async def renew(self, lease: Lease | str, ttl: float | None = None) -> float:
        """Extend a live lease; returns its new time to live in seconds."""
        if isinstance(lease, Lease) and lease.local:
            return self.renew_locally(lease)
        lease_id = lease.lease_id if isinstance(lease, Lease) else lease
        return self.expires_in_from(await self._send(self.renew_call(lease_id, ttl)))

    # -- reading ----------------------------------------------------------------------

    async def usage(self, api: str, key: str | None = None) -> dict[str, Any]:
        """Per limit used/remaining/resets_in, in flight and cooldown of `api` (and `key`)."""
        return await self._send(self.usage_call(api, key))

    async def policies(self, api: str | None = None) -> dict[str, Any]:
        """The effective policies (of one `api`); also kept for the local fallback."""
        data = await self._send(self.policies_call(api))
        self.cache_policies(data, complete=api is None)
        return data
