"""Hostile clients against HTTP API v1, through real HTTP (uvicorn on a free port).

- the service's own OpenAPI schema, fuzzed by schemathesis: no 5xx, every reply documented;
- hostile input: each request gets a clear 4xx with a JSON `{"error", "detail"}` body and
  changes nothing, neither what `/v1/usage` reports nor a single byte in Redis;
- isolation: a token reaches only its own tenants, lease ids cannot be guessed or
  re-aimed, tokens are compared in constant time and never logged.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import pytest
import redis
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from quotagate.coordinator import auth
from quotagate.coordinator.app import create_app
from quotagate.coordinator.auth import Authorizer
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.errors import Unauthorized
from quotagate.coordinator.index import is_index_key
from quotagate.coordinator.leases import LeaseRef
from quotagate.coordinator.settings import Settings

from .conftest import _wipe
from .service import serve_in_thread

pytestmark = pytest.mark.server

POLICIES = """
margin: 0
apis:
  fast:
    lease_ttl: 2s
    limits: [{calls: 20, per: 1s, granularity: 100ms}]
  sessions:
    lease_ttl: 1m
    limits:
      - {calls: 100, per: 1s, granularity: 100ms}
      - {concurrent: 2}
      - {concurrent: 1, scope: key}
  slow:                       # exhausted after one call, for about 3 s
    lease_ttl: 1m
    limits: [{calls: 1, per: 3s, granularity: 1s}]
  roomy:
    lease_ttl: 1m
    limits: [{calls: 100000, per: 1s, granularity: 100ms}]
  perkey:
    lease_ttl: 1m
    limits: [{calls: 1, per: 1m, scope: key}, {concurrent: 1, scope: key}]
"""
INCIDENTS = "m365d.incidents"  # built-in catalog: 50 calls per minute, leases live 60 s
MAX_WAIT = 0.5
TOKENS = {
    "contoso-token-6f1c0d9e8b7a": ["contoso/*"],
    "fabrikam-token-3a4b5c6d7e8f": ["fabrikam/*"],
    "admin-token-0f9e8d7c6b5a4": ["*"],
}
CONTOSO, FABRIKAM, ADMIN = (f"Bearer {token}" for token in TOKENS)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(valkey_server: EmbeddedServer) -> Iterator[redis.Redis]:
    """The store, wiped once: this module's coordinators share it (and its epoch), and
    every test works on tenants of its own."""
    _wipe(valkey_server.url)
    client = redis.Redis.from_url(valkey_server.url)
    yield client
    client.close()


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("hostile") / "policies.yaml"
    path.write_text(POLICIES)
    return path


def _settings(valkey_server: EmbeddedServer, policy_file: Path, **overrides: Any) -> Settings:
    return Settings(redis_url=valkey_server.url, policies=policy_file, **overrides)


@pytest.fixture(scope="module")
def base_url(valkey_server: EmbeddedServer, store: redis.Redis, policy_file: Path) -> Iterator[str]:
    """An open coordinator (no tokens) that holds an acquire for at most MAX_WAIT s."""
    with serve_in_thread(
        create_app(_settings(valkey_server, policy_file, max_wait=MAX_WAIT))
    ) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        yield client


@pytest.fixture(scope="module")
def secured_url(
    valkey_server: EmbeddedServer, store: redis.Redis, policy_file: Path
) -> Iterator[str]:
    with serve_in_thread(create_app(_settings(valkey_server, policy_file, tokens=TOKENS))) as url:
        yield url


@pytest.fixture
def secured(secured_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secured_url, timeout=10) as client:
        yield client


def fresh_tenant(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def held(http: httpx.Client) -> tuple[str, str]:
    """A fresh tenant with one lease in flight on m365d.incidents: (tenant, lease id)."""
    tenant = fresh_tenant()
    reply = http.post("/v1/leases", json={"tenant": tenant, "api": INCIDENTS})
    assert reply.status_code == 200, reply.text
    return tenant, reply.json()["lease_id"]


# --- helpers ------------------------------------------------------------------------------


def snapshot(store: redis.Redis) -> dict[Any, Any]:
    """Every key and its serialized value (DUMP): any write shows up as a difference. The
    fleet index is left out: its background writer records requests that came before."""
    keys = [key for key in store.keys("*") if not is_index_key(key)]
    with store.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.dump(key)
        dumped = pipe.execute()
    return {key: value for key, value in zip(keys, dumped, strict=True) if value is not None}


def seen_by_usage(http: httpx.Client, tenant: str, api: str = INCIDENTS, **headers: str) -> Any:
    """What /v1/usage reports, without the countdowns that move with the clock."""
    reply = http.get(f"/v1/usage/{tenant}/{api}", headers=headers)
    assert reply.status_code == 200, reply.text
    usage = reply.json()
    for limit in usage["limits"]:
        del limit["resets_in"]
    return usage


@contextmanager
def nothing_changes(
    store: redis.Redis, http: httpx.Client, *tenants: str, **headers: str
) -> Iterator[None]:
    """The block writes nothing to Redis and changes nothing that usage reports for
    `tenants`. Keys of earlier tests may vanish meanwhile as their TTLs run out; no key
    may appear or change, and no key of `tenants` may vanish."""
    before, views = snapshot(store), [seen_by_usage(http, t, **headers) for t in tenants]
    yield
    assert [seen_by_usage(http, t, **headers) for t in tenants] == views
    after = snapshot(store)
    assert set(after) <= set(before), set(after) - set(before)
    assert {key: before[key] for key in after} == after
    for tenant in tenants:
        tagged = {key for key in before if f"{{{tenant}|".encode() in key}
        assert tagged <= set(after), tagged - set(after)


def refused(
    reply: httpx.Response, status: int, error: str | None = None, field: str | None = None
) -> dict[str, Any]:
    """A clear refusal: the status, a JSON body with a code and a sentence (and the field)."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    body: dict[str, Any] = reply.json()
    assert isinstance(body["error"], str) and body["error"]
    assert isinstance(body["detail"], str) and body["detail"]
    if error is not None:
        assert body["error"] == error, body
    if field is not None:
        assert body["field"] == field, body
    return body


