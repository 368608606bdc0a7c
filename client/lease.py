"""A lease: permission for one upstream call, and the outcome to report when it ends.

The identity of a lease is frozen; only its outcome record changes while the caller
makes the call. When a lease ends, the record becomes the body of the release:

- an outcome set explicitly (`set_outcome`, `report`) is sent as is;
- otherwise a block that ended normally sends `ok`;
- a block that raised sends `failed` once the call may have happened (`mark_called`),
  and `not_called` before that, which refunds the charge.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import httpx

from .parsing import execution_time, parse_throttle

Outcome = Literal["ok", "failed", "throttled", "not_called"]
OUTCOMES: frozenset[str] = frozenset(get_args(Outcome))
# What a throttle's error code needs in a body (`429`, `TooManyRequests`): a body without
# either cannot make an answer throttled, so it is not parsed (answers can be large).
_MAYBE_THROTTLED = re.compile(rb"429|toomanyrequests", re.IGNORECASE)


@dataclass(slots=True)
class _Record:
    outcome: Outcome | None = None
    called: bool = False
    status_code: int | None = None
    retry_after: float | None = None
    runtime: float | None = None
    runtime_upstream: bool = False  # runtime is the upstream's own (Stats.ExecutionTime)
    limit: tuple[int, float] | None = None  # (calls, window seconds) a throttle named


def outcome_for_status(status_code: int) -> Outcome:
    """The outcome of an answer that is not throttled: below 400 `ok`, else `failed`."""
    return "ok" if status_code < 400 else "failed"


@dataclass(frozen=True, slots=True)
class Lease:
    lease_id: str
    tenant: str
    api: str
    key: str
    cost: int  # call units charged
    expires_in: float  # seconds the lease lived when granted
    waited: float  # seconds the coordinator held the request before granting
    local: bool = False  # granted by the local limiter while the coordinator was down
    _record: _Record = field(default_factory=_Record, init=False, repr=False, compare=False)

    @property
    def outcome(self) -> Outcome | None:
        """The outcome set so far, or None."""
        return self._record.outcome

    @property
    def called(self) -> bool:
        """Whether the upstream call may have happened."""
        return self._record.called

    def mark_called(self) -> None:
        """The call is under way: from now on an exception releases as `failed`."""
        self._record.called = True

    def set_outcome(
        self,
        outcome: Outcome,
        status_code: int | None = None,
        retry_after: float | None = None,
        runtime: float | None = None,
        *,
        limit: tuple[int, float] | None = None,
        runtime_upstream: bool = False,
    ) -> None:
        """Record how the call went; `retry_after` and `runtime` are seconds, `limit` the
        (calls, window seconds) a throttled answer named; `runtime_upstream`: `runtime` is
        the upstream's own processing time (a hunting answer's `Stats.ExecutionTime`), not
        a time measured here."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
        record = self._record
        record.outcome, record.called = outcome, outcome != "not_called"
        record.status_code, record.retry_after, record.runtime = status_code, retry_after, runtime
        record.limit, record.runtime_upstream = limit, runtime_upstream and runtime is not None

    def report(self, response: httpx.Response, *, runtime: float | None = None) -> Outcome:
        """Record the outcome an upstream answer shows, and return it.

        A throttled answer gives `throttled` with its retry time and the limit it names;
        `Stats.ExecutionTime` of a read hunting answer is the run time (sent as the
        upstream's own, `runtime_upstream`), else `runtime` (e.g. measured).
        """
        try:
            content = response.content
        except httpx.ResponseNotRead:
            content = b""
        return self.record_answer(response.status_code, response.headers, content, runtime)

    def record_answer(
        self,
        status_code: int,
        headers: Mapping[str, str],
        content: bytes,
        runtime: float | None = None,
    ) -> Outcome:
        """`report` of an answer given as its parts (any HTTP library's)."""
        throttled = status_code == 429 or _MAYBE_THROTTLED.search(content)
        throttle = parse_throttle(status_code, headers, content if throttled else b"")
        reported = execution_time(content) if content else None
        upstream = reported is not None  # the answer's own run time, not a measured one
        runtime = reported if upstream else runtime
        if throttle is None:
            outcome = outcome_for_status(status_code)
            self.set_outcome(outcome, status_code, runtime=runtime, runtime_upstream=upstream)
            return outcome
        limit = None
        # What the coordinator accepts: at least one call in a window that has a length.
        if throttle.calls and throttle.window and throttle.calls >= 1 and throttle.window > 0:
            limit = (throttle.calls, throttle.window)
        self.set_outcome(
            "throttled",
            status_code,
            throttle.retry_after,
            runtime,
            limit=limit,
            runtime_upstream=upstream,
        )
        return "throttled"

    def release_body(self, raised: bool = False) -> dict[str, Any]:
        """The JSON body of the release, for a block that `raised` or ended normally."""
        record = self._record
        outcome = record.outcome
        if outcome is None:
            outcome = ("failed" if record.called else "not_called") if raised else "ok"
        body: dict[str, Any] = {"outcome": outcome}
        for name in ("status_code", "retry_after", "runtime"):
            value = getattr(record, name)
            if value is not None:
                body[name] = value
        if record.runtime_upstream:  # set only with a run time (set_outcome)
            # The upstream's own processing time: the call reached it at least that long
            # before the answer, which lets the coordinator charge its calls that early.
            body["runtime_upstream"] = True
        if record.limit is not None:
            body["limit"] = {"amount": record.limit[0], "window": record.limit[1]}
        return body
