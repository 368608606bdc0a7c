"""Which quota (api, key) an upstream request counts against.

Microsoft counts each endpoint of an app+tenant separately, so the route table maps a
request's (method, host, path) to the api of the catalog and, where the api is counted
per key, to a key: the machine id for live response, the endpoint for `mde.api`. Routes
are tried in order, first match wins; a user's routes come before the defaults. The
hosts and the default routes are those of `coordinator/defender.md`, "Endpoints and hosts".

Path patterns: `{name}` matches one segment and captures it, `*` matches within one
segment, `**` matches any number of segments. Matching ignores case, as the Defender
APIs do, and reads a path as the upstream does (`normalise_path`): percent-encoding
decoded, empty and `.` segments dropped (an SDK with a base URL ending in `/` sends
`/v1.0//security/...`), and Graph's qualified names unqualified: the Graph SDK posts to
`/v1.0/security/microsoft.graph.security.runHuntingQuery`, which Graph also serves as
`/v1.0/security/runHuntingQuery`, so one route holds both.

A key template is `""` (no key), `ENDPOINT` (method and path template, ids replaced by
`_id_`), or text with `{name}` captures (`"{id}"`).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple
from urllib.parse import unquote

from .policy_core import KEY_PATTERN as KEY_PATTERN  # the coordinator's, re-exported

DEFENDER_HOSTS = frozenset(
    {
        "api.security.microsoft.com",
        "us.api.security.microsoft.com",
        "eu.api.security.microsoft.com",
        "uk.api.security.microsoft.com",
        "au.api.security.microsoft.com",
        "swa.api.security.microsoft.com",
        "api.securitycenter.microsoft.com",
        "api.securitycenter.windows.com",
    }
)
GRAPH_HOSTS = frozenset({"graph.microsoft.com"})

ENDPOINT = "{endpoint}"
ID_PLACEHOLDER = "_id_"
ARGS_PLACEHOLDER = "_args_"

_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:@/-]")
_CAPTURE = re.compile(r"\{(\w+)\}")
# Endpoint names are letters (`runliveresponse`, `SoftwareInventoryByMachine`); ids have
# digits (GUIDs, hashes, numbers, `da637…` alert ids, CVEs), dots (domains, IPs, file
# names), `@` (UPNs) or the `-_-` of software ids.
_NAME = re.compile(r"[A-Za-z][A-Za-z_-]*")
_HEX_ID = re.compile(r"[0-9A-Fa-f]{16,}")
_VERSION = re.compile(r"v\d+(?:\.\d+)?", re.IGNORECASE)  # `v1.0` of Graph: a name, not an id
# OData function calls such as `findbyip(ip='10.1.1.1',timestamp=...)`.
_CALL = re.compile(r"([A-Za-z][A-Za-z_-]*)\(.*\)")
# The namespace of a qualified OData action or function: `microsoft.graph.security.`,
# `microsoft.graph.` (`.../tiIndicators/microsoft.graph.submitTiIndicators`).
_NAMESPACE = re.compile(r"microsoft\.graph\.(?:[A-Za-z]\w*\.)*(?=[A-Za-z])", re.IGNORECASE)
# What `normalise_path` changes; most paths have none of it and are taken as they are.
_ODD = re.compile(r"//|%|/\.(?:/|$)|microsoft\.graph\.", re.IGNORECASE)


class RouteMatch(NamedTuple):
    api: str
    key: str


def safe_key(text: str) -> str:
    """`text` made valid under the coordinator's key pattern (empty if nothing is left)."""
    text = _KEY_BAD_CHARS.sub("-", text)
    return re.sub(r"^[^A-Za-z0-9]+", "", text)[:256]


def normalise_path(path: str) -> str:
    """`path` (percent-encoded or not, without its query) as the routes read it:
    `/v1.0//security/microsoft.graph.security.runHuntingQuery` is
    `/v1.0/security/runHuntingQuery`."""
    if path.startswith("/") and not _ODD.search(path):
        return path
    segments = (unquote(segment) for segment in path.split("/"))
    return "/" + "/".join(
        _NAMESPACE.sub("", segment, count=1) for segment in segments if segment not in ("", ".")
    )


def _template_segment(segment: str) -> str:
    if _VERSION.fullmatch(segment):
        return segment.lower()
    if _NAME.fullmatch(segment) and "-_-" not in segment and not _HEX_ID.fullmatch(segment):
        return segment.lower()
    call = _CALL.fullmatch(segment)
    if call is not None:
        return call.group(1).lower() + ARGS_PLACEHOLDER
    return ID_PLACEHOLDER


def endpoint_key(method: str, path: str, ids: Collection[int] = ()) -> str:
    """`GET:/api/machines/_id_/alerts`: the method and the path with its ids replaced.

    `ids` are segment positions (0 = first after the leading slash) known to be ids.
    """
    segments = path.strip("/").split("/")
    template = "/".join(
        ID_PLACEHOLDER if i in ids else _template_segment(seg) for i, seg in enumerate(segments)
    )
    return safe_key(f"{method.upper()}:/{template}")


