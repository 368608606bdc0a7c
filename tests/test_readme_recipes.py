"""The README's recipes run as written, against the real coordinator and the Defender
emulator on real ports: the httpx transport, Microsoft's Graph SDK, requests'
`QuotaAdapter`, and the gateway's curl and PowerShell lines (the gateway's requests script
runs in test_gateway; the PowerShell line's request is sent by httpx, as this machine has no
PowerShell). Only what points a recipe at Microsoft is changed: the
coordinator's address, and an `inner=` that moves the calls to the emulator; each test
checks that its changes took."""

from __future__ import annotations

import ast
import base64
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from azure.core.credentials import AccessToken

from quotagate.coordinator.embedded import EmbeddedServer

from .client.upstreams import AsyncToEmulator, EmulatorAdapter, ToEmulator, coordinator
from .emulator import DEFENDER_ENDPOINTS, GRAPH_ENDPOINTS, DefenderEmulator
from .service import serve_in_thread

pytestmark = [
    pytest.mark.server,
    # The SDK's generated modules, imported on first use, warn about their own classes.
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:msgraph\..*"),
    pytest.mark.filterwarnings(r"ignore::DeprecationWarning:kiota_abstractions\..*"),
]

README = (Path(__file__).parent.parent / "README.md").read_text()
DEFENDER = "api.security.microsoft.com"
GRAPH = "graph.microsoft.com"
SDK_TOKEN = "contoso-graph-app"  # what the SDK's credential hands out; the emulator's caller
POLICIES = """
margin: 0
apis:
  graph.security:
    lease_ttl: 10s
    limits: [{calls: 100, per: 1m}]
  graph.hunting:
    lease_ttl: 10s
    limits: [{calls: 100, per: 1m}]
"""


def block(section: str, language: str, index: int = 0) -> str:
    """The `index`-th code block in `language` of the README section titled `section`."""
    text = README.split(f"\n{section}\n", 1)[1]
    level = section.split(" ")[0]
    text = re.split(rf"\n{level} ", text, maxsplit=1)[0]  # up to the next section of its level
    found = re.findall(rf"```{language}\n(.*?)```", text, re.S)
    assert len(found) > index, f"{section}: no {language} block {index}"
    return str(found[index])


def substituted(recipe: str, *changes: tuple[str, str]) -> str:
    for old, new in changes:
        assert old in recipe, f"the recipe no longer says {old!r}"
        recipe = recipe.replace(old, new)
    return recipe


def jwt(claims: dict[str, Any]) -> str:
    """A bearer token shaped like Entra ID's (unsigned: the gateway only reads claims)."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2ln"


def used(url: str, tenant: str, api: str) -> float:
    reply = httpx.get(f"{url}/v1/usage/{tenant}/{api}")
    reply.raise_for_status()
    return float(reply.json()["limits"][0]["used"])


def settled(url: str, tenant: str, api: str, expected: float) -> float:
    """Calls used once the gateway's background releases are in (a few ms)."""
    deadline = time.monotonic() + 5
    while (found := used(url, tenant, api)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return found


@pytest.fixture
def emulator() -> DefenderEmulator:
    return DefenderEmulator(endpoints=DEFENDER_ENDPOINTS + GRAPH_ENDPOINTS, latency=0)


@pytest.fixture
def emulator_url(emulator: DefenderEmulator) -> Iterator[str]:
    with serve_in_thread(emulator.app) as url:
        yield url


@pytest.fixture
def quotagate(valkey_server: EmbeddedServer, tmp_path: Path, emulator_url: str) -> Iterator[str]:
    upstreams = {DEFENDER: emulator_url, "api.securitycenter.microsoft.com": emulator_url}
    with coordinator(
        valkey_server.url, tmp_path, POLICIES, gateway_upstreams=upstreams, gateway_wait=5.0
    ) as url:
        yield url


def test_the_transport_recipe_runs_as_written(
    quotagate: str, emulator: DefenderEmulator, emulator_url: str
) -> None:
    recipe = substituted(
        block("## Use it from your code", "python"),
        ("http://127.0.0.1:8080", quotagate),
        ("QuotaTransport(quota)", "QuotaTransport(quota, inner=INNER)"),
    )
    namespace: dict[str, Any] = {
        "defender_token": "contoso-app1",
        "INNER": ToEmulator(emulator_url),
    }
    exec(recipe, namespace)
    namespace["http"].close()
    quota = namespace["quota"]
    assert quota.flush(timeout=5)
    quota.close()
    assert namespace["reply"].status_code == 200
    assert [a.caller for a in emulator.arrivals("/api/incidents")] == ["contoso-app1"]
    assert used(quotagate, "contoso/app-1", "m365d.incidents") == 1


class SecretCredential:
    """Stands in for azure-identity's `ClientSecretCredential`: a token without Entra ID."""

    def __init__(self, tenant_id: str, client_id: str, client_secret: str, **_: Any) -> None:
        self.asked: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **_: Any) -> AccessToken:
        self.asked.append(scopes)
        return AccessToken(SDK_TOKEN, int(time.time()) + 3600)

    async def close(self) -> None:
        pass


