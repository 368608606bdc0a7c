"""The policy model and loader: bad files refused with the file, api and field named; the
valid file compiled to milliseconds; catalog replacement and tenant overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from quotagate.coordinator.policy import (
    DEFAULT_LEASE_TTL_MS,
    DEFAULT_RUNTIME_ESTIMATE_MS,
    Kind,
    Limit,
    Policy,
    PolicyError,
    PolicySet,
    PriorityClass,
    Scope,
    clock_margin_ms,
    load_catalog,
    load_policies,
    parse_policies,
)

FIXTURES = Path(__file__).parent / "fixtures" / "policies"
VALID = FIXTURES / "valid.yaml"

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

# fixture name -> substrings the error message must contain (besides the file's path).
INVALID: dict[str, list[str]] = {
    "unknown_field": ["apis.acme.reports", "lease_tll", "not permitted"],
    "negative_amount": ["apis.acme.reports.limits[1]", "calls", "positive", "-5"],
    "zero_amount": ["apis.acme.reports.limits[0]", "concurrent", "positive", "0"],
    "granularity_not_dividing": [
        "apis.acme.reports.limits[0]",
        "granularity",
        "7s",
        "1m",
        "divide",
    ],
    "granularity_too_fine": [
        "apis.m365d.incidents.limits[0]",
        "granularity",
        "100ms",
        "more than 3600 buckets",
    ],
    "unknown_kind": ["apis.acme.reports.limits[0]", "bytes", "not permitted"],
    "no_kind": ["apis.acme.reports.limits[0]", "calls, runtime or concurrent"],
    "two_kinds": ["apis.acme.reports.limits[0]", "exactly one kind", "calls, runtime"],
    "bad_duration": ["apis.acme.reports.limits[0].per", "bad duration", "1x"],
    "missing_per": ["apis.acme.reports.limits[0]", "runtime", "per"],
    "bad_api_name": ["apis", "Acme/Reports", "must match"],
    "non_integer_calls": ["apis.acme.reports.limits[0].calls", "whole number", "2.5"],
    "empty_limits": ["apis.acme.reports.limits", "at least one limit"],
    "per_on_concurrent": ["apis.acme.reports.limits[0]", "per", "concurrent"],
    "bad_tenant_override": [
        "tenants.contoso-*.acme.reports.limits[0].burst",
        "not permitted",
    ],
    "bracket_glob_tenant_override": [
        "tenants.contoso-[ab]*.acme.reports.limits[0]",
        "calls",
        "positive",
    ],
    "bad_tenant_api_name": ["tenants.contoso-*", "Acme.Reports", "must match"],
    "runtime_estimate_too_large": [
        "apis.acme.hunting",
        "runtime_estimate 15m",
        "runtime limit 10m per 1h",
    ],
    "zero_lease_ttl": ["apis.acme.reports", "lease_ttl", "positive"],
    "limits_not_a_list": ["apis.acme.reports.limits", "list"],
    "negative_margin": ["apis.acme.reports.limits[0].margin", "bad duration", "-1"],
    "not_a_mapping": ["top level", "mapping", "apis"],
    "invalid_yaml": ["not valid YAML", "line 4"],
    "unknown_scope": ["apis.acme.reports.limits[0].scope", "'api' or 'key'"],
    "duplicate_window": ["apis.acme.reports", "limits[2]", "same calls per 1m as limits[0]"],
    "unknown_tenant_api": [
        "tenants.contoso-*.acme.report:",
        "neither this file nor the catalog defines",
        "did you mean 'acme.reports'?",
    ],
    "class_share_too_large": ["apis.acme.reports.classes.batch.share", "(0, 1]", "1.5"],
    "class_share_zero": ["apis.acme.reports.classes.batch.share", "(0, 1]", "got 0"],
    "class_share_leaves_nothing": [
        "apis.acme.reports",
        "classes.batch",
        "share 0.05 leaves 0 of limits[1]",
        "calls 10 per 1m",
    ],
    "class_unknown_default": ["apis.acme.reports", "default_class 'bulk'", "interactive, batch"],
    "class_default_without_classes": ["apis.acme.reports", "default_class 'batch'", "classes"],
    "class_bad_name": ["apis.acme.reports.classes", "'Interactive'", "must match"],
    "class_aging_zero": ["apis.acme.reports.aging", "aging must be a positive duration"],
    "class_aging_bad_duration": ["apis.acme.reports.aging", "'soon'"],
    "class_aging_one_class": ["apis.acme.reports", "aging needs `classes` with two classes"],
    "class_unknown_field": ["apis.acme.reports.classes.interactive.weight", "not permitted"],
    "class_tenant_override": [
        "tenants.contoso-*.acme.reports",
        "default_class 'scheduled'",
        "interactive, batch",
    ],
    "unknown_tenant_catalog_api": [
        "tenants.fabrikam.m365d.incident:",
        "neither this file nor the catalog defines",
        "did you mean 'm365d.incidents'?",
    ],
}


def test_every_fixture_is_covered() -> None:
    on_disk = {path.stem for path in FIXTURES.glob("*.yaml")}
    assert on_disk == {*INVALID, "valid"}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_file_is_refused_with_file_api_and_field(name: str) -> None:
    path = FIXTURES / f"{name}.yaml"
    with pytest.raises(PolicyError) as info:
        load_policies(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for expected in INVALID[name]:
        assert expected in message, f"{expected!r} not in {message!r}"


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_file_is_refused_without_catalog(name: str) -> None:
    with pytest.raises(PolicyError, match="^" + str(FIXTURES)):
        load_policies(FIXTURES / f"{name}.yaml", catalog=False)


def test_unreadable_file_is_a_policy_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(PolicyError, match="cannot read") as info:
        load_policies(missing)
    assert str(missing) in str(info.value)


def test_policy_error_is_a_value_error() -> None:
    assert issubclass(PolicyError, ValueError)


@pytest.mark.parametrize("text", ["", "# nothing\n", "apis: {}\n"])
def test_empty_document_has_no_apis(text: str) -> None:
    policies = parse_policies(text)
    assert dict(policies.apis) == {}
    assert policies.tenants == ()


def test_parse_policies_names_its_source() -> None:
    with pytest.raises(PolicyError, match=r"^inline\.yaml: apis\.x\.limits"):
        parse_policies("apis: {x: {limits: []}}", "inline.yaml")


# --- the valid file ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid() -> PolicySet:
    return load_policies(VALID)


def test_valid_new_api_compiled_in_ms(valid: PolicySet) -> None:
    assert valid.apis["acme.reports"] == Policy(
        "acme.reports",
        (
            # default granularity W/60, file margin 2s
            Limit(Kind.CALLS, 10, window_ms=MINUTE, granularity_ms=SECOND, margin_ms=2_000),
            # explicit granularity and per-limit margin
            Limit(Kind.CALLS, 200, window_ms=HOUR, granularity_ms=5 * MINUTE, margin_ms=500),
            # W/60 = 1.5s, key scope
            Limit(
                Kind.CALLS,
                5,
                window_ms=90_000,
                granularity_ms=1_500,
                margin_ms=2_000,
                scope=Scope.KEY,
            ),
            # window shorter than 1s: one bucket
            Limit(Kind.CALLS, 3, window_ms=500, granularity_ms=500, margin_ms=2_000),
        ),
        lease_ttl_ms=90_000,
        runtime_estimate_ms=0,
    )


def test_valid_user_api_replaces_catalog_api_as_a_whole(valid: PolicySet) -> None:
    catalog = load_catalog()
    assert catalog.apis["m365d.advanced-hunting"].limits[0].amount == 45
    assert valid.apis["m365d.advanced-hunting"] == Policy(
        "m365d.advanced-hunting",
        (
            Limit(Kind.CALLS, 15, window_ms=MINUTE, granularity_ms=SECOND, margin_ms=2_000),
            # margin: 0 is kept, not replaced by the default
            Limit(Kind.RUNTIME, 10 * MINUTE, window_ms=HOUR, granularity_ms=MINUTE, margin_ms=0),
            Limit(Kind.RUNTIME, 4 * HOUR, window_ms=DAY, granularity_ms=1_440_000, margin_ms=2_000),
        ),
        lease_ttl_ms=5 * MINUTE,
        runtime_estimate_ms=30_000,
    )


def test_valid_keeps_other_catalog_apis_unchanged(valid: PolicySet) -> None:
    catalog = load_catalog()
    replaced = {"m365d.advanced-hunting"}
    for name, policy in catalog.apis.items():
        if name not in replaced:
            assert valid.apis[name] == policy
    # The file's margin (2s) applies to the file's apis only, not to the catalog's.
    assert valid.apis["m365d.incidents"].limits[0].margin_ms == clock_margin_ms(MINUTE) == 6
    assert set(valid.apis) == set(catalog.apis) | {
        "acme.reports",
        "acme.hunting",
        "acme.sessions",
        "acme.search",
    }


def test_valid_runtime_limit_gets_default_estimate(valid: PolicySet) -> None:
    hunting = valid.apis["acme.hunting"]
    assert hunting.runtime_estimate_ms == DEFAULT_RUNTIME_ESTIMATE_MS
    assert hunting.lease_ttl_ms == DEFAULT_LEASE_TTL_MS
    assert hunting.limits == (
        Limit(Kind.RUNTIME, 90_000, window_ms=HOUR, granularity_ms=MINUTE, margin_ms=2_000),
    )


def test_valid_concurrent_limits(valid: PolicySet) -> None:
    sessions = valid.apis["acme.sessions"]
    assert sessions.limits == (
        Limit(Kind.CALLS, 10, window_ms=7_000, granularity_ms=SECOND, margin_ms=2_000),
        Limit(Kind.CONCURRENT, 25),
        Limit(Kind.CONCURRENT, 1, scope=Scope.KEY),
    )
    assert sessions.tracks_keys
    assert not valid.apis["acme.reports"].tracks_keys
    assert sessions.longest_window_ms == 9_000
    assert sessions.shortest_calls_window_ms == 7_000
    assert valid.apis["acme.reports"].shortest_calls_window_ms == 500
    assert valid.apis["acme.hunting"].shortest_calls_window_ms == MINUTE  # no calls limit
    assert valid.apis["m365d.advanced-hunting"].longest_window_ms == DAY + 2_000


def test_default_margin_without_file_margin() -> None:
    policies = parse_policies("apis: {x: {limits: [{calls: 1, per: 1m}]}}")
    assert policies.apis["x"].limits[0].margin_ms == 6  # 100 ppm of a minute, rounded up
    hour = parse_policies("apis: {x: {limits: [{calls: 1, per: 1h}]}}").apis["x"]
    assert hour.limits[0].margin_ms == 360


def test_file_margin_zero_is_kept() -> None:
    policies = parse_policies("margin: 0\napis: {x: {limits: [{calls: 1, per: 1m}]}}")
    assert policies.apis["x"].limits[0].margin_ms == 0


def test_file_margin_applies_to_tenant_overrides(valid: PolicySet) -> None:
    override = valid.resolve("contoso-1", "m365d.advanced-hunting")
    assert override is not None
    assert {lim.margin_ms for lim in override.limits} == {2_000}


# --- tenant overrides -------------------------------------------------------------------


def test_tenant_globs_are_kept_in_file_order(valid: PolicySet) -> None:
    assert [pattern for pattern, _ in valid.tenants] == ["contoso-*", "contoso-eu-*", "fabrikam"]


@pytest.mark.parametrize(
    ("tenant", "api", "first_calls"),
    [
        # contoso-* matches and comes first
        ("contoso-us", "m365d.advanced-hunting", 90),
        # also matches contoso-eu-*, but contoso-* comes first
        ("contoso-eu-1", "m365d.advanced-hunting", 90),
        # contoso-* does not override acme.reports; contoso-eu-* is the first that does
        ("contoso-eu-1", "acme.reports", 99),
        ("contoso-us", "acme.reports", 10),
        ("fabrikam", "acme.reports", 1000),
        # globs match the whole tenant id, case-sensitively
        ("fabrikam-2", "acme.reports", 10),
        ("Contoso-us", "m365d.advanced-hunting", 15),
        ("xcontoso-us", "m365d.advanced-hunting", 15),
        # a tenant no glob matches gets the base api
        ("woodgrove", "m365d.advanced-hunting", 15),
        ("woodgrove", "m365d.incidents", 50),
    ],
)
def test_resolve_first_matching_glob_wins(
    valid: PolicySet, tenant: str, api: str, first_calls: int
) -> None:
    policy = valid.resolve(tenant, api)
    assert policy is not None
    assert policy.api == api
    assert policy.limits[0].kind is Kind.CALLS
    assert policy.limits[0].amount == first_calls


def test_resolve_override_replaces_the_api_as_a_whole(valid: PolicySet) -> None:
    policy = valid.resolve("contoso-us", "m365d.advanced-hunting")
    assert policy is not None
    assert [(lim.kind, lim.amount, lim.window_ms) for lim in policy.limits] == [
        (Kind.CALLS, 90, MINUTE),
        (Kind.RUNTIME, 20 * MINUTE, HOUR),
        (Kind.RUNTIME, 8 * HOUR, DAY),
    ]
    # Not inherited from the base api: the override's own (default) values.
    assert policy.lease_ttl_ms == DEFAULT_LEASE_TTL_MS
    assert policy.runtime_estimate_ms == DEFAULT_RUNTIME_ESTIMATE_MS


def test_resolve_unknown_api_is_none(valid: PolicySet) -> None:
    assert valid.resolve("contoso-us", "acme.unknown") is None
    assert valid.resolve("woodgrove", "acme.unknown") is None


def test_unknown_override_names_file_glob_and_api() -> None:
    path = FIXTURES / "unknown_tenant_catalog_api.yaml"
    with pytest.raises(PolicyError) as info:
        load_policies(path)
    assert str(info.value) == (
        f"{path}: tenants.fabrikam.m365d.incident: overrides api 'm365d.incident', which "
        "neither this file nor the catalog defines (did you mean 'm365d.incidents'?)"
    )


def test_override_of_a_catalog_api_needs_the_catalog(tmp_path: Path) -> None:
    path = tmp_path / "policies.yaml"
    path.write_text('tenants: {"c-*": {m365d.incidents: {limits: [{calls: 9, per: 1m}]}}}\n')
    override = load_policies(path).resolve("c-1", "m365d.incidents")
    assert override is not None and override.limits[0].amount == 9
    with pytest.raises(PolicyError, match=r"tenants\.c-\*\.m365d\.incidents: .*catalog not loaded"):
        load_policies(path, catalog=False)


def test_tenant_override_of_api_missing_from_base() -> None:
    policies = parse_policies('tenants: {"t-*": {acme.only: {limits: [{calls: 1, per: 1s}]}}}')
    assert policies.resolve("t-1", "acme.only") is not None
    assert policies.resolve("u-1", "acme.only") is None


# --- priority classes -----------------------------------------------------------------


def test_classes_in_priority_order_with_shares(valid: PolicySet) -> None:
    policy = valid.apis["acme.search"]
    assert policy.classes == (
        PriorityClass("interactive", 1000),
        PriorityClass("scheduled", 600),
        PriorityClass("backfill", 250),
    )
    assert policy.default_class == "scheduled"
    assert policy.priority_class(None) == PriorityClass("scheduled", 600)
    assert policy.priority_class("backfill") == PriorityClass("backfill", 250)
    assert [policy.class_rank(name) for name in ("interactive", None, "backfill")] == [0, 1, 2]


def test_unknown_class_names_the_classes(valid: PolicySet) -> None:
    with pytest.raises(ValueError, match=r"'urgent'.*interactive, scheduled, backfill"):
        valid.apis["acme.search"].priority_class("urgent")


def test_api_without_classes_ignores_priority(valid: PolicySet) -> None:
    policy = valid.apis["acme.reports"]
    assert policy.classes == ()
    assert policy.priority_class("anything") is None
    assert policy.class_rank("anything") == 0


def test_default_class_is_the_lowest_when_not_named() -> None:
    policies = parse_policies(
        "apis:\n  a.b:\n    classes: {hi: {}, lo: {share: 0.5}}\n"
        "    limits: [{calls: 4, per: 1s}]\n"
    )
    assert policies.apis["a.b"].default_class == "lo"


def test_share_caps_per_class() -> None:
    assert PriorityClass("b", 600).cap(45) == 27
    assert PriorityClass("b", 1000).cap(45) == 45


def test_describe_shows_classes(valid: PolicySet) -> None:
    described = valid.apis["acme.search"].describe()
    assert described["classes"] == [
        {"name": "interactive", "share": 1.0},
        {"name": "scheduled", "share": 0.6},
        {"name": "backfill", "share": 0.25},
    ]
    assert described["default_class"] == "scheduled"
    assert "classes" not in valid.apis["acme.reports"].describe()


# --- describe ---------------------------------------------------------------------------


def test_describe_policy(valid: PolicySet) -> None:
    assert valid.apis["acme.sessions"].describe() == {
        "api": "acme.sessions",
        "limits": [
            {
                "kind": "calls",
                "amount": 10,
                "window": 7.0,
                "scope": "api",
                "granularity": 1.0,
                "margin": 2.0,
            },
            {
                "kind": "concurrent",
                "amount": 25,
                "window": None,
                "scope": "api",
                "granularity": None,
                "margin": None,
            },
            {
                "kind": "concurrent",
                "amount": 1,
                "window": None,
                "scope": "key",
                "granularity": None,
                "margin": None,
            },
        ],
        "lease_ttl": 60.0,
        "runtime_estimate": 0.0,
    }


def test_describe_runtime_amount_in_seconds(valid: PolicySet) -> None:
    described = valid.apis["m365d.advanced-hunting"].describe()
    assert described["limits"][1] == {
        "kind": "runtime",
        "amount": 600.0,
        "window": 3600.0,
        "scope": "api",
        "granularity": 60.0,
        "margin": 0.0,
    }
    assert described["lease_ttl"] == 300.0
    assert described["runtime_estimate"] == 30.0


@pytest.mark.parametrize(
    ("limit", "expected"),
    [
        (Limit(Kind.CALLS, 50, window_ms=MINUTE), {"kind": "calls", "amount": 50, "window": 60.0}),
        (Limit(Kind.CALLS, 5, window_ms=500), {"kind": "calls", "amount": 5, "window": 0.5}),
        (
            Limit(Kind.RUNTIME, 1_500, window_ms=HOUR),
            {"kind": "runtime", "amount": 1.5, "window": 3600.0},
        ),
        (Limit(Kind.CONCURRENT, 25), {"kind": "concurrent", "amount": 25, "window": None}),
    ],
)
def test_describe_limit(limit: Limit, expected: dict[str, object]) -> None:
    assert limit.describe() == expected


def test_describe_policy_set(valid: PolicySet) -> None:
    described = valid.describe()
    assert set(described) == {"policies", "tenants"}
    assert list(described["policies"]) == sorted(valid.apis)
    assert described["policies"]["acme.reports"] == valid.apis["acme.reports"].describe()
    assert list(described["tenants"]) == ["contoso-*", "contoso-eu-*", "fabrikam"]
    assert list(described["tenants"]["contoso-eu-*"]) == ["acme.reports", "m365d.advanced-hunting"]
    assert described["tenants"]["fabrikam"]["acme.reports"]["limits"] == [
        {
            "kind": "calls",
            "amount": 1000,
            "window": 3600.0,
            "scope": "api",
            "granularity": 60.0,
            "margin": 2.0,
        }
    ]


# --- impossible requests ----------------------------------------------------------------

POLICY = Policy(
    "acme.mixed",
    (
        Limit(Kind.CALLS, 50, window_ms=MINUTE),
        Limit(Kind.CALLS, 20, window_ms=HOUR),
        Limit(Kind.RUNTIME, 10 * MINUTE, window_ms=HOUR),
        Limit(Kind.RUNTIME, 5 * MINUTE, window_ms=DAY),
        Limit(Kind.CONCURRENT, 3),
    ),
)


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        (1, None),
        (20, None),
        (21, POLICY.limits[1]),
        (51, POLICY.limits[0]),
        (10**9, POLICY.limits[0]),
    ],
)
def test_impossible_cost(cost: int, expected: Limit | None) -> None:
    assert POLICY.impossible_cost(cost) == expected


@pytest.mark.parametrize(
    ("runtime_ms", "expected"),
    [
        (0, None),
        (5 * MINUTE, None),
        (5 * MINUTE + 1, POLICY.limits[3]),
        (10 * MINUTE + 1, POLICY.limits[2]),
    ],
)
def test_impossible_runtime(runtime_ms: int, expected: Limit | None) -> None:
    assert POLICY.impossible_runtime(runtime_ms) == expected


def test_nothing_is_impossible_without_such_limits() -> None:
    policy = Policy("acme.sessions", (Limit(Kind.CONCURRENT, 1),))
    assert policy.impossible_cost(10**6) is None
    assert policy.impossible_runtime(10**9) is None
    assert policy.longest_window_ms == 0


def test_runtime_estimate_equal_to_limit_is_allowed() -> None:
    text = "apis: {x: {runtime_estimate: 10m, limits: [{runtime: 10m, per: 1h}]}}"
    assert parse_policies(text).apis["x"].runtime_estimate_ms == 10 * MINUTE


def test_tenant_runtime_estimate_too_large_names_tenant_and_api() -> None:
    text = 'tenants: {"c-*": {x: {runtime_estimate: 2m, limits: [{runtime: 1m, per: 1h}]}}}'
    with pytest.raises(PolicyError, match=r"^f\.yaml: tenants\.c-\*\.x: runtime_estimate 2m"):
        parse_policies(text, "f.yaml")
