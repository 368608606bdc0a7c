"""What an upstream answer says about quota: 429 retry times and limits, hunting run time.

Microsoft's throttled answers come in several shapes (`coordinator/defender.md`, "Throttled
answers"; the Stats of hunting answers under "Advanced hunting answers"): a `Retry-After`
header in float seconds or as an HTTP date, or only a sentence in the body ("... send
requests again in 8 seconds", "run queries again in 00:00:37"). The functions here are
pure; the ones that depend on the clock take `now`.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any

import httpx

from .policy_core import parse_duration_seconds

#: Error codes that mean "throttled" even when the status is not 429 (compared case-blind).
THROTTLE_CODES = frozenset({"429", "toomanyrequests"})

# Spellings of the policy grammar's units (see `policy_core`) in Microsoft's sentences.
_UNIT_SYMBOLS = {
    "ms": "ms",
    "millisecond": "ms",
    "s": "s",
    "sec": "s",
    "second": "s",
    "m": "m",
    "min": "m",
    "minute": "m",
    "h": "h",
    "hr": "h",
    "hour": "h",
    "d": "d",
    "day": "d",
}
_NUMBER = r"\d+(?:\.\d+)?"
# .NET TimeSpan text: [d.]hh:mm:ss[.fffffff]
_CLOCK = r"(?:\d+\.)?\d{1,2}:\d{2}:\d{2}(?:\.\d+)?"
_TERM = (
    rf"{_NUMBER}\s*(?:milliseconds?|ms|seconds?|secs?|s|minutes?|mins?|m|hours?|hrs?|h|days?|d)\b"
)
_DURATION = rf"(?:{_CLOCK}|{_TERM}(?:\s*(?:,|and)?\s*{_TERM})*|{_NUMBER})"
_CLOCK_RE = re.compile(r"(?:(\d+)\.)?(\d{1,2}):(\d{2}):(\d{2}(?:\.\d+)?)")
_TERM_RE = re.compile(rf"({_NUMBER})\s*([a-z]+)", re.IGNORECASE)
_RETRY_RE = re.compile(rf"(?:again in|retry after|try again after)\s+({_DURATION})", re.I)
_LIMIT_RE = re.compile(rf"maximum allowed\s+(\d+)\s+(?:calls\s+)?per\s+({_DURATION})", re.I)


@dataclass(frozen=True, slots=True)
class Throttle:
    """A throttled answer, read as far as it can be."""

    retry_after: float | None  # seconds until the upstream takes calls again
    calls: int | None  # the limit that was hit: `calls` per `window` ...
    window: float | None  # ... seconds, from "maximum allowed N per hh:mm:ss"
    code: str | None  # the error code, e.g. "429" or "TooManyRequests"
    message: str | None  # the error message, as sent


def parse_duration(text: str) -> float | None:
    """Seconds in `00:00:37`, `1.00:00:00`, `37 seconds`, `1 minute 30 seconds`, `1m`, `37`.

    Each spelling is read as terms of the policy grammar (`policy_core`), so the units and
    their sizes are defined once; None for anything else, or a term longer than a year.
    """
    text = text.strip()
    clock = _CLOCK_RE.fullmatch(text)
    if clock is not None:
        days, hours, minutes, seconds = clock.groups()
        terms = [f"{days or 0}d", f"{hours}h", f"{minutes}m", f"{seconds}s"]
    elif re.fullmatch(_NUMBER, text):
        terms = [text]
    elif re.fullmatch(_DURATION, text, re.IGNORECASE):
        terms = []
        for number, unit in _TERM_RE.findall(text):
            unit = unit.lower()
            symbol = _UNIT_SYMBOLS.get(unit) or _UNIT_SYMBOLS.get(unit.rstrip("s"))
            if symbol is None:
                return None
            terms.append(number + symbol)
    else:
        return None
    try:
        return sum(parse_duration_seconds(term) for term in terms)
    except ValueError:
        return None


def parse_retry_after(value: str, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` value: float seconds (`2.128`) or an HTTP date."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000" means UTC with no zone said
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def parse_limit(message: str) -> tuple[int, float] | None:
    """(calls, window seconds) from "maximum allowed 45 per 00:01:00"."""
    match = _LIMIT_RE.search(message)
    if match is None:
        return None
    window = parse_duration(match.group(2))
    return None if window is None else (int(match.group(1)), window)


def retry_after_from_text(text: str) -> float | None:
    """Seconds from "again in 8 seconds" / "run queries again in 00:00:37"."""
    match = _RETRY_RE.search(text)
    return None if match is None else parse_duration(match.group(1).rstrip(". "))


def _error_fields(body: object) -> tuple[str | None, str | None, str | None]:
    """(code, inner code, message) from `{"error": {"code", "message", "innerError"}}`."""
    if not isinstance(body, Mapping):
        return None, None, None
    error = body.get("error", body)
    if isinstance(error, str):
        message = body.get("message") or body.get("detail")
        return error, None, message if isinstance(message, str) else None
    if not isinstance(error, Mapping):
        return None, None, None
    code, message = error.get("code"), error.get("message") or error.get("Message")
    inner = error.get("innerError") or error.get("innererror")
    inner_code = inner.get("code") if isinstance(inner, Mapping) else None
    return (
        str(code) if code is not None else None,
        str(inner_code) if inner_code is not None else None,
        message if isinstance(message, str) else None,
    )


def parse_throttle(
    status_code: int,
    headers: Mapping[str, str] | httpx.Headers,
    body: bytes | str,
    now: float | None = None,
) -> Throttle | None:
    """The throttle an answer reports, or None when it is not a throttled answer.

    An answer is throttled when its status is 429 or its error code (outer or inner) is
    `429`/`TooManyRequests`. `Retry-After` wins over the body, as Microsoft asks.
    """
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    code, inner_code, message = _error_fields(_json(text))
    codes = {c.lower() for c in (code, inner_code) if c is not None}
    if status_code != 429 and not codes & THROTTLE_CODES:
        return None
    searched = message if message is not None else text
    header = headers.get("Retry-After")
    retry_after = parse_retry_after(header, now) if header else None
    if retry_after is None:
        retry_after = retry_after_from_text(searched)
    limit = parse_limit(searched)
    return Throttle(
        retry_after=retry_after,
        calls=limit[0] if limit else None,
        window=limit[1] if limit else None,
        code=code if code is not None else inner_code,
        message=message,
    )


def throttle_from_response(response: httpx.Response, now: float | None = None) -> Throttle | None:
    """`parse_throttle` of a response; its body is used only if it was read already."""
    try:
        body = response.content
    except httpx.ResponseNotRead:
        body = b""
    return parse_throttle(response.status_code, response.headers, body, now)


def _json(text: bytes | str) -> object:
    try:
        return json.loads(text)
    except ValueError:  # includes UnicodeDecodeError
        return None


def _seconds(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if math.isfinite(value) and value >= 0 else None
    return parse_duration(value) if isinstance(value, str) else None


def execution_time(body: bytes | str | Mapping[str, Any]) -> float | None:
    """Seconds in an advanced hunting answer's `Stats.ExecutionTime`, or None without one."""
    data: object = body
    # A cheap test first: hunting answers can be large and most answers have no Stats.
    if isinstance(body, bytes):
        if b"tats" not in body:
            return None
        data = _json(body)
    elif isinstance(body, str):
        if "tats" not in body:
            return None
        data = _json(body)
    if not isinstance(data, Mapping):
        return None
    stats = data.get("Stats", data.get("stats"))
    if not isinstance(stats, Mapping):
        return None
    return _seconds(stats.get("ExecutionTime", stats.get("executionTime")))
