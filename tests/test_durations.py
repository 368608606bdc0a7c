"""Durations as written in policy files."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotagate.coordinator.durations import MAX_MS, format_duration, parse_duration_ms


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("0ms", 0),
        ("1ms", 1),
        ("500ms", 500),
        ("0s", 0),
        ("1s", 1_000),
        ("20s", 20_000),
        ("1m", 60_000),
        ("4m", 240_000),
        ("1h", 3_600_000),
        ("4h", 14_400_000),
        ("1d", 86_400_000),
        ("30d", 2_592_000_000),
        # fractional
        ("1.5s", 1_500),
        ("0.5s", 500),
        ("1.5m", 90_000),
        ("0.25h", 900_000),
        ("1.5d", 129_600_000),
        ("2.007s", 2_007),  # exact: 2.007 * 1000 is 2007.0000000000002 in floats
        ("4.35s", 4_350),
        ("0.001s", 1),
        # fractions of a millisecond round up
        ("0.0001s", 1),
        ("1.0005s", 1_001),
        ("2.5ms", 3),
        # plain seconds
        ("1", 1_000),
        ("90", 90_000),
        ("0.25", 250),
        # surrounding and inner spaces
        (" 1m ", 60_000),
        ("10 s", 10_000),
        # the longest accepted, exactly
        ("366d", MAX_MS),
    ],
)
def test_parse_text(text: str, ms: int) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (0, 0),
        (1, 1_000),
        (60, 60_000),
        (0.5, 500),
        (1.5, 1_500),
        (2.007, 2_007),
        (0.0001, 1),
        (1e-05, 1),
        (-0.0, 0),
        (366 * 86_400, MAX_MS),
    ],
)
def test_parse_number_is_seconds(value: float, ms: int) -> None:
    assert parse_duration_ms(value) == ms


@pytest.mark.parametrize(
    "value",
    [
        -1,
        -0.5,
        "-1s",
        "-1",
        "1x",
        "1 x",
        "ms",
        "s",
        "",
        "   ",
        "1M",
        "1S",
        "1 min",
        "1sec",
        "1m30s",
        ".5s",
        "1.s",
        "1e3",
        "1,5s",
        "nan",
        "inf",
        None,
        True,
        False,
        math.nan,
        math.inf,
        -math.inf,
        [1],
        {"s": 1},
        b"1s",
        "367d",
        f"{MAX_MS + 1}ms",
        10**30,
        1e300,
    ],
)
def test_bad_values_raise_value_error(value: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration_ms(value)


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (1, "1ms"),
        (500, "500ms"),
        (1_500, "1500ms"),
        (1_000, "1s"),
        (90_000, "90s"),
        (60_000, "1m"),
        (5_400_000, "90m"),
        (3_600_000, "1h"),
        (14_400_000, "4h"),
        (86_400_000, "1d"),
        (129_600_000, "36h"),
        (172_800_000, "2d"),
    ],
)
def test_format_duration(ms: int, text: str) -> None:
    assert format_duration(ms) == text
    assert parse_duration_ms(text) == ms


@given(st.integers(min_value=0, max_value=MAX_MS))
def test_format_round_trips(ms: int) -> None:
    assert parse_duration_ms(format_duration(ms)) == ms


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999))
def test_parse_decimal_seconds_is_exact(whole: int, thousandths: int) -> None:
    assert parse_duration_ms(f"{whole}.{thousandths:03d}s") == whole * 1_000 + thousandths
    assert parse_duration_ms(f"{whole}.{thousandths:03d}") == whole * 1_000 + thousandths


@given(st.integers(min_value=0, max_value=366), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_format_of_parse_is_exact_and_no_longer(number: int, unit: str) -> None:
    ms = parse_duration_ms(f"{number}{unit}")
    text = format_duration(ms)
    assert parse_duration_ms(text) == ms
    assert len(text) <= len(f"{number}{unit}") or number == 0
