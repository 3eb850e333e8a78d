"""The deployment files pass their own tools: `docker-compose config` (default and every profile), the Helm chart
rendered and linted strictly by Helm's library, every manifest valid against the Kubernetes 1.33 schemas,
yamllint on every YAML file, hadolint on the Dockerfile."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import deploy_files as df  # noqa: E402

KUBERNETES = "1.33.0"
BIN = Path(sys.executable).parent  # the virtualenv's console scripts (yamllint, hadolint)


def tool(name: str) -> str:
    """A linter installed by the `deploy` extra; fails (never skips) when it is missing."""
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, f"{name} is missing: pip install -e '.[deploy]' (make setup-dev)"
    return path


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=df.REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("profiles", [[], ["gpu"], ["cpu"], ["monitoring"], ["cpu", "monitoring"]])
def test_docker_compose_config(profiles: list[str]) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("docker-compose is missing in CI: `make setup-dev` installs Debian's package as root")
        pytest.skip("docker-compose is not installed (Debian: apt-get install docker-compose; make setup-dev "
                    "does it as root)")
    flags = [a for p in profiles for a in ("--profile", p)]
    result = run(exe, "-f", str(df.COMPOSE), *flags, "config", "-q")
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_catches_a_broken_field(tmp_path: Path) -> None:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed")
    broken = tmp_path / "compose.yaml"
    broken.write_text(df.COMPOSE.read_text().replace("condition: service_healthy", "condition: healthy", 1))
    result = run(exe, "-f", str(broken), "--project-directory", str(df.DEPLOY), "config", "-q")
    assert result.returncode != 0 and "condition" in result.stderr, result.stderr


@pytest.mark.parametrize("values", ["default", "gpu-2p2d"])
def test_helm_lint_strict(values: str) -> None:
    import helm_python as helm

    report = helm.lint(str(df.CHART), None if values == "default" else df.gpu_values(), strict=True,
                       kube_version="v" + KUBERNETES)
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 1 is info ("icon is recommended")
    assert not report["errors"] and not problems, report


def check_service_monitor(doc: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    """No Kubernetes schema covers the Prometheus Operator's CRD: its required shape, checked by hand."""
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    labels = doc["spec"]["selector"]["matchLabels"]
    (target,) = [s for s in services.values() if s["metadata"]["labels"].items() >= labels.items()
                 and s["spec"].get("clusterIP") != "None"]
    names = {p["name"] for p in target["spec"]["ports"]}
    for endpoint in doc["spec"]["endpoints"]:
        assert endpoint["port"] in names and endpoint["path"] == "/metrics", endpoint


def validate(docs: list[dict[str, Any]]) -> list[str]:
    import kubernetes_validate

    kinds = []
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":
            check_service_monitor(doc, services)
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
        kinds.append(doc["kind"])
    return kinds


def test_rendered_manifests_are_valid_kubernetes_1_33() -> None:
    default = validate(df.render_chart())
    assert sorted(default) == ["Deployment", "Service", "Service", "Service", "StatefulSet", "StatefulSet"]
    gpu = validate(df.render_chart(df.gpu_values()))
    assert {"PodDisruptionBudget", "ServiceMonitor"} <= set(gpu)


def test_a_broken_manifest_field_fails_validation() -> None:
    import kubernetes_validate

    docs = df.render_chart({"router": {"terminationGracePeriodSeconds": "soon"}})
    with pytest.raises(kubernetes_validate.ValidationError, match="soon"):
        validate(docs)


def test_chart_refuses_an_incomplete_model_source() -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError, match="model.pvc.claimName is required"):
        df.render_chart({"model": {"source": "pvc", "name": "m"}})


def test_yamllint_every_yaml_file() -> None:
    result = run(tool("yamllint"), "-c", "deploy/yamllint.yaml", "--strict", ".")
    assert result.returncode == 0, result.stdout + result.stderr
    listed = run(tool("yamllint"), "-c", "deploy/yamllint.yaml", "--list-files", ".").stdout.split()
    assert {"deploy/compose.yaml", "deploy/helm/mixquant/values.yaml"} <= {str(Path(p)) for p in listed}


def test_hadolint_dockerfile() -> None:
    result = run(tool("hadolint"), "--failure-threshold", "style", str(df.DOCKERFILE))
    assert result.returncode == 0, result.stdout + result.stderr
