"""The deployment files parse and stay in step with the settings they configure."""

from __future__ import annotations

from pathlib import Path

import yaml

from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.settings import Settings

DEPLOY = Path(__file__).parent.parent / "deploy"


def manifests() -> dict[str, dict]:  # type: ignore[type-arg]
    docs = yaml.safe_load_all((DEPLOY / "kubernetes" / "quotagate.yaml").read_text())
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_the_coordinator_reads_only_settings_that_exist(tmp_path: Path) -> None:
    found = manifests()
    container = found["Deployment/quotagate"]["spec"]["template"]["spec"]["containers"][0]
    for env in container["env"]:
        field = env["name"].removeprefix("QUOTAGATE_").lower()
        assert field in Settings.model_fields, env["name"]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    files = [arg for arg in container["args"] if arg.startswith("/")]
    assert files and all(str(Path(f).parent) in mounts for f in files)


def test_the_secret_and_the_policies_are_valid(tmp_path: Path) -> None:
    found = manifests()
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(found["Secret/quotagate-tokens"]["stringData"]["tokens.yaml"])
    assert Settings(tokens_file=tokens).all_tokens()
    parse_policies(found["ConfigMap/quotagate-policies"]["data"]["policies.yaml"])


def test_the_image_runs_the_coordinator_on_every_interface() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["quotagate", "serve"]' in dockerfile
    assert "QUOTAGATE_HOST=0.0.0.0" in dockerfile
    assert "USER quotagate" in dockerfile
