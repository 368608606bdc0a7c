"""The built-in Defender catalog matches the documented limits (defender-limits.md, "Catalog")."""

from __future__ import annotations

import re

import pytest

from quotagate.coordinator.policy import (
    API_PATTERN,
    CATALOG_PATH,
    DEFAULT_MARGIN_MS,
    Kind,
    Scope,
    default_granularity_ms,
    load_catalog,
    load_policies,
)

MIN = 60
HOUR = 3_600
DAY = 86_400

CALLS, RUNTIME, CONCURRENT = Kind.CALLS, Kind.RUNTIME, Kind.CONCURRENT
API, KEY = Scope.API, Scope.KEY

# api -> [(kind, amount, window seconds, scope)]; runtime amounts in seconds, window None
# for a concurrent limit. Transcribed from the defender-limits.md "Catalog" table.
EXPECTED: dict[str, list[tuple[Kind, int, int | None, Scope]]] = {
    "m365d.incidents": [(CALLS, 50, MIN, API), (CALLS, 1_500, HOUR, API)],
    "m365d.advanced-hunting": [
        (CALLS, 45, MIN, API),
        (RUNTIME, 10 * MIN, HOUR, API),
        (RUNTIME, 4 * HOUR, DAY, API),
    ],
    "mde.advanced-hunting": [
        (CALLS, 45, MIN, API),
        (CALLS, 1_500, HOUR, API),
        (RUNTIME, 10 * MIN, HOUR, API),
        (RUNTIME, 3 * HOUR, DAY, API),
    ],
    "mde.api": [(CALLS, 100, MIN, KEY), (CALLS, 1_500, HOUR, KEY)],
    "mde.alerts.batch-update": [(CALLS, 10, MIN, API), (CALLS, 500, HOUR, API)],
    "mde.alerts.create": [(CALLS, 15, MIN, API)],
    "mde.indicators.import": [(CALLS, 30, MIN, API)],
    "mde.indicators.batch-delete": [(CALLS, 30, MIN, API), (CALLS, 1_500, HOUR, API)],
    "mde.live-response": [
        (CALLS, 10, MIN, API),
        (CONCURRENT, 25, None, API),
        (CONCURRENT, 1, None, KEY),
    ],
    "mde.package-sas": [(CALLS, 2, MIN, API), (CALLS, 120, HOUR, API)],
    "mde.export": [(CALLS, 30, MIN, API), (CALLS, 1_000, HOUR, API)],
    "mde.export.files": [(CALLS, 5, MIN, API), (CALLS, 20, HOUR, API)],
    "graph.security": [(CALLS, 150, MIN, API)],
    "graph.ti-indicators": [(CALLS, 1_000, MIN, API)],
    "graph.hunting": [(CALLS, 45, MIN, API)],
}

# api -> a word of the table's "source" column that the catalog's comment must cite.
SOURCES = {
    "m365d.incidents": "api-list-incidents",
    "m365d.advanced-hunting": "api-advanced-hunting",
    "mde.advanced-hunting": "run-advanced-query-api",
    "mde.api": "MDE API terms page",
    "mde.alerts.batch-update": "batch-update-alerts",
    "mde.alerts.create": "create-alert-by-reference",
    "mde.indicators.import": "import-ti-indicators",
    "mde.indicators.batch-delete": "batch-delete-ti-indicators",
    "mde.live-response": "run-live-response",
    "mde.package-sas": "get-package-sas-uri",
    "mde.export": "export pages",
    "mde.export.files": "get-assessment-software-vulnerabilities",
    "graph.security": "Graph throttling limits",
    "graph.ti-indicators": "Graph throttling limits",
    "graph.hunting": "Graph security API overview",
}

# The longest documented single request, which a lease must outlive.
REQUEST_TIMEOUT_S = {"m365d.advanced-hunting": 3 * MIN, "mde.advanced-hunting": 200}


def _as_table(api: str) -> list[tuple[Kind, int, int | None, Scope]]:
    policy = load_policies().apis[api]
    rows: list[tuple[Kind, int, int | None, Scope]] = []
    for lim in policy.limits:
        amount = lim.amount // 1000 if lim.kind is Kind.RUNTIME else lim.amount
        if lim.kind is Kind.RUNTIME:
            assert lim.amount % 1000 == 0
        window = None if lim.kind is Kind.CONCURRENT else lim.window_ms // 1000
        rows.append((lim.kind, amount, window, lim.scope))
    return rows


def test_catalog_has_exactly_the_documented_apis() -> None:
    assert set(load_policies().apis) == set(EXPECTED)


def test_catalog_is_the_default() -> None:
    assert load_policies() == load_catalog()
    assert load_policies().tenants == ()


@pytest.mark.parametrize("api", sorted(EXPECTED))
def test_catalog_limits(api: str) -> None:
    assert _as_table(api) == EXPECTED[api]


@pytest.mark.parametrize("api", sorted(EXPECTED))
def test_catalog_defaults(api: str) -> None:
    for lim in load_policies().apis[api].limits:
        if lim.kind is Kind.CONCURRENT:
            assert (lim.window_ms, lim.granularity_ms, lim.margin_ms) == (0, 0, 0)
        else:
            assert lim.margin_ms == DEFAULT_MARGIN_MS
            assert lim.granularity_ms == default_granularity_ms(lim.window_ms)


@pytest.mark.parametrize("api", sorted(EXPECTED))
def test_catalog_api_names_match_pattern(api: str) -> None:
    assert API_PATTERN.match(api)
    assert load_policies().apis[api].api == api


@pytest.mark.parametrize("api", sorted(REQUEST_TIMEOUT_S))
def test_hunting_leases_outlive_a_request_and_estimate_fits(api: str) -> None:
    policy = load_policies().apis[api]
    assert policy.lease_ttl_ms > REQUEST_TIMEOUT_S[api] * 1000
    assert 0 < policy.runtime_estimate_ms
    assert policy.impossible_runtime(policy.runtime_estimate_ms) is None


def test_only_live_response_tracks_keys() -> None:
    tracking = {name for name, policy in load_policies().apis.items() if policy.tracks_keys}
    assert tracking == {"mde.live-response"}


def _comments_before_each_api() -> dict[str, str]:
    """api -> the comment block right above its key in catalog.yaml."""
    lines = CATALOG_PATH.read_text(encoding="utf-8").splitlines()
    start = lines.index("apis:")
    found: dict[str, str] = {}
    for number, line in enumerate(lines[start + 1 :], start + 1):
        match = re.match(r"^  ([^\s#][^:]*):\s*$", line)
        if not match:
            continue
        block: list[str] = []
        above = number - 1
        while above > start and lines[above].lstrip().startswith("#"):
            block.insert(0, lines[above].strip().removeprefix("#").strip())
            above -= 1
        found[match.group(1)] = " ".join(block)
    return found


def test_catalog_yaml_lists_each_api_once_in_table_order() -> None:
    assert list(_comments_before_each_api()) == list(EXPECTED)


@pytest.mark.parametrize("api", sorted(EXPECTED))
def test_catalog_yaml_cites_a_source_before_each_api(api: str) -> None:
    comment = _comments_before_each_api()[api]
    assert "Source:" in comment
    assert SOURCES[api] in comment.partition("Source:")[2]
