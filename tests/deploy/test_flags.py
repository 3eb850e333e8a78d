"""The deployment files cannot drift from the code: every role's command line in deploy/compose.yaml and in the
rendered Helm chart goes through that role's own argument parser, and every port, address and path they name is
one the code (or the file itself) has. One mutation per file shows that a broken field fails."""

from __future__ import annotations

import http.server
import shutil
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import deploy_files as df  # noqa: E402

from mixquant_serve.models.embedded import EMBEDDED_NAME  # noqa: E402
from router.metrics import ENDPOINTS  # noqa: E402

HEALTHCHECK = "/opt/mixquant/healthcheck.py"
WORKER_ROLES = {"prefill_worker": "prefill", "decode_worker": "decode"}


def mount_targets(svc: dict[str, Any]) -> list[str]:
    return [v.split(":")[1] for v in svc.get("volumes", [])]


def under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def parse_in_container(module: str, argv: list[str], mounts: list[str], root: Path) -> Any:
    """Parse argv with --model-path mapped into `root` (the router checks that the folder exists)."""
    path = df.flag(argv, "--model-path")
    if path is not None:
        assert under(path, mounts), f"--model-path {path} is on no volume the container mounts ({mounts})"
        (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
        argv = [str(root / a.lstrip("/")) if a == path else a for a in argv]
    return df.parse_role(module, argv)


def healthcheck_target(svc: dict[str, Any]) -> str:
    test = svc["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", HEALTHCHECK], f"unexpected health check {test}"
    return test[3]


def check_compose(compose: dict[str, Any], root: Path) -> None:
    services = compose["services"]
    for profile in ("gpu", "cpu", "monitoring"):
        on = df.enabled(compose, [profile])
        assert on, f"profile {profile} starts nothing"
        for name, svc in on.items():
            for dep, how in svc.get("depends_on", {}).items():
                assert dep in on, f"{name} depends on {dep}, which profile {profile} does not start"
                assert how == {"condition": "service_healthy"} and "healthcheck" in services[dep], (name, dep)
    for name, svc in services.items():
        module = df.role_of(svc.get("command", []))
        if module is None:
            continue
        assert HEALTHCHECK in df.dockerfile_copies(svc["build"]["target"]), f"{name}: image lacks {HEALTHCHECK}"
        unset = [k for k, v in svc.get("environment", {}).items() if v is None]
        assert not unset, f"{name}: {unset} would be taken from the host's environment (quote an empty value)"
        argv = svc["command"][3:]
        parsed = parse_in_container(module, argv, mount_targets(svc), root)
        if module == "router":
            check_compose_router(name, svc, parsed, services, compose)
        else:
            check_compose_worker(name, svc, parsed, services)


def check_compose_worker(name: str, svc: dict[str, Any], args: Any, services: dict[str, Any]) -> None:
    assert args.host == "0.0.0.0" and args.advertise_host == name, f"{name}: others reach it as {name}"
    assert df.split_url(healthcheck_target(svc)) == ("127.0.0.1", args.port), f"{name}: health check port"
    if not args.model_path:  # the embedded model, converted into $MIXQUANT_CACHE
        assert under(svc["environment"]["MIXQUANT_CACHE"], mount_targets(svc)), f"{name}: cache not on a volume"
    gpu = "gpu" in svc["profiles"]
    assert args.transfer_backend == ("nccl" if gpu else "tcp"), f"{name}: transfer backend"
    if gpu:
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and svc["ipc"] == "host", name


def check_compose_router(name: str, svc: dict[str, Any], cfg: Any, services: dict[str, Any],
                         compose: dict[str, Any]) -> None:
    assert cfg.host == "0.0.0.0" and svc["ports"] == [f"8000:{cfg.port}"], f"{name}: published port"
    host, port = df.split_url(healthcheck_target(svc))
    assert (host, port) == ("127.0.0.1", cfg.port) and healthcheck_target(svc).endswith("/health"), name
    workers = list(cfg.prefill_urls) + list(cfg.decode_urls)
    assert cfg.prefill_urls and cfg.decode_urls and cfg.min_prefill_workers >= 1, f"{name}: disaggregated"
    for url, role in [(u, "prefill") for u in cfg.prefill_urls] + [(u, "decode") for u in cfg.decode_urls]:
        host, port = df.split_url(url)
        worker = services.get(host)
        assert worker is not None and worker["profiles"] == svc["profiles"], f"{name}: {url} names no service"
        args = worker["command"]
        assert WORKER_ROLES.get(df.role_of(args)) == role, f"{name}: {url} is not a {role} worker"
        assert int(df.flag(args, "--port")) == port, f"{name}: {url} is not the port {host} listens on"
        assert host in svc["depends_on"], f"{name} does not wait for {host}"
    assert len(workers) == len(svc["depends_on"])
    worker_models = {df.flag(services[df.split_url(u)[0]]["command"], "--model-path") for u in workers}
    if worker_models == {None}:  # the embedded model: the folder the workers convert it into
        cache = {services[df.split_url(u)[0]]["environment"]["MIXQUANT_CACHE"] for u in workers}
        assert {f"{c}/models/{EMBEDDED_NAME}" for c in cache} == {df.flag(svc["command"], "--model-path")}
    else:
        assert worker_models == {df.flag(svc["command"], "--model-path")}, f"{name}: another model than its workers"


def test_compose_command_lines_parse_and_agree(tmp_path: Path) -> None:
    check_compose(df.load_compose(), tmp_path)
    check_compose(df.load_compose(env={"MODEL_NAME": "Llama-3.1-8B", "PREFILL_PRECISION": "fp8"}), tmp_path)
    assert df.default_profiles() == ["gpu"]
    assert set(df.enabled(df.load_compose(), df.default_profiles())) == {"prefill", "decode", "router"}
    assert set(df.enabled(df.load_compose(), ["cpu"])) == {"prefill-cpu", "decode-cpu", "router-cpu"}


def test_compose_monitoring_targets_the_routers() -> None:
    import yaml

    compose = df.load_compose()
    scrape = yaml.safe_load((df.DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for group in job["static_configs"] for t in group["targets"]]
    assert targets, "Prometheus scrapes nothing"
    for target in targets:
        host, port = target.split(":")
        cmd = compose["services"][host]["command"]
        assert df.role_of(cmd) == "router" and int(df.flag(cmd, "--port")) == int(port), target
    assert scrape["scrape_configs"][0]["metrics_path"] in ENDPOINTS


def test_a_misspelled_compose_flag_fails(tmp_path: Path) -> None:
    text = df.COMPOSE.read_text()
    assert "      - --worker-id\n      - decode-0" in text
    broken = text.replace("      - --worker-id\n      - decode-0", "      - --worker-name\n      - decode-0", 1)
    with pytest.raises(ValueError, match="unrecognized arguments: --worker-name"):
        check_compose(df.load_compose(broken), tmp_path)
    moved = text.replace("tcp://prefill-cpu:5601", "tcp://prefill-cpu:5602")
    with pytest.raises(AssertionError, match="is not the port prefill-cpu listens on"):
        check_compose(df.load_compose(moved), tmp_path)


# ---------------------------------------------------------------------------------------------------- the chart
def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def container_argv(container: dict[str, Any]) -> list[str]:
    """The command with the $(VAR) references Kubernetes fills in from the container's env."""
    fill = {"$(POD_NAME)": "pod-0", "$(POD_IP)": "10.1.2.3"}
    env = {e["name"] for e in container.get("env", [])}
    for ref in fill:
        if any(ref in a for a in container["command"]):
            assert ref[2:-1] in env, f"{container['name']} uses {ref} without defining it"
    out = []
    for a in container["command"]:
        for ref, value in fill.items():
            a = a.replace(ref, value)
        out.append(a)
    return out


def check_chart(docs: list[dict[str, Any]], root: Path) -> None:
    services, sets = by_kind(docs, "Service"), by_kind(docs, "StatefulSet")
    (router,) = by_kind(docs, "Deployment").values()
    pod = router["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    cfg = parse_in_container("router", container_argv(container)[3:], mounts, root)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": cfg.port, "registry": cfg.registry_port}, "router container ports"
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] in ENDPOINTS and get["path"].startswith("/health") and get["port"] == "http", probe
    for init in pod.get("initContainers", []):
        code = init["command"][2]
        compile(code, "init", "exec")
        assert code.startswith("from mixquant_serve.models.embedded import embedded_model_path;")
        assert df.flag(container["command"], "--model-path").startswith("/cache/models/" + EMBEDDED_NAME)
    (svc,) = [s for s in services.values() if s["spec"].get("clusterIP") != "None"]
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == set(ports), "router Service ports"
    registry = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "registry")
    for role, urls in (("prefill", cfg.prefill_urls), ("decode", cfg.decode_urls)):
        (sts,) = [s for s in sets.values() if s["metadata"]["labels"]["app.kubernetes.io/component"] == role]
        check_chart_workers(role, sts, services[sts["spec"]["serviceName"]], urls, root,
                            f"tcp://{svc['metadata']['name']}:{registry}", cfg.model_path)