def scope_part(tenant: str, api: str, key: str = "") -> str:
    return base64.urlsafe_b64encode(f"{tenant}|{api}|{key}".encode()).decode().rstrip("=")


def post_json(http: httpx.Client, path: str, text: str | bytes, **headers: str) -> httpx.Response:
    return http.post(path, content=text, headers={"content-type": "application/json", **headers})


# --- 1. the OpenAPI schema, fuzzed -------------------------------------------------------------

SCHEMA = schemathesis.openapi.from_dict(
    create_app(Settings(redis_url="redis://127.0.0.1:9")).openapi()
)
CHECKS = [
    not_a_server_error,  # no 5xx, ever
    status_code_conformance,  # every status is documented
    content_type_conformance,
    response_schema_conformance,  # every body matches its documented model
    response_headers_conformance,  # Retry-After, where documented
    negative_data_rejection,  # what the schema forbids gets a 4xx
]
KNOWN_APIS = ("m365d.incidents", "fast", "sessions", "slow")
FUZZ_SEEN: collections.Counter[tuple[str, str, int]] = collections.Counter()
_fuzz_tenants = itertools.count()


@pytest.fixture(scope="module")
def fuzzed(valkey_server: EmbeddedServer, store: redis.Redis, policy_file: Path) -> Iterator[str]:
    """An open coordinator that never holds a request (max_wait 0)."""
    with serve_in_thread(create_app(_settings(valkey_server, policy_file, max_wait=0.0))) as url:
        yield url


def _realistic(case: schemathesis.Case, url: str) -> None:
    """Aim most valid cases at real apis and live leases, so that 200 and 429 replies are
    checked too, not only 404s for made-up names."""
    if case.meta is None or not case.meta.generation.mode.is_positive:
        return
    if case.path == "/v1/leases" and isinstance(case.body, dict):
        case.body["api"] = KNOWN_APIS[len(str(case.body.get("tenant"))) % len(KNOWN_APIS)]
        if case.body["api"] == "slow":  # one call per 3 s, on one tenant: 429 after the first
            case.body["tenant"] = "fuzz-slow"
    elif case.path.startswith("/v1/leases/") and len(str(case.path_parameters["lease_id"])) % 3:
        tenant = f"fuzz-{next(_fuzz_tenants)}"
        lease = httpx.post(f"{url}/v1/leases", json={"tenant": tenant, "api": INCIDENTS})
        case.path_parameters["lease_id"] = lease.json()["lease_id"]


@SCHEMA.parametrize()
@hypothesis.settings(max_examples=40, deadline=None)
def test_the_openapi_schema_holds_under_fuzzing(case: schemathesis.Case, fuzzed: str) -> None:
    _realistic(case, fuzzed)
    reply = case.call_and_validate(base_url=fuzzed, checks=CHECKS, timeout=10)
    FUZZ_SEEN[case.method, case.path, reply.status_code] += 1


def test_the_fuzzing_reached_grants_denials_and_releases() -> None:
    if not FUZZ_SEEN:
        pytest.skip("runs after test_the_openapi_schema_holds_under_fuzzing")
    for expected in (
        ("POST", "/v1/leases", 200),
        ("POST", "/v1/leases", 429),
        ("POST", "/v1/leases", 422),
        ("POST", "/v1/leases/{lease_id}/release", 200),
        ("POST", "/v1/leases/{lease_id}/release", 404),
        ("POST", "/v1/leases/{lease_id}/renew", 200),
        ("GET", "/v1/usage/{tenant}/{api}", 422),
    ):
        assert FUZZ_SEEN[expected], (expected, FUZZ_SEEN)


def test_every_error_reply_is_documented_with_the_error_body() -> None:
    schema = create_app(Settings(redis_url="redis://127.0.0.1:9")).openapi()
    models = schema["components"]["schemas"]
    assert "HTTPValidationError" not in models  # FastAPI's 422 shape is not what we send
    assert {"error", "detail"} <= set(models["ErrorReply"]["required"])
    acquire = schema["paths"]["/v1/leases"]["post"]["responses"]
    assert set(acquire) == {"200", "400", "401", "403", "404", "413", "422", "429", "503"}
    assert "Retry-After" in acquire["429"]["headers"]
    assert acquire["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/InvalidReply")


# --- 2. bodies: size, shape, encoding -----------------------------------------------------


def _route(path: str, lease: str) -> str:
    return path.format(lease=lease)


