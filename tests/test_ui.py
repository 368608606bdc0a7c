"""The dashboard in a real headless Chromium (the system's, driven by Playwright): after
traffic it shows the tenant's bars, after an upstream 429 a countdown.

`QUOTAGATE_SCREENSHOT=docs/dashboard.png pytest tests/test_ui.py` also saves the page.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.settings import Settings

from .conftest import _wipe
from .service import serve_in_thread

pytestmark = [pytest.mark.server, pytest.mark.slow]

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "dashboard-token-0123456789"
OTHER = "fabrikam-token-0123456789"
# Chromium's own traffic (updates, sync, field trials) would only meet a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SHOW = 15_000  # ms a snapshot may take to reach the page: a hang detector
POLICIES = """
margin: 0
apis:
  m365d.incidents:
    lease_ttl: 1m
    limits: [{calls: 50, per: 1m}, {calls: 1500, per: 1h}]
  mde.live-response:
    lease_ttl: 5m
    limits: [{calls: 10, per: 1m}, {concurrent: 25}]
"""


@pytest.fixture
def dashboard(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[str]:
    _wipe(valkey_server.url)
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(POLICIES)
    tokens = {TOKEN: ["contoso/*"], OTHER: ["fabrikam/*"]}
    settings = Settings(redis_url=valkey_server.url, policies=policy_file, tokens=tokens)
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_dashboard_shows_bars_and_counts_a_pause_down(dashboard: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=dashboard, headers=auth) as http:
        for n in range(12):
            body = {"tenant": "contoso/app-1", "api": "m365d.incidents", "holder": f"siem-{n % 3}"}
            assert http.post("/v1/leases", json=body).status_code == 200
        body = {"tenant": "contoso/app-1", "api": "mde.live-response", "key": "machine-7",
                "holder": "playbook-isolate"}  # fmt: skip
        assert http.post("/v1/leases", json=body).status_code == 200
    assert httpx.get(f"{dashboard}/ui").status_code == 401  # the API's auth, the page too

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(f"{dashboard}/ui?token={TOKEN}")
            assert TOKEN not in page.url, "the token leaves the address bar"
            tenant = page.locator('.tenant[data-tenant="contoso/app-1"]')
            incidents = tenant.locator('.api[data-api="m365d.incidents"]')
            expect(incidents.locator(".bar")).to_have_count(2, timeout=SHOW)
            expect(incidents.locator(".limit").first).to_contain_text("12 used", timeout=SHOW)
            expect(incidents.locator(".leases")).to_contain_text("siem-1", timeout=SHOW)
            live = tenant.locator('.api[data-api="mde.live-response"]')
            expect(live).to_contain_text("playbook-isolate", timeout=SHOW)

            with httpx.Client(base_url=dashboard, headers=auth) as http:
                body = {"tenant": "contoso/app-1", "api": "m365d.incidents", "holder": "siem-9"}
                lease = http.post("/v1/leases", json=body).json()["lease_id"]
                released = http.post(
                    f"/v1/leases/{lease}/release",
                    json={"outcome": "throttled", "status_code": 429, "retry_after": 45},
                )
                assert released.status_code == 200
            pause = page.locator('.pause-card[data-tenant="contoso/app-1"] .countdown')
            expect(pause).to_have_text(re.compile(r"^[1-4]?\d(\.\d)? s$"), timeout=SHOW)
            first = pause.text_content()
            expect(pause).not_to_have_text(first or "", timeout=SHOW)  # it counts down
            expect(page.locator(".throttles")).to_contain_text("siem-9", timeout=SHOW)
            expect(incidents.locator(".tag.pause .countdown")).to_be_visible(timeout=SHOW)
            shot = os.environ.get("QUOTAGATE_SCREENSHOT")
            if shot:
                page.screenshot(path=shot, full_page=True)

            other = browser.new_page()
            other.goto(f"{dashboard}/ui?token={OTHER}")
            expect(other.locator("#status")).to_contain_text("live", timeout=SHOW)
            expect(other.locator(".tenant")).to_have_count(0)  # contoso is not its tenant
        finally:
            browser.close()


def test_the_events_stream_needs_a_token_and_ends_for_the_browser_to_reopen(
    dashboard: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from quotagate.coordinator.routers import ui

    assert httpx.get(f"{dashboard}/ui/events").status_code == 401
    monkeypatch.setattr(ui, "LIFETIME", 0.5)  # a server that stops waits for open streams
    with httpx.Client(base_url=dashboard) as http:
        http.post(
            "/v1/leases",
            json={"tenant": "contoso/app-1", "api": "m365d.incidents"},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        reply = http.get("/ui/events", params={"token": TOKEN}, timeout=10)
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert reply.text.startswith("retry: 1000\n\n")
    snapshot = json.loads(reply.text.split("event: snapshot\ndata: ")[1].split("\n")[0])
    assert [item["tenant"] for item in snapshot["items"]] == ["contoso/app-1"]
