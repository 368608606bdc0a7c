"""The built-in Defender catalog matches the documented limits (coordinator/defender.md,
"Catalog"), and the tables of defender.md agree with catalog.yaml and the route table."""

from __future__ import annotations

import re
from importlib.resources import files
from typing import Any

import pytest
import yaml

from quotagate.client import DEFENDER_HOSTS, DEFENDER_ROUTES, GRAPH_HOSTS
from quotagate.coordinator.policy import (
    API_PATTERN,
    CATALOG_PATH,
    Kind,
    Scope,
    clock_margin_ms,
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
# for a concurrent limit. Transcribed from the coordinator/defender.md "Catalog" table.
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
            assert lim.margin_ms == clock_margin_ms(lim.window_ms)
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


# -- coordinator/defender.md --------------------------------------------------------------

FACTS = files("quotagate.coordinator").joinpath("defender.md").read_text(encoding="utf-8")
_UNIT_MS = {"ms": 1, "s": 1_000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def _ms(text: object) -> int:
    """Milliseconds in a catalog duration (`1m`, `500ms`, `20s`)."""
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", str(text))
    assert match, f"not a catalog duration: {text!r}"
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def _section(title: str) -> str:
    """The text of defender.md under `## title`, up to the next section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", FACTS, re.M | re.S)
    assert match, f"defender.md has no section {title!r}"
    return match.group(1)


def _tables(title: str) -> list[list[list[str]]]:
    """The tables of section `title`, each as its rows of cells (header and rule left out)."""
    tables: list[list[list[str]]] = []
    lines: list[str] = []
    for line in [*_section(title).splitlines(), ""]:
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            tables.append(
                [[cell.strip() for cell in row.strip("|").split("|")] for row in lines[2:]]
            )
            lines = []
    return tables


def _code(cell: str) -> str:
    return cell.strip().strip("`")


Row = tuple[str, int, int | None, str]  # (kind, amount (ms for runtime), window ms, scope)


def _documented_limit(text: str) -> Row:
    """`50 calls / 1m`, `10m runtime / 1h`, `25 concurrent`, each maybe `per key`."""
    text, per_key = text.removesuffix(" per key"), text.endswith(" per key")
    scope = "key" if per_key else "api"
    windowed = re.fullmatch(r"([\d,]+|\w+) (calls|runtime) / (\w+)", text)
    if windowed:
        amount, kind, per = windowed.groups()
        value = _ms(amount) if kind == "runtime" else int(amount.replace(",", ""))
        return (kind, value, _ms(per), scope)
    concurrent = re.fullmatch(r"(\d+) concurrent", text)
    assert concurrent, f"defender.md: unreadable limit {text!r}"
    return ("concurrent", int(concurrent.group(1)), None, scope)


def _catalog_limit(spec: dict[str, Any]) -> Row:
    """A limit as catalog.yaml writes it (`{calls: 50, per: 1m}`)."""
    scope = spec.get("scope", "api")
    if "concurrent" in spec:
        return ("concurrent", spec["concurrent"], None, scope)
    if "runtime" in spec:
        return ("runtime", _ms(spec["runtime"]), _ms(spec["per"]), scope)
    return ("calls", spec["calls"], _ms(spec["per"]), scope)


CATALOG_YAML = yaml.safe_load(CATALOG_PATH.read_text(encoding="utf-8"))
FACT_ROWS = {_code(row[0]): row for row in _tables("Catalog")[0]}


def test_facts_list_the_catalogs_apis_in_its_order() -> None:
    assert [_code(row[0]) for row in _tables("Catalog")[0]] == list(CATALOG_YAML["apis"])
    assert list(FACT_ROWS) == list(EXPECTED)


@pytest.mark.parametrize("api", sorted(EXPECTED))
def test_facts_and_catalog_yaml_give_the_same_limits(api: str) -> None:
    documented = [_documented_limit(part.strip()) for part in FACT_ROWS[api][1].split(";")]
    shipped = [_catalog_limit(spec) for spec in CATALOG_YAML["apis"][api]["limits"]]
    assert documented == shipped


@pytest.mark.parametrize("api", sorted(EXPECTED))
def test_facts_name_the_source_the_catalog_cites(api: str) -> None:
    assert SOURCES[api] in FACT_ROWS[api][3]


def test_facts_give_every_setting_the_catalog_adds() -> None:
    documented = {
        (_code(api), _code(setting), value)
        for api, setting, value, _ in _tables("What the catalog adds")[0]
    }
    assert "margin" not in CATALOG_YAML  # every window gets its clock-rate margin
    shipped = {("every api", "margin", "W x 100 ppm")}
    for api, spec in CATALOG_YAML["apis"].items():
        shipped |= {
            (api, key, spec[key]) for key in ("lease_ttl", "runtime_estimate") if key in spec
        }
    assert documented == shipped


def test_facts_list_the_route_tables_hosts() -> None:
    hosts = {_code(row[0]) for row in _tables("Endpoints and hosts")[0]}
    assert hosts == DEFENDER_HOSTS | GRAPH_HOSTS


def test_facts_list_the_route_table_in_its_order() -> None:
    documented = [
        (
            frozenset() if methods == "any" else frozenset(methods.split(", ")),
            _code(path),
            _code(api),
            _code(key),
        )
        for methods, path, api, key in _tables("Endpoints and hosts")[1]
    ]
    assert documented == [
        (frozenset(route.methods), route.path, route.api, route.key) for route in DEFENDER_ROUTES
    ]