BODY_ROUTES = [
    ("/v1/leases", None),
    ("/v1/leases/{lease}/release", '{"outcome": "not_called"}'),
    ("/v1/leases/{lease}/renew", '{"ttl": 3600}'),
]


@pytest.mark.parametrize(("path", "valid"), BODY_ROUTES, ids=["acquire", "release", "renew"])
@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
def test_an_oversized_body_is_413_and_never_acted_on(
    http: httpx.Client,
    store: redis.Redis,
    held: tuple[str, str],
    path: str,
    valid: str | None,
    streamed: bool,
) -> None:
    tenant, lease = held
    text = valid or json.dumps({"tenant": tenant, "api": INCIDENTS})
    # Valid JSON that would be acted on if read: the padding is whitespace.
    content = text.encode() + b" " * 70_000

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(content), 8192):
            yield content[start : start + 8192]

    with nothing_changes(store, http, tenant):
        reply = http.post(
            _route(path, lease),
            content=chunks() if streamed else content,
            headers={"content-type": "application/json"},
        )
        body = refused(reply, 413, "body_too_large")
        assert "65536" in body["detail"]
    assert ("content-length" in reply.request.headers) is not streamed


def test_a_streamed_body_within_the_limit_is_read(http: httpx.Client) -> None:
    tenant = fresh_tenant()

    def chunks() -> Iterator[bytes]:
        yield f'{{"tenant": "{tenant}", '.encode()
        yield f'"api": "{INCIDENTS}"}}'.encode() + b" " * 60_000

    reply = http.post("/v1/leases", content=chunks(), headers={"content-type": "application/json"})
    assert reply.status_code == 200, reply.text
    assert "content-length" not in reply.request.headers


NESTED = 10_000
MALFORMED = {
    "nested arrays": (b"[" * NESTED + b"]" * NESTED, 400, "invalid_body", None),
    "nested objects": (b'{"a":' * 5_000 + b"1" + b"}" * 5_000, 400, "invalid_body", None),
    "nested in a field": (
        b'{"tenant": "t", "api": "fast", "priority": ' + b"[" * NESTED + b"]" * NESTED + b"}",
        400,
        "invalid_body",
        None,
    ),
    "invalid utf-8": (b'{"tenant": "\xff\xfe", "api": "fast"}', 400, "invalid_body", None),
    "overlong utf-8 slash": (b'{"tenant": "a\xc0\xafb", "api": "fast"}', 400, "invalid_body", None),
    "utf-8 surrogate": (
        b'{"tenant": "a\xed\xa0\x80", "api": "fast"}',
        422,
        "invalid_request",
        "tenant",
    ),
    "number of 5000 digits": (
        b'{"tenant": "t", "api": "fast", "cost": ' + b"9" * 5000 + b"}",
        400,
        "invalid_body",
        None,
    ),
    "number of 4000 digits": (
        b'{"tenant": "t", "api": "fast", "cost": ' + b"9" * 4000 + b"}",
        422,
        "invalid_request",
        "cost",
    ),
    "not json": (b"hello", 422, "invalid_request", "body"),
    "truncated": (b'{"tenant": "t", "api": ', 422, "invalid_request", "body"),
    "nul byte": (b"\x00", 422, "invalid_request", "body"),
    "empty": (b"", 422, "invalid_request", "body"),
    "null": (b"null", 422, "invalid_request", "body"),
    "a string": (b'"tenant"', 422, "invalid_request", "body"),
    "top-level array": (
        json.dumps([0] * 30_000, separators=(",", ":")).encode(),
        422,
        "invalid_request",
        "body",
    ),
    "huge array in a field": (
        json.dumps({"tenant": "t", "api": "fast", "priority": [0] * 20_000}).encode(),
        422,
        "invalid_request",
        "priority",
    ),
    "lone surrogate escape": (
        b'{"tenant": "\\ud800", "api": "fast"}',
        422,
        "invalid_request",
        "tenant",
    ),
}


@pytest.mark.parametrize(
    ("content", "status", "error", "field"), MALFORMED.values(), ids=list(MALFORMED)
)
def test_a_malformed_acquire_body_is_a_clear_4xx(
    http: httpx.Client,
    store: redis.Redis,
    content: bytes,
    status: int,
    error: str,
    field: str | None,
) -> None:
    assert len(content) < 65_536
    with nothing_changes(store, http, "t"):
        refused(post_json(http, "/v1/leases", content), status, error, field)


@pytest.mark.parametrize("action", ["release", "renew"])
@pytest.mark.parametrize(
    "content",
    [b"[" * NESTED + b"]" * NESTED, b'{"outcome": "\xff"}', b"not json", b"[]"],
    ids=["nested", "invalid utf-8", "not json", "array"],
)
def test_a_malformed_release_or_renew_body_leaves_the_lease_alone(
    http: httpx.Client, store: redis.Redis, held: tuple[str, str], action: str, content: bytes
) -> None:
    tenant, lease = held
    with nothing_changes(store, http, tenant):
        reply = post_json(http, f"/v1/leases/{lease}/{action}", content)
        assert reply.status_code in (400, 422)
        refused(reply, reply.status_code)