async def test_the_msgraph_recipe_runs_as_written(
    quotagate: str,
    emulator: DefenderEmulator,
    emulator_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("azure.identity.aio.ClientSecretCredential", SecretCredential)
    recipe = substituted(
        block("### Microsoft Graph SDK (msgraph-sdk)", "python"),
        ("http://quotagate.soc.svc:8080", quotagate),
        (
            'AsyncQuotaTransport(quota, on_exhausted="respond")',
            'AsyncQuotaTransport(quota, on_exhausted="respond", inner=INNER)',
        ),
    )
    inner = AsyncToEmulator(emulator_url)
    namespace: dict[str, Any] = {
        "TOKEN": None,  # no tokens configured on this coordinator
        "TENANT_ID": "contoso",
        "CLIENT_ID": "app-1",
        "CLIENT_SECRET": "not-a-secret",
        "INNER": inner,
    }
    code = compile(recipe, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    await eval(code, namespace)  # the recipe awaits at its top level, as in a notebook
    assert set(namespace["credential"].asked) == {("https://graph.microsoft.com/.default",)}
    assert {request.url.host for request in inner.seen} == {GRAPH}
    arrivals = emulator.arrivals()
    assert [a.status for a in arrivals] == [200] * 4
    assert {a.caller for a in arrivals} == {SDK_TOKEN}
    # The recipe closes its quota client, which sends its releases first.
    assert used(quotagate, "contoso/app-1", "graph.security") == 3
    assert used(quotagate, "contoso/app-1", "graph.hunting") == 1


def test_the_adapter_recipe_runs_as_written(
    quotagate: str, emulator: DefenderEmulator, emulator_url: str
) -> None:
    recipe = substituted(
        block("### requests", "python"),
        ("http://quotagate.soc.svc:8080", quotagate),
        ("QuotaAdapter(quota, wait=30.0)", "QuotaAdapter(quota, wait=30.0, inner=INNER)"),
    )
    namespace: dict[str, Any] = {
        "TOKEN": None,
        "defender_token": "contoso-app1",
        "INNER": EmulatorAdapter(emulator_url),
    }
    exec(recipe, namespace)
    namespace["session"].close()
    quota = namespace["quota"]
    assert quota.flush(timeout=5)
    quota.close()
    assert namespace["reply"].status_code == 200
    assert namespace["reply"].json()["value"] == []
    assert [a.caller for a in emulator.arrivals("/api/incidents")] == ["contoso-app1"]
    assert used(quotagate, "contoso/app-1", "m365d.incidents") == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="the recipe uses curl")
def test_the_gateway_curl_lines_run_as_written(quotagate: str, emulator: DefenderEmulator) -> None:
    token = jwt({"tid": "contoso", "appid": "curl"})
    script = block("## The gateway: tools that cannot load Python", "sh")
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script.replace("curl ", "curl -sSf ")],
        env={**os.environ, "GW": f"{quotagate}/gateway", "TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count('"value"') == 1  # the incidents; then the hunting answer
    assert '"Results"' in result.stdout
    assert [a.status for a in emulator.arrivals()] == [200, 200]
    assert settled(quotagate, "contoso/curl", "m365d.incidents", 1) == 1
    assert settled(quotagate, "contoso/curl", "m365d.advanced-hunting", 1) == 1


def test_the_gateway_powershell_line_sends_what_it_says(
    quotagate: str, emulator: DefenderEmulator
) -> None:
    # No PowerShell here: the line's request (its -Uri and -Headers, with $gw and $token
    # filled in as the block sets them) is sent as Invoke-RestMethod would send it.
    token = jwt({"tid": "contoso", "appid": "pwsh"})
    script = block("## The gateway: tools that cannot load Python", "powershell")
    gw = re.search(r'^\$gw = "([^"]+)"$', script, re.M)
    call = re.search(r'Invoke-RestMethod -Uri "([^"]+)" -Headers @\{(.*)\}', script)
    assert gw and call, script
    variables = {"$gw": gw[1].replace("http://quotagate:8080", quotagate), "$token": token}

    def filled(text: str) -> str:
        return re.sub(r"\$\w+", lambda m: variables[m[0]], text)

    headers = dict(
        (name.strip(), filled(value.strip().strip('"')))
        for name, value in (pair.split("=", 1) for pair in call[2].split(";"))
    )
    reply = httpx.get(filled(call[1]), headers=headers, timeout=30)
    assert reply.status_code == 200, reply.text
    assert reply.json()["value"] == []
    assert [a.status for a in emulator.arrivals()] == [200]
    assert settled(quotagate, "contoso/pwsh", "m365d.incidents", 1) == 1
