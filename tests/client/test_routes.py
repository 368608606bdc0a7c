"""The Defender route table: every endpoint of coordinator/defender.md ("Endpoints and
hosts") on every host."""

from __future__ import annotations

from pathlib import Path

import pytest

from quotagate.client import (
    DEFENDER_HOSTS,
    DEFENDER_ROUTES,
    ENDPOINT,
    GRAPH_HOSTS,
    Route,
    RouteMatch,
    RouteTable,
    endpoint_key,
    normalise_path,
)
from quotagate.client.routes import KEY_PATTERN

MACHINE = "1e5bc9d7e413ddd7902c2932e418702b84d0cc07"  # SHA1 machine id
MACHINE_256 = "2f4a1b8c" * 8  # SHA256-sized id
GUID = "7c3f6d7e-2a1b-4c5d-9e8f-0a1b2c3d4e5f"

HOSTS = [
    "api.security.microsoft.com",
    "us.api.security.microsoft.com",
    "eu.api.security.microsoft.com",
    "uk.api.security.microsoft.com",
    "au.api.security.microsoft.com",
    "swa.api.security.microsoft.com",
    "api.securitycenter.microsoft.com",
    "api.securitycenter.windows.com",
]

# (method, path) -> (api, key) for every endpoint listed under "Endpoints and hosts".
DEFENDER_CASES = [
    ("GET", "/api/incidents", "m365d.incidents", ""),
    ("GET", "/api/incidents/924565", "m365d.incidents", ""),
    ("PATCH", "/api/incidents/924565", "m365d.incidents", ""),
    ("POST", "/api/advancedhunting/run", "m365d.advanced-hunting", ""),
    ("POST", "/api/advancedqueries/run", "mde.advanced-hunting", ""),
    ("POST", f"/api/machines/{MACHINE}/runliveresponse", "mde.live-response", MACHINE),
    ("POST", "/api/alerts/batchUpdate", "mde.alerts.batch-update", ""),
    ("POST", "/api/alerts/createAlertByReference", "mde.alerts.create", ""),
    ("POST", "/api/indicators/import", "mde.indicators.import", ""),
    ("POST", "/api/indicators/BatchDelete", "mde.indicators.batch-delete", ""),
    ("GET", f"/api/machineactions/{GUID}/GetPackageUri", "mde.package-sas", ""),
    ("GET", f"/api/machines/{MACHINE}/getPackageUri", "mde.package-sas", ""),
    ("GET", "/api/machines", "mde.api", "GET:/api/machines"),
    ("GET", f"/api/machines/{MACHINE}", "mde.api", "GET:/api/machines/_id_"),
    ("GET", f"/api/machines/{MACHINE_256}/alerts", "mde.api", "GET:/api/machines/_id_/alerts"),
    ("POST", f"/api/machines/{MACHINE}/isolate", "mde.api", "POST:/api/machines/_id_/isolate"),
    (
        "POST",
        f"/api/machines/{MACHINE}/runAntiVirusScan",
        "mde.api",
        "POST:/api/machines/_id_/runantivirusscan",
    ),
    (
        "POST",
        f"/api/machines/{MACHINE}/collectInvestigationPackage",
        "mde.api",
        "POST:/api/machines/_id_/collectinvestigationpackage",
    ),
    (
        "POST",
        f"/api/machines/{MACHINE}/StopAndQuarantineFile",
        "mde.api",
        "POST:/api/machines/_id_/stopandquarantinefile",
    ),
    ("POST", f"/api/machines/{MACHINE}/offboard", "mde.api", "POST:/api/machines/_id_/offboard"),
    ("GET", "/api/alerts", "mde.api", "GET:/api/alerts"),
    ("GET", "/api/alerts/da637551227677560813_-961444813", "mde.api", "GET:/api/alerts/_id_"),
    ("PATCH", "/api/alerts/ed637551227677560813_1", "mde.api", "PATCH:/api/alerts/_id_"),
    ("GET", f"/api/machineactions/{GUID}", "mde.api", "GET:/api/machineactions/_id_"),
    ("GET", "/api/indicators", "mde.api", "GET:/api/indicators"),
    ("POST", "/api/indicators", "mde.api", "POST:/api/indicators"),
    ("DELETE", "/api/indicators/995", "mde.api", "DELETE:/api/indicators/_id_"),
    ("GET", f"/api/files/{MACHINE}", "mde.api", "GET:/api/files/_id_"),
    ("GET", f"/api/files/{MACHINE}/stats", "mde.api", "GET:/api/files/_id_/stats"),
    ("GET", "/api/domains/contoso.com/machines", "mde.api", "GET:/api/domains/_id_/machines"),
    ("GET", "/api/ips/10.0.0.1/stats", "mde.api", "GET:/api/ips/_id_/stats"),
    ("GET", "/api/vulnerabilities/CVE-2019-0608", "mde.api", "GET:/api/vulnerabilities/_id_"),
    ("GET", "/api/Software/microsoft-_-edge", "mde.api", "GET:/api/software/_id_"),
    ("GET", "/api/users/jdoe/machines", "mde.api", "GET:/api/users/_id_/machines"),
    (
        "GET",
        "/api/machines/findbyip(ip='10.1.1.1',timestamp=2019-09-22T08:44:05Z)",
        "mde.api",
        "GET:/api/machines/findbyip_args_",
    ),
    ("POST", "/api/incidents/924565/comments", "mde.api", "POST:/api/incidents/_id_/comments"),
    ("GET", "/api/machines/SoftwareVulnerabilitiesExport", "mde.export.files", ""),
    ("GET", "/api/machines/SoftwareVulnerabilitiesByMachine", "mde.export", ""),
    ("GET", "/api/deviceavinfo", "mde.export", ""),
]

