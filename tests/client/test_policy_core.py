"""The policy core: durations, names, defaults, limit rules, tenant overrides. The file
loader built on it is tested in tests/test_policy.py."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from quotagate.client import policy_core
from quotagate.client.policy_core import (
    API_PATTERN,
    KEY_PATTERN,
    MAX_MS,
    TENANT_PATTERN,
    Kind,
    Limit,
    Policy,
    PolicySet,
    Scope,
    clock_margin_ms,
    default_granularity_ms,
    format_duration,
    make_limit,
    make_policy,
    parse_duration_ms,
    parse_duration_seconds,
)

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR


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


# --- default granularity ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("window_ms", "expected"),
    [
        (MINUTE, SECOND),
        (HOUR, MINUTE),
        (DAY, 1_440_000),
        (500, 500),
        (90_000, 1_500),
        (7_000, SECOND),
        (1, 1),
        (1_000, 1_000),
        (59_999, 59_999),  # prime: the whole window is one bucket
        (86_399_999, 12_342_857),  # 7 * 12342857: 7 buckets
        (61_000, 1_220),  # ceil(61000/60) = 1017 -> divisor 1220 (50 buckets)
    ],
)
def test_default_granularity_examples(window_ms: int, expected: int) -> None:
    assert default_granularity_ms(window_ms) == expected


@pytest.mark.parametrize(
    "window_ms",
    [1, 7, 999, 1_000, 1_001, 7_000, 59_999, 61_000, 90_000, 86_399_999, DAY, 10**18, 2**61 - 1],
)
def test_default_granularity_properties(window_ms: int) -> None:
    granularity = default_granularity_ms(window_ms)
    assert window_ms % granularity == 0
    assert granularity >= min(1_000, window_ms)
    assert granularity * 60 >= window_ms
    if window_ms <= 10**7:  # it is the smallest such divisor
        wanted = max(min(1_000, window_ms), -(-window_ms // 60))
        assert all(window_ms % d for d in range(wanted, granularity))


@pytest.mark.parametrize("window_ms", [0, -1])
def test_default_granularity_needs_a_positive_window(window_ms: int) -> None:
    with pytest.raises(ValueError, match="positive"):
        default_granularity_ms(window_ms)


# --- the seconds view -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("500ms", 0.5), ("1.5s", 1.5), ("1m", 60.0), ("19.046875", 19.046875), (2.007, 2.007)],
)
def test_seconds_view_is_exact(value: object, seconds: float) -> None:
    assert parse_duration_seconds(value) == seconds


@pytest.mark.parametrize("value", ["1x", "-1", "367d", None, True])
def test_seconds_view_refuses_what_the_ms_view_refuses(value: object) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration_seconds(value)


# --- names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "good", "bad"),
    [
        (API_PATTERN, ["m365d.incidents", "a", "x" * 64], ["M365d", ".a", "a b", "x" * 65]),
        (TENANT_PATTERN, ["contoso/app", "t@x:1", "x" * 128], ["{t}", "a|b", "-a", "x" * 129]),
        (KEY_PATTERN, ["m1", "GET:/api/machines/_id_", "x" * 256], ["{k}", "a b", "x" * 257]),
    ],
)
def test_name_patterns(pattern: re.Pattern[str], good: list[str], bad: list[str]) -> None:
    assert all(pattern.match(name) for name in good)
    assert not any(pattern.match(name) for name in bad)


def test_one_copy_of_each_rule() -> None:
    """The client and the coordinator use the core's objects, not copies of them."""
    from quotagate.client import _base, local, routes
    from quotagate.coordinator import policy

    assert routes.KEY_PATTERN is policy.KEY_PATTERN is KEY_PATTERN
    assert _base.TENANT_PATTERN is policy.TENANT_PATTERN is TENANT_PATTERN
    assert policy.API_PATTERN is API_PATTERN
    for name in ("Kind", "Scope", "Limit", "Policy", "PolicySet", "default_granularity_ms"):
        assert getattr(policy, name) is getattr(policy_core, name)
    assert local.PolicySet is PolicySet