def _compile(pattern: str) -> re.Pattern[str]:
    parts: list[str] = []
    for segment in pattern.strip("/").split("/"):
        if segment == "**":
            parts.append(r"(?:/[^/]+)*")
            continue
        pieces = re.split(r"(\{\w+\}|\*)", segment)
        parts.append(
            "/"
            + "".join(
                "[^/]*"
                if piece == "*"
                else f"(?P<{piece[1:-1]}>[^/]+)"
                if _CAPTURE.fullmatch(piece)
                else re.escape(piece)
                for piece in pieces
            )
        )
    return re.compile("".join(parts) + "/?", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Route:
    """Requests matching `methods` (empty: any), `hosts` (empty: any) and `path` count
    against `api` with the key built from the `key` template."""

    api: str
    path: str
    methods: Collection[str] = ()
    hosts: Collection[str] = ()
    key: str = ""
    _regex: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        object.__setattr__(self, "hosts", frozenset(h.lower() for h in self.hosts))
        regex = _compile(self.path)
        object.__setattr__(self, "_regex", regex)
        if self.key != ENDPOINT:
            missing = set(_CAPTURE.findall(self.key)) - set(regex.groupindex)
            if missing:
                raise ValueError(f"key {self.key!r} names {sorted(missing)} not in {self.path!r}")

    def match(self, method: str, host: str, path: str) -> RouteMatch | None:
        """(api, key) when the request matches, else None; `path` as `normalise_path` reads."""
        return self.match_normal(method, host, normalise_path(path))

    def match_normal(self, method: str, host: str, path: str) -> RouteMatch | None:
        """`match` of a path that `normalise_path` gave."""
        if self.methods and method.upper() not in self.methods:
            return None
        if self.hosts and host.lower() not in self.hosts:
            return None
        found = self._regex.fullmatch(path)
        if found is None:
            return None
        if self.key == ENDPOINT:
            # Captured segments are ids even when they look like names (user names).
            ids = {path.count("/", 0, found.start(name)) - 1 for name in self._regex.groupindex}
            return RouteMatch(self.api, endpoint_key(method, path, ids))
        # Ids are case-blind upstream; one spelling keeps one counter.
        key = _CAPTURE.sub(lambda ref: found.group(ref.group(1)).lower(), self.key)
        return RouteMatch(self.api, safe_key(key))


def _defender(api: str, path: str, methods: Collection[str] = (), key: str = "") -> Route:
    return Route(api, path, methods, DEFENDER_HOSTS, key)


def _graph(api: str, path: str, methods: Collection[str] = ()) -> tuple[Route, ...]:
    return tuple(
        Route(api, f"/{version}{path}", methods, GRAPH_HOSTS) for version in ("v1.0", "beta")
    )


DEFENDER_ROUTES: tuple[Route, ...] = (
    _defender("m365d.incidents", "/api/incidents", {"GET", "PATCH"}),
    _defender("m365d.incidents", "/api/incidents/{id}", {"GET", "PATCH"}),
    _defender("m365d.advanced-hunting", "/api/advancedhunting/run", {"POST"}),
    _defender("mde.advanced-hunting", "/api/advancedqueries/run", {"POST"}),
    _defender("mde.live-response", "/api/machines/{id}/runliveresponse", {"POST"}, "{id}"),
    _defender("mde.alerts.batch-update", "/api/alerts/batchUpdate", {"POST"}),
    _defender("mde.alerts.create", "/api/alerts/createAlertByReference", {"POST"}),
    _defender("mde.indicators.import", "/api/indicators/import", {"POST"}),
    _defender("mde.indicators.batch-delete", "/api/indicators/BatchDelete", {"POST"}),
    _defender("mde.package-sas", "/api/**/GetPackageUri", {"GET"}),
    # Exports: `...Export` hands out files, `...ByMachine` and `deviceavinfo` pages JSON.
    _defender("mde.export.files", "/api/machines/*Export", {"GET"}),
    _defender("mde.export", "/api/machines/*ByMachine", {"GET"}),
    _defender("mde.export", "/api/deviceavinfo", {"GET"}),
    # User ids can be all letters; the segment heuristic would take them for names.
    _defender("mde.api", "/api/users/{id}/**", key=ENDPOINT),
    _defender("mde.api", "/api/**", key=ENDPOINT),
    *_graph("graph.hunting", "/security/runHuntingQuery", {"POST"}),
    *_graph("graph.ti-indicators", "/security/tiIndicators/**"),
    *_graph("graph.security", "/security/**"),
)


class RouteTable:
    """User routes (in the order given or added), then `defaults`."""

    def __init__(
        self, routes: Iterable[Route] = (), *, defaults: Iterable[Route] = DEFENDER_ROUTES
    ) -> None:
        self._routes = list(routes)
        self._defaults = tuple(defaults)

    def add(self, route: Route) -> Route:
        """Add `route` after the earlier user routes and before every default."""
        self._routes.append(route)
        return route

    def __iter__(self) -> Iterator[Route]:
        yield from self._routes
        yield from self._defaults

    def __len__(self) -> int:
        return len(self._routes) + len(self._defaults)

    def hosts(self) -> frozenset[str]:
        """Every host a route names, with the Defender and Graph hosts: where a request
        that no route matches is a miss worth telling (`unrouted=`)."""
        return frozenset().union(DEFENDER_HOSTS, GRAPH_HOSTS, *(r.hosts for r in self))

    def match(self, method: str, host: str, path: str) -> RouteMatch | None:
        """(api, key) of the first matching route, or None for an unrouted request."""
        return self.match_normal(method, host, normalise_path(path))

    def match_normal(self, method: str, host: str, path: str) -> RouteMatch | None:
        """`match` of a path that `normalise_path` gave."""
        for route in self:
            found = route.match_normal(method, host, path)
            if found is not None:
                return found
        return None