GRAPH_CASES = [
    ("POST", "/v1.0/security/runHuntingQuery", "graph.hunting"),
    ("GET", "/v1.0/security/tiIndicators", "graph.ti-indicators"),
    ("POST", "/v1.0/security/tiIndicators/submitTiIndicators", "graph.ti-indicators"),
    ("DELETE", "/v1.0/security/tiIndicators/ti-1", "graph.ti-indicators"),
    ("GET", "/v1.0/security/alerts_v2", "graph.security"),
    ("GET", "/v1.0/security/secureScores", "graph.security"),
    ("POST", "/v1.0/security/securityActions", "graph.security"),
    ("GET", "/beta/security/runHuntingQuery", "graph.security"),
    ("POST", "/beta/security/runHuntingQuery", "graph.hunting"),
]


def test_the_hosts_are_the_documented_ones() -> None:
    assert set(HOSTS) == DEFENDER_HOSTS
    assert {"graph.microsoft.com"} == GRAPH_HOSTS


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize(("method", "path", "api", "key"), DEFENDER_CASES)
def test_defender_endpoint(method: str, path: str, api: str, key: str, host: str) -> None:
    found = RouteTable().match(method, host, path)
    assert found == RouteMatch(api, key)
    assert found.key == "" or KEY_PATTERN.match(found.key)


@pytest.mark.parametrize(("method", "path", "api"), GRAPH_CASES)
def test_graph_endpoint(method: str, path: str, api: str) -> None:
    assert RouteTable().match(method, "graph.microsoft.com", path) == RouteMatch(api, "")


@pytest.mark.parametrize(
    ("method", "host", "path"),
    [
        ("GET", "example.com", "/api/incidents"),
        ("GET", "graph.microsoft.com", "/v1.0/me"),
        ("GET", "api.security.microsoft.com", "/healthz"),
        ("GET", "login.microsoftonline.com", "/contoso/oauth2/v2.0/token"),
        ("GET", "graph.microsoft.com", "/api/incidents"),
        # JSON batching: one request holding up to 20, each throttled on its own resource
        ("POST", "graph.microsoft.com", "/v1.0/$batch"),
        ("POST", "graph.microsoft.com", "/beta/%24batch"),
    ],
)
def test_unrouted(method: str, host: str, path: str) -> None:
    assert RouteTable().match(method, host, path) is None


def test_matching_ignores_case_and_trailing_slash() -> None:
    table = RouteTable()
    assert table.match("post", "API.Security.Microsoft.com", "/API/AdvancedHunting/Run/") == (
        "m365d.advanced-hunting",
        "",
    )


def test_machine_id_key_is_one_spelling() -> None:
    upper = RouteTable().match("POST", HOSTS[0], f"/api/machines/{MACHINE.upper()}/runliveresponse")
    assert upper == RouteMatch("mde.live-response", MACHINE)


def test_key_stays_valid_for_odd_paths() -> None:
    weird = "/api/files/my file{1}.exe/" + "segment/" * 60
    found = RouteTable().match("GET", HOSTS[0], weird)
    assert found is not None and KEY_PATTERN.match(found.key)


def test_user_routes_come_before_the_defaults() -> None:
    table = RouteTable([Route("custom.incidents", "/api/incidents/**", hosts=DEFENDER_HOSTS)])
    table.add(Route("custom.other", "/api/other", {"GET"}))
    assert table.match("GET", HOSTS[0], "/api/incidents/1") == ("custom.incidents", "")
    assert table.match("GET", "anything.example", "/api/other") == ("custom.other", "")
    assert table.match("POST", HOSTS[0], "/api/advancedqueries/run") == (
        "mde.advanced-hunting",
        "",
    )
    assert len(table) == len(DEFENDER_ROUTES) + 2