@pytest.mark.parametrize(
    ("headers", "kwargs"),
    [
        ({"content-type": "text/plain"}, {"content": "{body}"}),
        ({"content-type": "application/xml"}, {"content": "<lease tenant='{tenant}'/>"}),
        (
            {"content-type": "application/x-www-form-urlencoded"},
            {"content": "tenant={tenant}&api=fast"},
        ),
        ({}, {"files": {"tenant": "{tenant}", "api": "fast"}}),  # multipart/form-data
        ({}, {"content": "{body}"}),  # no content type at all
        ({"content-type": "json"}, {"content": "{body}"}),
    ],
    ids=["text", "xml", "form", "multipart", "none", "bare-json"],
)
def test_a_body_that_is_not_declared_json_grants_nothing(
    http: httpx.Client, store: redis.Redis, headers: dict[str, str], kwargs: dict[str, Any]
) -> None:
    tenant = fresh_tenant()
    body = json.dumps({"tenant": tenant, "api": "fast"})
    filled = {
        name: (
            {k: v.format(tenant=tenant) for k, v in value.items()}
            if isinstance(value, dict)
            else value.replace("{body}", body).replace("{tenant}", tenant)
        )
        for name, value in kwargs.items()
    }
    with nothing_changes(store, http, tenant):
        reply = http.post("/v1/leases", headers=headers, **filled)
        refused(reply, 422, "invalid_request", "body")


# --- 3. names: unicode tricks, hash tags, lengths -------------------------------------------

TRICKS = {
    "fullwidth": "\uff43ontoso/app-1",  # fullwidth c
    "homoglyph": "\u0441ontoso/app-1",  # Cyrillic es
    "zero-width joiner": "con\u200dtoso/app-1",
    "zero-width space": "contoso\u200b/app-1",
    "rtl override": "\u202econtoso/app-1",
    "combining accent": "contoso\u0301/app-1",
    "nul": "contoso\x00/app-1",
    "newline": "contoso/app-1\n",
    "percent-encoded slash": "contoso%2Fapp-1",
    "dot-dot": "..",
    "leading dot-dot": "../contoso",
    "space": "contoso app",
    "open brace": "contoso{",
    "close brace": "}contoso",
    "hash tag": "{contoso|m365d.incidents}",
    "pipe": "contoso|fast",
    "glob": "contoso/*",
}


@pytest.mark.parametrize("field", ["tenant", "key"])
@pytest.mark.parametrize("value", TRICKS.values(), ids=list(TRICKS))
def test_tricky_tenants_and_keys_are_422_naming_the_field(
    http: httpx.Client, store: redis.Redis, field: str, value: str
) -> None:
    body = {"tenant": "contoso/app-1", "api": "fast", field: value}
    with nothing_changes(store, http, "contoso/app-1"):
        refused(http.post("/v1/leases", json=body), 422, "invalid_request", field)


@pytest.mark.parametrize(
    "api",
    [
        "fast}",
        "{fast}",
        "fast|x",
        "{contoso|fast}",
        "\uff46ast",  # fullwidth f
        "fast\x00",
        "fast\u200b",
        "../fast",
        "FAST",
        "f" * 65,
    ],
)
def test_tricky_api_names_are_422_naming_the_field(
    http: httpx.Client, store: redis.Redis, api: str
) -> None:
    with nothing_changes(store, http, "contoso/app-1"):
        reply = http.post("/v1/leases", json={"tenant": "contoso/app-1", "api": api})
        refused(reply, 422, "invalid_request", "api")


@pytest.mark.parametrize(("field", "longest"), [("tenant", 128), ("key", 256)])
def test_names_one_character_too_long_are_422(
    http: httpx.Client, store: redis.Redis, field: str, longest: int
) -> None:
    base = {"tenant": fresh_tenant(), "api": "roomy"}
    with nothing_changes(store, http):
        too_long = http.post("/v1/leases", json={**base, field: "a" * (longest + 1)})
        refused(too_long, 422, "invalid_request", field)
        refused(http.post("/v1/leases", json={**base, field: "a" * 10_000}), 422, field=field)
    longest_ok = http.post("/v1/leases", json={**base, field: "a" * longest})
    assert longest_ok.status_code == 200, longest_ok.text


USAGE_TRICKS = {
    "fullwidth": ("/v1/usage/%EF%BD%83ontoso/m365d.incidents", 422, "tenant"),
    "homoglyph": ("/v1/usage/%D1%81ontoso/m365d.incidents", 422, "tenant"),
    "zero-width joiner": ("/v1/usage/con%E2%80%8Dtoso/m365d.incidents", 422, "tenant"),
    "rtl override": ("/v1/usage/%E2%80%AEcontoso/m365d.incidents", 422, "tenant"),
    "nul": ("/v1/usage/con%00toso/m365d.incidents", 422, "tenant"),
    "invalid utf-8": ("/v1/usage/con%FFtoso/m365d.incidents", 422, "tenant"),
    "encoded dot-dot": ("/v1/usage/%2E%2E/m365d.incidents", 422, "tenant"),
    "encoded ../..": ("/v1/usage/%2E%2E%2F%2E%2E/m365d.incidents", 422, "tenant"),
    "braces": ("/v1/usage/a%7Bb%7D/m365d.incidents", 422, "tenant"),
    "pipe": ("/v1/usage/a%7Cb/m365d.incidents", 422, "tenant"),
    "129 characters": ("/v1/usage/" + "a" * 129 + "/m365d.incidents", 422, "tenant"),
    "key braces": ("/v1/usage/a/m365d.incidents?key=%7Bx%7D", 422, "key"),
    "key nul": ("/v1/usage/a/m365d.incidents?key=x%00", 422, "key"),
    "key zero-width": ("/v1/usage/a/m365d.incidents?key=x%E2%80%8B", 422, "key"),
    "key 257 characters": ("/v1/usage/a/m365d.incidents?key=" + "k" * 257, 422, "key"),
    "api braces": ("/v1/usage/a/%7Bm365d.incidents%7D", 404, None),
    "api nul": ("/v1/usage/a/m365d.incidents%00", 404, None),
    "api rtl": ("/v1/usage/a/%E2%80%AEm365d.incidents", 404, None),
}