def check_chart_workers(role: str, sts: dict[str, Any], headless: dict[str, Any], urls: tuple[str, ...],
                        root: Path, router_url: str, router_model: str) -> None:
    name, spec = sts["metadata"]["name"], sts["spec"]
    assert headless["spec"]["clusterIP"] == "None" and headless["spec"]["selector"].items() <= \
        spec["template"]["metadata"]["labels"].items(), f"{name}: headless Service selects other pods"
    (container,) = spec["template"]["spec"]["containers"]
    mounts = [m["mountPath"] for m in container["volumeMounts"]]
    args = parse_in_container(role + "_worker", container_argv(container)[3:], mounts, root)
    port = container["ports"][0]
    assert port == {"name": "control", "containerPort": args.port} and args.host == "0.0.0.0"
    assert headless["spec"]["ports"][0]["port"] == args.port, f"{name}: headless Service port"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"]["port"] == "control", f"{name} {probe}"
    expected = [f"tcp://{name}-{i}.{name}:{args.port}" for i in range(spec["replicas"])]
    assert list(urls) == expected, f"the router's {role} urls {urls} are not the {role} pods {expected}"
    assert container_argv(container)[container["command"].index("--advertise-host") + 1] == \
        f"pod-0.{spec['serviceName']}", f"{name}: advertised as another name than the router's"
    assert args.router_url == router_url, f"{name}: registers at {args.router_url}, the router listens at {router_url}"
    if args.model_path:
        assert args.model_path == router_model, f"{name}: another model than the router"


