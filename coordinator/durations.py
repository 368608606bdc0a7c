"""Durations as written in policy files: `500ms`, `1.5s`, `1m`, `4h`, `1d` or plain seconds."""

from __future__ import annotations

import math
import re
from fractions import Fraction

_UNITS_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}
MAX_MS = 366 * 86_400_000  # a year: far past any upstream window, far below 2**53
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")


def parse_duration_ms(value: object) -> int:
    """Milliseconds in `value`; a bare number is seconds. Fractions of a millisecond round up."""
    ms = _parse(value)
    if ms > MAX_MS:
        raise ValueError(f"bad duration {value!r}: longer than a year ({MAX_MS} ms)")
    return ms


def _parse(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"bad duration {value!r}: use ms, s, m, h, d or plain seconds")
    if isinstance(value, int | float):
        # Exact decimal arithmetic: `2.007 * 1000` is 2007.0000000000002 in floats.
        if (isinstance(value, float) and not math.isfinite(value)) or value < 0:
            raise ValueError(f"bad duration {value!r}: must be a finite number of seconds >= 0")
        return math.ceil(Fraction(repr(value)) * 1000)
    if isinstance(value, str):
        match = _PATTERN.match(value)
        if match:
            number, unit = match.groups()
            return math.ceil(Fraction(number) * _UNITS_MS[unit or "s"])
    raise ValueError(
        f"bad duration {value!r}: use ms, s, m, h, d or plain seconds (e.g. 1m, 500ms)"
    )


def format_duration(ms: int) -> str:
    """The shortest exact spelling of `ms` in the units above (`60000` -> `1m`)."""
    for unit in ("d", "h", "m", "s"):
        size = _UNITS_MS[unit]
        if ms and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"