@pytest.mark.parametrize(("path", "status", "field"), USAGE_TRICKS.values(), ids=list(USAGE_TRICKS))
def test_tricky_usage_paths_are_refused_and_read_nothing(
    http: httpx.Client, store: redis.Redis, path: str, status: int, field: str | None
) -> None:
    with nothing_changes(store, http):
        reply = http.get(path)
        if status == 404:
            refused(reply, 404, "unknown_api")
        else:
            refused(reply, status, "invalid_request", field)


def test_an_encoded_slash_in_a_usage_path_names_the_same_tenant(http: httpx.Client) -> None:
    tenant = fresh_tenant("contoso") + "/app-1"
    assert http.post("/v1/leases", json={"tenant": tenant, "api": INCIDENTS}).status_code == 200
    encoded = http.get(f"/v1/usage/{tenant.replace('/', '%2F')}/{INCIDENTS}")
    assert encoded.status_code == 200, encoded.text
    assert encoded.json()["tenant"] == tenant
    assert encoded.json()["in_flight"] == 1


# --- 4. numbers -------------------------------------------------------------------------

ACQUIRE_NUMBERS = [
    ("cost", "NaN"),
    ("cost", "Infinity"),
    ("cost", "1e309"),
    ("cost", "1e20"),
    ("cost", "2.0"),
    ("cost", "true"),
    ("cost", "18446744073709551616"),  # 2**64: no limit could ever grant it
    ("cost", "-9223372036854775809"),
    ("wait", "-Infinity"),
    ("wait", "1e309"),
    ("wait", "-1e-300"),
    ("wait", '"soon"'),
    ("runtime_estimate", "NaN"),
    ("runtime_estimate", "Infinity"),
    ("runtime_estimate", "1e309"),
    ("runtime_estimate", "-0.001"),
    ("runtime_estimate", "604801"),  # beyond a week
    ("runtime_estimate", "1e18"),
]


@pytest.mark.parametrize(("field", "literal"), ACQUIRE_NUMBERS)
def test_hostile_numbers_in_an_acquire_are_422_naming_the_field(
    http: httpx.Client, store: redis.Redis, held: tuple[str, str], field: str, literal: str
) -> None:
    tenant, _ = held
    text = f'{{"tenant": "{tenant}", "api": "{INCIDENTS}", "{field}": {literal}}}'
    with nothing_changes(store, http, tenant):
        refused(post_json(http, "/v1/leases", text), 422, "invalid_request", field)


LEASE_NUMBERS = [
    ("release", "throttled", "retry_after", "NaN"),
    ("release", "throttled", "retry_after", "Infinity"),
    ("release", "throttled", "retry_after", "1e309"),
    ("release", "throttled", "retry_after", "-1e-9"),
    ("release", "throttled", "retry_after", "604801"),
    ("release", "throttled", "retry_after", "1e9"),
    ("release", "ok", "runtime", "NaN"),
    ("release", "ok", "runtime", "-Infinity"),
    ("release", "ok", "runtime", "1e309"),
    ("release", "ok", "runtime", "-1"),
    ("release", "ok", "runtime", "1e9"),
    ("release", "failed", "status_code", "99"),
    ("release", "failed", "status_code", "429.5"),
    ("release", "failed", "status_code", "1e309"),
    ("renew", None, "ttl", "NaN"),
    ("renew", None, "ttl", "Infinity"),
    ("renew", None, "ttl", "1e309"),
    ("renew", None, "ttl", "-1"),
    ("renew", None, "ttl", "0"),
    ("renew", None, "ttl", "86401"),
]


@pytest.mark.parametrize(("action", "outcome", "field", "literal"), LEASE_NUMBERS)
def test_hostile_numbers_in_a_release_or_renew_are_422_and_the_lease_stays(
    http: httpx.Client,
    store: redis.Redis,
    held: tuple[str, str],
    action: str,
    outcome: str | None,
    field: str,
    literal: str,
) -> None:
    tenant, lease = held
    prefix = f'"outcome": "{outcome}", ' if outcome else ""
    with nothing_changes(store, http, tenant):
        reply = post_json(http, f"/v1/leases/{lease}/{action}", f'{{{prefix}"{field}": {literal}}}')
        refused(reply, 422, "invalid_request", field)
    # The lease is still live and the fleet is not paused.
    assert seen_by_usage(http, tenant)["cooldown"] == 0
    assert http.post(f"/v1/leases/{lease}/release", json={"outcome": "ok"}).status_code == 200


