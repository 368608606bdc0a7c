"""`make serve` starts the service on its embedded server, and the README's curl tour
works against it as written (only the port differs)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from quotagate.coordinator.embedded import free_port

from .service import wait_ready

ROOT = Path(__file__).parent.parent
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("curl") is None, reason="the tour uses curl"),
]


def tour() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A 60-second tour", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, "the tour's shell block"
    return match.group(1)


@pytest.fixture
def make_serve(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "QUOTAGATE_PORT": str(port), "QUOTAGATE_DATA_DIR": str(tmp_path)}
    env.pop("QUOTAGATE_REDIS_URL", None)
    process = subprocess.Popen(
        ["make", "--no-print-directory", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 60, alive=lambda: process.poll() is None)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        output = process.communicate(timeout=20)[0].decode()
        assert "embedded server" in output, output


def test_the_tour_works_as_written(make_serve: str, tmp_path: Path) -> None:
    script = tour().replace("QG=http://127.0.0.1:8080", f"QG={make_serve}")
    assert script != tour(), "the tour sets QG to the default address"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count('"lease_id"') == 1  # the first acquire prints; the second is kept
    assert "HTTP/1.1 429" in out and re.search(r"(?i)retry-after: \d+", out)
    assert '"error":"quota_exhausted"' in out
    assert '{"released":true}' in out
    usage = out.rsplit("\n", 1)[-1] or out.rsplit("\n", 2)[-2]
    assert '"api":"mde.package-sas"' in usage and '"used":1,' in usage