@pytest.mark.parametrize("values", ["default", "gpu-2p2d"])
def test_chart_command_lines_parse_and_agree(values: str, tmp_path: Path) -> None:
    docs = df.render_chart(None if values == "default" else df.gpu_values())
    check_chart(docs, tmp_path)


def test_gpu_values_ask_for_what_they_say(tmp_path: Path) -> None:
    docs = df.render_chart(df.gpu_values())
    for sts in by_kind(docs, "StatefulSet").values():
        (container,) = sts["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1 and sts["spec"]["replicas"] == 2
        assert df.flag(container["command"], "--transfer-backend") == "nccl"
        assert {m["mountPath"] for m in container["volumeMounts"]} >= {"/models", "/dev/shm", "/cache"}
    (router,) = by_kind(docs, "Deployment").values()
    env = {e["name"]: e for e in router["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["MIXQUANT_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "mixquant-api-key", "key": "api-key"}
    assert len(by_kind(docs, "PodDisruptionBudget")) == 2 and len(by_kind(docs, "ServiceMonitor")) == 1


def test_a_broken_chart_field_fails(tmp_path: Path) -> None:
    chart = tmp_path / "mixquant"
    shutil.copytree(df.CHART, chart)
    workers = chart / "templates" / "workers.yaml"
    workers.write_text(workers.read_text().replace("- --transfer-timeout", "- --kv-timeout", 1))
    with pytest.raises(ValueError, match="unrecognized arguments: --kv-timeout"):
        check_chart(df.render_chart(None, chart), tmp_path)
    values = {"router": {"registryPort": 5000}, "prefill": {"port": 5601}}
    docs = df.render_chart(values)
    router = by_kind(docs, "Deployment")["mq-mixquant-router"]["spec"]["template"]["spec"]["containers"][0]
    router["command"][router["command"].index("--prefill-urls") + 1] = "tcp://mq-mixquant-prefill-0.mq:5601"
    with pytest.raises(AssertionError, match="are not the prefill pods"):
        check_chart(docs, tmp_path)


# ---------------------------------------------------------------------------------------------------- the image
@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_image_command_and_health_check_agree(target: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import mixquant_serve.cli as cli

    sys.path.insert(0, str(df.DEPLOY / "docker"))
    import healthcheck

    cmd = json.loads(df.dockerfile_instruction(target, "CMD"))
    assert cmd[0] == "mixquant-serve"
    launched = []
    monkeypatch.setattr(cli, "launch", lambda args: launched.append(args) or 0)
    with pytest.raises(SystemExit) as stop:
        cli.main(cmd[1:])
    assert stop.value.code == 0 and launched[0].host == "0.0.0.0"
    assert df.dockerfile_instruction(target, "EXPOSE") == str(launched[0].port)
    assert df.split_url(healthcheck.DEFAULT_TARGET) == ("127.0.0.1", launched[0].port)
    assert healthcheck.DEFAULT_TARGET.endswith("/health")
    check = df.dockerfile_instruction(target, "HEALTHCHECK")
    assert check.endswith(f'CMD ["python", "{HEALTHCHECK}"]') and HEALTHCHECK in df.dockerfile_copies(target)


def test_healthcheck_script_says_unhealthy(tmp_path: Path) -> None:
    sys.path.insert(0, str(df.DEPLOY / "docker"))
    import healthcheck

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
        assert healthcheck.main(["healthcheck", f"tcp://127.0.0.1:{closed}"]) == 1  # bound, not listening
        s.listen()
        assert healthcheck.main(["healthcheck", f"tcp://127.0.0.1:{closed}"]) == 0
    assert healthcheck.main(["healthcheck", "ftp://127.0.0.1:21/"]) == 1
    status = {"code": 503}

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(status["code"])
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/health"
    try:
        assert healthcheck.main(["healthcheck", url]) == 1  # not ready
        status["code"] = 200
        assert healthcheck.main(["healthcheck", url]) == 0
    finally:
        server.shutdown()


def test_dockerignore_keeps_what_the_image_copies() -> None:
    lines = [ln for ln in (df.REPO / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*", "everything not named is left out of the build context"
    kept = {ln[1:] for ln in lines if ln.startswith("!")}
    copied = {src for line in df.DOCKERFILE.read_text().splitlines()
              if line.startswith("COPY ") and "--from" not in line for src in line.split()[1:-1]}
    assert copied and copied <= kept, f"copied but ignored: {sorted(copied - kept)}"