@pytest.mark.parametrize("wait", [1e9, 1e308, 86_400.0])
def test_a_huge_wait_is_capped_by_max_wait(http: httpx.Client, wait: float) -> None:
    body = {"tenant": fresh_tenant(), "api": "slow"}
    assert http.post("/v1/leases", json=body).status_code == 200
    started = time.monotonic()
    reply = http.post("/v1/leases", json={**body, "wait": wait}, timeout=5)
    elapsed = time.monotonic() - started
    denied = refused(reply, 429, "quota_exhausted")
    # The earliest grant is 2-3 s away: an uncapped wait would answer 200 after it.
    assert denied["retry_after"] > 1.5
    assert elapsed < MAX_WAIT + 1.0


def test_a_huge_wait_with_room_grants_at_once(http: httpx.Client) -> None:
    reply = http.post("/v1/leases", json={"tenant": fresh_tenant(), "api": "slow", "wait": 1e9})
    assert reply.status_code == 200, reply.text
    assert reply.json()["waited"] < 1.0


# --- 5. lease ids -----------------------------------------------------------------------

TOKEN = "0123456789abcdef" * 2
MALFORMED_IDS = {
    "no dot": "abc",
    "empty scope": "." + TOKEN,
    "empty token": scope_part("t", INCIDENTS) + ".",
    "31 hex": scope_part("t", INCIDENTS) + "." + TOKEN[:31],
    "33 hex": scope_part("t", INCIDENTS) + "." + TOKEN + "0",
    "upper hex": scope_part("t", INCIDENTS) + "." + TOKEN.upper(),
    "not hex": scope_part("t", INCIDENTS) + "." + "g" * 32,
    "two dots": scope_part("t", INCIDENTS) + "." + TOKEN + ".x",
    "two parts": base64.urlsafe_b64encode(f"t|{INCIDENTS}".encode()).decode() + "." + TOKEN,
    "four parts": scope_part("t", INCIDENTS, "k|x") + "." + TOKEN,
    "hash tag tenant": scope_part("{t}", INCIDENTS) + "." + TOKEN,
    "nul tenant": scope_part("t\x00", INCIDENTS) + "." + TOKEN,
    "unknown api": scope_part("t", "nope") + "." + TOKEN,
    "not utf-8": base64.urlsafe_b64encode(b"\xff\xfe|x|").decode() + "." + TOKEN,
    "not base64": "!!!!." + TOKEN,
    "padded": base64.urlsafe_b64encode(b"t|m365d.incidents|").decode() + "=." + TOKEN,
    "percent-encoded nul": "%00." + TOKEN,
    "10k characters": "a" * 10_000,
    "10k scope": "a" * 10_000 + "." + TOKEN,
}


@pytest.mark.parametrize("action", ["release", "renew"])
@pytest.mark.parametrize("lease_id", MALFORMED_IDS.values(), ids=list(MALFORMED_IDS))
def test_malformed_lease_ids_are_404_and_change_nothing(
    http: httpx.Client, store: redis.Redis, held: tuple[str, str], action: str, lease_id: str
) -> None:
    tenant, _ = held
    body = {"outcome": "not_called"} if action == "release" else {"ttl": 600}
    with nothing_changes(store, http, tenant):
        refused(http.post(f"/v1/leases/{lease_id}/{action}", json=body), 404, "unknown_lease")


def test_forged_lease_ids_are_404_and_change_nothing(
    http: httpx.Client, store: redis.Redis, held: tuple[str, str]
) -> None:
    tenant, lease = held
    scope, _, token = lease.partition(".")
    other = fresh_tenant()
    assert http.post("/v1/leases", json={"tenant": other, "api": INCIDENTS}).status_code == 200
    forged = [
        f"{scope}.{uuid.uuid4().hex}",  # the right scope, a random token
        f"{scope_part(other, INCIDENTS)}.{token}",  # the real token, another tenant's scope
        f"{scope_part(other, INCIDENTS)}.{uuid.uuid4().hex}",
        f"{scope_part(tenant, 'fast')}.{token}",  # the real token, another api
        f"{scope}.{token[::-1]}",
    ]
    with nothing_changes(store, http, tenant, other):
        for lease_id in forged:
            for action, body in (("release", {"outcome": "not_called"}), ("renew", {"ttl": 600})):
                reply = http.post(f"/v1/leases/{lease_id}/{action}", json=body)
                refused(reply, 404, "unknown_lease")
    assert http.post(f"/v1/leases/{lease}/release", json={"outcome": "ok"}).status_code == 200


def test_a_lease_id_re_scoped_to_another_key_is_404(http: httpx.Client, store: redis.Redis) -> None:
    tenant = fresh_tenant()

    def acquire(key: str) -> httpx.Response:
        return http.post("/v1/leases", json={"tenant": tenant, "api": "perkey", "key": key})

    spent = acquire("k2").json()["lease_id"]  # k2's one call per minute is spent
    assert http.post(f"/v1/leases/{spent}/release", json={"outcome": "ok"}).status_code == 200
    lease = acquire("k1").json()["lease_id"]  # k1's too, and its one slot is taken
    rescoped = f"{scope_part(tenant, 'perkey', 'k2')}.{lease.partition('.')[2]}"
    with nothing_changes(store, http):
        reply = http.post(f"/v1/leases/{rescoped}/release", json={"outcome": "not_called"})
        refused(reply, 404, "unknown_lease")
    assert acquire("k2").status_code == 429
    assert http.post(f"/v1/leases/{lease}/release", json={"outcome": "ok"}).status_code == 200