def test_the_core_needs_no_server_dependency() -> None:
    """The client installs with httpx alone: the core imports neither pydantic nor yaml."""
    code = (
        "import sys, quotagate.client.policy_core; "
        "print(sorted({'pydantic', 'yaml'} & set(sys.modules)))"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "[]"


# --- limits and policies ----------------------------------------------------------------


def test_make_limit_applies_the_defaults() -> None:
    assert make_limit(Kind.CALLS, 50, per_ms=MINUTE) == Limit(
        Kind.CALLS, 50, MINUTE, granularity_ms=SECOND, margin_ms=clock_margin_ms(MINUTE)
    )
    assert clock_margin_ms(MINUTE) == 6 and clock_margin_ms(1) == 1 and clock_margin_ms(0) == 0
    assert make_limit(Kind.RUNTIME, 10 * MINUTE, per_ms=HOUR, margin_ms=0, scope=Scope.KEY) == (
        Limit(Kind.RUNTIME, 10 * MINUTE, HOUR, granularity_ms=MINUTE, scope=Scope.KEY)
    )
    assert make_limit(Kind.CALLS, 1, per_ms=MINUTE, default_margin_ms=2_000).margin_ms == 2_000
    assert make_limit(Kind.CONCURRENT, 3) == Limit(Kind.CONCURRENT, 3)


@pytest.mark.parametrize(
    ("kind", "amount", "fields", "message"),
    [
        (Kind.CALLS, 0, {"per_ms": MINUTE}, "calls must be positive, got 0"),
        (Kind.CONCURRENT, -1, {}, "concurrent must be positive, got -1"),
        (Kind.CONCURRENT, 1, {"per_ms": MINUTE}, "per does not apply to a concurrent limit"),
        (Kind.CONCURRENT, 1, {"margin_ms": 0}, "margin does not apply"),
        (Kind.RUNTIME, 1, {}, "a runtime limit needs `per`"),
        (Kind.CALLS, 1, {"per_ms": 0}, "per must be a positive duration"),
        (Kind.CALLS, 1, {"per_ms": MINUTE, "granularity_ms": 7_000}, "7s does not divide"),
        (Kind.CALLS, 1, {"per_ms": MINUTE, "granularity_ms": 0}, "does not divide the window 1m"),
        (Kind.CALLS, 1, {"per_ms": HOUR, "granularity_ms": 500}, "more than 3600 buckets"),
    ],
)
def test_make_limit_names_the_rule_it_breaks(
    kind: Kind, amount: int, fields: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        make_limit(kind, amount, **fields)


def test_make_policy_applies_the_defaults() -> None:
    calls = make_limit(Kind.CALLS, 5, per_ms=MINUTE)
    runtime = make_limit(Kind.RUNTIME, MINUTE, per_ms=HOUR)
    assert make_policy("a", (calls,)) == Policy("a", (calls,), 60_000, 0)
    assert make_policy("a", (calls, runtime)).runtime_estimate_ms == 10_000
    assert make_policy("a", (runtime,), runtime_estimate_ms=0).runtime_estimate_ms == 0
    assert make_policy("a", (calls,), lease_ttl_ms=5_000).lease_ttl_ms == 5_000


def test_span_is_the_window_widened_by_the_margin() -> None:
    assert Limit(Kind.CALLS, 1, MINUTE, margin_ms=1_500).span_ms == MINUTE + 1_500
    assert Limit(Kind.CONCURRENT, 1).span_ms == 0


# --- tenant overrides -------------------------------------------------------------------

BASE = Policy("a", (Limit(Kind.CALLS, 1, MINUTE),))
WIDE = Policy("a", (Limit(Kind.CALLS, 2, MINUTE),))
NARROW = Policy("a", (Limit(Kind.CALLS, 3, MINUTE),))


def test_first_matching_glob_wins() -> None:
    policies = PolicySet({"a": BASE}, (("c-*", {"a": WIDE}), ("c-eu-*", {"a": NARROW})))
    assert policies.resolve("c-eu-1", "a") is WIDE
    assert policies.resolve("C-eu-1", "a") is BASE  # globs are case-sensitive
    assert policies.resolve("x", "a") is BASE
    assert policies.resolve("c-1", "b") is None


def test_updated_puts_the_newer_first() -> None:
    older = PolicySet({"a": BASE, "b": BASE}, (("c-*", {"a": WIDE}),))
    newer = PolicySet({"a": NARROW}, (("c-*", {"a": NARROW}),))
    merged = older.updated(newer)
    assert merged.apis == {"a": NARROW, "b": BASE}
    assert merged.resolve("c-1", "a") is NARROW
    assert [glob for glob, _ in merged.tenants] == ["c-*", "c-*"]