def test_table_without_defaults() -> None:
    table = RouteTable([Route("svc", "/v2/{tenant}/jobs/{job}", key="{tenant}:{job}")], defaults=())
    assert table.match("GET", "x", "/v2/Contoso/jobs/42") == ("svc", "contoso:42")
    assert table.match("GET", HOSTS[0], "/api/incidents") is None


def test_endpoint_key_template() -> None:
    assert endpoint_key("get", f"/api/machines/{GUID}/alerts") == "GET:/api/machines/_id_/alerts"
    assert endpoint_key("GET", "/api/users/jdoe", ids={2}) == "GET:/api/users/_id_"


def test_key_template_must_name_captures() -> None:
    with pytest.raises(ValueError, match="machine"):
        Route("x", "/api/machines/{id}", key="{machine}")
    assert Route("x", "/api/**", key=ENDPOINT).match("GET", "h", "/api/a/1") == (
        "x",
        "GET:/api/a/_id_",
    )


# -- paths as SDKs send them ----------------------------------------------------------------

SDK_PATHS = [
    # msgraph-sdk posts the qualified action name; with a base URL, after an empty segment.
    ("POST", "/v1.0/security/microsoft.graph.security.runHuntingQuery", "graph.hunting"),
    ("POST", "/v1.0//security/microsoft.graph.security.runHuntingQuery", "graph.hunting"),
    ("POST", "/beta/security/microsoft.graph.security.runHuntingQuery", "graph.hunting"),
    ("POST", "/V1.0/Security/Microsoft.Graph.Security.RunHuntingQuery", "graph.hunting"),
    ("GET", "/v1.0//security/alerts_v2", "graph.security"),
    ("GET", "/v1.0/security/alerts%5Fv2/da637", "graph.security"),
    ("GET", "/v1.0/security/./incidents", "graph.security"),
    (
        "POST",
        "/beta/security/tiIndicators/microsoft.graph.submitTiIndicators",
        "graph.ti-indicators",
    ),
    (
        "POST",
        "/beta/security/tiIndicators/microsoft.graph.deleteTiIndicators",
        "graph.ti-indicators",
    ),
    (
        "POST",
        "/v1.0/security/cases/ediscoveryCases/7/microsoft.graph.security.close",
        "graph.security",
    ),
]


@pytest.mark.parametrize(("method", "path", "api"), SDK_PATHS)
def test_graph_paths_as_sdks_send_them(method: str, path: str, api: str) -> None:
    assert RouteTable().match(method, "graph.microsoft.com", path) == RouteMatch(api, "")


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        (
            "/v1.0//security/microsoft.graph.security.runHuntingQuery",
            "/v1.0/security/runHuntingQuery",
        ),
        ("//api///incidents/", "/api/incidents"),
        ("/api/files/my%20file.exe", "/api/files/my file.exe"),
        ("/api/./machines", "/api/machines"),
        ("/v1.0/security/microsoft.graph.", "/v1.0/security/microsoft.graph."),
        ("/", "/"),
    ],
)
def test_normalise_path(path: str, normal: str) -> None:
    assert normalise_path(path) == normal


def test_defender_paths_with_empty_segments_and_encoding() -> None:
    table = RouteTable()
    host = HOSTS[0]
    assert table.match("GET", host, "//api//incidents") == RouteMatch("m365d.incidents", "")
    assert table.match("POST", host, f"/api/machines/{MACHINE}/runLiveResponse%2F") == RouteMatch(
        "mde.live-response", MACHINE
    )
    assert table.match("GET", host, "/api/machines/SoftwareVulnerabilities%45xport") == RouteMatch(
        "mde.export.files", ""
    )


def test_version_segments_are_names_in_endpoint_keys() -> None:
    assert endpoint_key("GET", "/v1.0/me") == "GET:/v1.0/me"
    assert endpoint_key("GET", f"/beta/users/{GUID}") == "GET:/beta/users/_id_"


def test_known_hosts_are_the_tables_and_microsofts() -> None:
    table = RouteTable([Route("svc", "/jobs", hosts={"Svc.Example"})], defaults=())
    assert table.hosts() == DEFENDER_HOSTS | GRAPH_HOSTS | {"svc.example"}


def route_table_markdown() -> str:
    """The route table as the README shows it."""
    rows = ["| methods | hosts | path | api | key |", "|---|---|---|---|---|"]
    for route in DEFENDER_ROUTES:
        methods = ", ".join(sorted(route.methods)) or "any"
        hosts = "Defender" if route.hosts == DEFENDER_HOSTS else "Graph"
        key = f"`{route.key}`" if route.key else ""
        rows.append(f"| {methods} | {hosts} | `{route.path}` | `{route.api}` | {key} |")
    return "\n".join(rows)


def test_the_readme_shows_the_route_table() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert route_table_markdown() in readme