# --- 6. isolation between tenants ---------------------------------------------------------


def test_a_token_cannot_touch_another_tenants_lease(
    secured: httpx.Client, store: redis.Redis
) -> None:
    theirs = fresh_tenant("fabrikam/app")
    mine = fresh_tenant("contoso/app")
    reply = secured.post(
        "/v1/leases", json={"tenant": theirs, "api": INCIDENTS}, headers={"Authorization": FABRIKAM}
    )
    lease = reply.json()["lease_id"]
    as_contoso = {"Authorization": CONTOSO}
    reply = secured.post("/v1/leases", json={"tenant": mine, "api": INCIDENTS}, headers=as_contoso)
    assert reply.status_code == 200
    with nothing_changes(store, secured, theirs, Authorization=ADMIN):
        for body in ({"tenant": theirs, "api": INCIDENTS}, {"tenant": theirs, "api": "roomy"}):
            refused(secured.post("/v1/leases", json=body, headers=as_contoso), 403, "forbidden")
        for name in (theirs, theirs.replace("/", "%2F")):
            path = f"/v1/usage/{name}/{INCIDENTS}"
            refused(secured.get(path, headers=as_contoso), 403, "forbidden")
        for body in (
            {"outcome": "not_called"},
            {"outcome": "throttled", "retry_after": 3600},
            {"outcome": "ok", "runtime": 600},
        ):
            reply = secured.post(f"/v1/leases/{lease}/release", json=body, headers=as_contoso)
            refused(reply, 403, "forbidden")
        reply = secured.post(f"/v1/leases/{lease}/renew", json={"ttl": 86_400}, headers=as_contoso)
        refused(reply, 403, "forbidden")
        # Their token under my scope: my tenant's keys know nothing of it.
        mine_scoped = f"{scope_part(mine, INCIDENTS)}.{lease.partition('.')[2]}"
        reply = secured.post(
            f"/v1/leases/{mine_scoped}/release", json={"outcome": "not_called"}, headers=as_contoso
        )
        refused(reply, 404, "unknown_lease")
    usage = seen_by_usage(secured, theirs, Authorization=FABRIKAM)
    assert (usage["in_flight"], usage["limits"][0]["used"], usage["cooldown"]) == (1, 1, 0)
    released = secured.post(
        f"/v1/leases/{lease}/release", json={"outcome": "ok"}, headers={"Authorization": FABRIKAM}
    )
    assert released.status_code == 200  # the lease was still theirs to end


@pytest.mark.parametrize(
    "tenant",
    ["contoso", "contosoX/app", "Contoso/app", "fabrikam/contoso/app", "xcontoso/app"],
)
def test_a_tenant_glob_matches_exactly(
    secured: httpx.Client, store: redis.Redis, tenant: str
) -> None:
    with nothing_changes(store, secured):
        reply = secured.post(
            "/v1/leases",
            json={"tenant": tenant, "api": INCIDENTS},
            headers={"Authorization": CONTOSO},
        )
        refused(reply, 403, "forbidden")


def test_dot_segments_in_a_tenant_name_reach_no_other_tenant(
    secured: httpx.Client, store: redis.Redis
) -> None:
    victim = fresh_tenant("fabrikam/app")
    sneaky = f"contoso/../{victim}"  # a tenant name of its own, which the glob contoso/* allows
    before = seen_by_usage(secured, victim, Authorization=ADMIN)
    reply = secured.post(
        "/v1/leases", json={"tenant": sneaky, "api": INCIDENTS}, headers={"Authorization": CONTOSO}
    )
    assert reply.status_code == 200 and reply.json()["tenant"] == sneaky
    assert seen_by_usage(secured, victim, Authorization=ADMIN) == before
    assert all(f"{{{victim}|".encode() not in key for key in store.keys("*"))


def test_lease_ids_carry_128_random_bits(http: httpx.Client) -> None:
    tenant = fresh_tenant()
    ids = []
    for _ in range(1_000):
        reply = http.post("/v1/leases", json={"tenant": tenant, "api": "roomy"})
        assert reply.status_code == 200, reply.text
        ids.append(reply.json()["lease_id"])
    assert len(set(ids)) == 1_000
    tokens = []
    for lease_id in ids:
        scope, _, token = lease_id.partition(".")
        assert scope == scope_part(tenant, "roomy")
        assert LeaseRef.parse(lease_id) == LeaseRef(tenant, "roomy", "", token)
        assert len(token) == 32 and set(token) <= set("0123456789abcdef")
        tokens.append(token)
    assert len(set(tokens)) == 1_000
    # Not a counter nor a clock: every position takes every hex digit across 1,000 ids
    # (the chance that a random position misses one is about 16 * (15/16)**1000).
    for position in range(32):
        assert len({token[position] for token in tokens}) == 16, position


# --- 7. tokens: compared in constant time, never logged -----------------------------------------


@pytest.fixture
def compare_digest_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    return calls


REAL = next(iter(TOKENS))


@pytest.mark.parametrize(
    "presented",
    [
        REAL[:-1],  # a prefix
        REAL[:1],
        REAL + "0",  # an extension
        REAL.upper(),
        REAL[:-1] + chr(ord(REAL[-1]) + 1),
        f"{REAL} {REAL}",
        "x" * 10_000,
        "contoso-token-6f1c0d9e8b7\u00e1",  # same length in characters, not in bytes
    ],
    ids=["prefix", "first-char", "extension", "upper", "last-char", "twice", "10k", "non-ascii"],
)
def test_a_token_that_is_nearly_right_is_401_after_comparing_with_every_token(
    compare_digest_calls: list[tuple[bytes, bytes]], presented: str
) -> None:
    authorizer = Authorizer(TOKENS)
    with pytest.raises(Unauthorized):
        authorizer.principal(f"Bearer {presented}")
    assert len(compare_digest_calls) == len(TOKENS)
    assert {a for a, _ in compare_digest_calls} == {t.encode() for t in TOKENS}


def test_a_right_token_is_still_compared_with_every_token(
    compare_digest_calls: list[tuple[bytes, bytes]],
) -> None:
    authorizer = Authorizer(TOKENS)
    assert authorizer.principal(f"Bearer {REAL}").globs == ("contoso/*",)
    assert len(compare_digest_calls) == len(TOKENS)  # no early exit on the first match


def test_authorization_headers_that_are_not_a_bearer_token_are_401(
    secured: httpx.Client, store: redis.Redis
) -> None:
    body = {"tenant": "contoso/app", "api": INCIDENTS}
    with nothing_changes(store, secured):
        for header in (
            f"Basic {REAL}",
            f"Bearer{REAL}",
            "Bearer",
            f"Bearer {REAL[:-1]}",
            REAL,
        ):
            reply = secured.post("/v1/leases", json=body, headers={"Authorization": header})
            refused(reply, 401, "unauthorized")
            assert reply.headers["WWW-Authenticate"] == "Bearer"
        for raw in (b"Bearer \xff\xfe\xfd", b"Bearer " + REAL.encode() + b"\xe9"):
            reply = secured.post("/v1/leases", json=body, headers=[(b"Authorization", raw)])
            refused(reply, 401, "unauthorized")
        refused(secured.post("/v1/leases", json=body), 401, "unauthorized")


TRACE = 5  # uvicorn's level below DEBUG
LOGGERS = ("quotagate", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def serve_logging_everything(app: Any) -> AbstractContextManager[str]:
    """Like serve_in_thread, with uvicorn's access log and ASGI trace on and its loggers
    left to the test (no logging config of its own)."""
    return serve_in_thread(app, log_config=None, log_level="trace", access_log=True)


def test_tokens_are_never_logged(
    valkey_server: EmbeddedServer,
    store: redis.Redis,
    policy_file: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    wrong = [
        "contoso-token-6f1c0d9e8b7",
        "wrong-token-a1b2c3d4e5f6a7b8",
        "fabrikam-token-3a4b5c6d7e8",
    ]
    secrets_seen = [*TOKENS, *wrong]
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for logger in loggers:  # whatever an earlier logging config did to propagation
        caplog.set_level(TRACE, logger=logger.name)
        logger.addHandler(caplog.handler)
    caplog.handler.setLevel(TRACE)
    replies = []
    settings = _settings(valkey_server, policy_file, tokens=TOKENS, access_log=True)
    try:
        with (
            serve_logging_everything(create_app(settings)) as url,
            httpx.Client(base_url=url, timeout=10) as http,
        ):
            tenant = fresh_tenant("contoso/app")
            body = {"tenant": tenant, "api": INCIDENTS}
            usage = f"/v1/usage/{tenant}/{INCIDENTS}"
            for token in secrets_seen:
                for header in ({"Authorization": f"Bearer {token}"}, {"Authorization": token}):
                    replies.append(http.post("/v1/leases", json=body, headers=header))
                    replies.append(http.get(usage, headers=header))
            lease = http.post("/v1/leases", json=body, headers={"Authorization": CONTOSO}).json()
            renew = f"/v1/leases/{lease['lease_id']}/renew"
            for header in ({"Authorization": CONTOSO}, {"Authorization": FABRIKAM}):
                replies.append(http.post(renew, json={}, headers=header))
                replies.append(http.get("/v1/policies", headers=header))
    finally:
        for logger in loggers:
            logger.removeHandler(caplog.handler)
    statuses = collections.Counter(reply.status_code for reply in replies)
    assert {200, 401, 403} <= set(statuses), statuses
    # The capture worked: access lines and ASGI traces were recorded.
    messages = [record.getMessage() for record in caplog.records]
    assert any('"POST /v1/leases HTTP/1.1" 401' in message for message in messages)
    assert any(record.name == "uvicorn.asgi" for record in caplog.records)
    out, err = capfd.readouterr()
    everything = "\n".join(
        [
            caplog.text,
            *messages,
            *(repr(record.__dict__) for record in caplog.records),
            out,
            err,
            *(reply.text for reply in replies),
        ]
    )
    for secret in secrets_seen:
        assert secret not in everything
        assert secret.rsplit("-", 1)[-1] not in everything  # nor its random part alone
