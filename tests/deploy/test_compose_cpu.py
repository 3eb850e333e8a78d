"""The Compose `cpu` profile, run as local processes: its three commands, in dependency order, with the same flags
and environment (service names -> 127.0.0.1, container ports -> free ports, /cache -> a temporary folder), each
started once its dependencies' own Compose health checks pass; then a chat completion through the openai client,
and every metric the Grafana dashboard plots is on the router's /metrics."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.slow

sys.path.insert(0, str(Path(__file__).parent))
import deploy_files as df  # noqa: E402

from mixquant_serve.models.embedded import EMBEDDED_NAME, embedded_model_path  # noqa: E402

HEALTHCHECK = "/opt/mixquant/healthcheck.py"
STARTUP_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mapping:
    """Container names, ports and paths -> this machine's."""

    def __init__(self, services: dict[str, Any], volumes: dict[str, Path]) -> None:
        self.names = set(services)
        self.volumes = volumes  # container path -> local folder
        self.ports: dict[tuple[str, int], int] = {}

    def port(self, service: str, port: int) -> int:
        return self.ports.setdefault((service, port), free_port())

    def arg(self, service: str, previous: str | None, value: str) -> str:
        if previous == "--port":
            return str(self.port(service, int(value)))
        if value in self.names or value == "0.0.0.0":
            return "127.0.0.1"
        for path, local in self.volumes.items():
            if value == path or value.startswith(path + "/"):
                return str(local) + value[len(path):]
        return re.sub(r"([a-z][a-z0-9-]*):(\d+)", lambda m: self._address(m, service), value)

    def _address(self, m: re.Match, service: str) -> str:
        host, port = m.group(1), int(m.group(2))
        if host in self.names:
            return f"127.0.0.1:{self.port(host, port)}"
        return m.group(0)

    def health_target(self, service: str, target: str) -> str:
        """A health check runs inside its own container: 127.0.0.1 there is the service itself."""
        return re.sub(r"127\.0\.0\.1:(\d+)", lambda m: f"127.0.0.1:{self.port(service, int(m.group(1)))}", target)

    def argv(self, service: str, command: list[str]) -> list[str]:
        out = []
        for i, a in enumerate(command):
            out.append(self.arg(service, command[i - 1] if i else None, a))
        assert out[0] == "python"
        return [sys.executable, *out[1:]]


def dependency_order(services: dict[str, Any]) -> list[list[str]]:
    """Waves of services: each wave depends only on earlier ones."""
    left, waves, done = dict(services), [], set()
    while left:
        wave = sorted(n for n, s in left.items() if set(s.get("depends_on", {})) <= done)
        assert wave, f"a dependency cycle among {sorted(left)}"
        waves.append(wave)
        done |= set(wave)
        for n in wave:
            del left[n]
    return waves


class Service:
    def __init__(self, name: str, svc: dict[str, Any], mapping: Mapping, logs: Path) -> None:
        self.name = name
        self.argv = mapping.argv(name, svc["command"])
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        for key, value in svc.get("environment", {}).items():
            if value is not None:  # Compose passes a key without a value through from its own environment
                self.env[key] = mapping.arg(name, None, str(value))
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "python", HEALTHCHECK] and HEALTHCHECK in df.dockerfile_copies("cpu")
        self.health = [sys.executable, str(df.DEPLOY / "docker" / "healthcheck.py"),
                       mapping.health_target(name, test[3])]
        self.log_path = logs / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv, cwd=df.REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)

    def healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.tail()}"
        return subprocess.run(self.health, capture_output=True, timeout=30).returncode == 0

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def wait_healthy(services: list[Service]) -> None:
    deadline = time.monotonic() + STARTUP_S
    waiting = list(services)
    while waiting:
        waiting = [s for s in waiting if not s.healthy()]
        if waiting and time.monotonic() > deadline:
            raise AssertionError(f"not healthy in {STARTUP_S:.0f} s: {[s.name for s in waiting]}\n"
                                 + "\n".join(s.tail() for s in waiting))
        time.sleep(1.0)


@pytest.fixture(scope="module")
def cpu_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Service], Mapping]]:
    compose = df.load_compose()
    services = df.enabled(compose, ["cpu"])
    assert set(services) == {"prefill-cpu", "decode-cpu", "router-cpu"}
    root = tmp_path_factory.mktemp("compose-cpu")
    cache = root / "cache"  # the `cache` volume every cpu service mounts at /cache
    assert all(v.split(":")[:2] == ["cache", "/cache"] for s in services.values() for v in s["volumes"])
    (cache / "models").mkdir(parents=True)
    # the embedded model converted once for the test session (converting takes minutes on 2 cores): the workers
    # find it where they would have converted it, and check that it is complete and up to date
    (cache / "models" / EMBEDDED_NAME).symlink_to(embedded_model_path())
    mapping = Mapping(services, {"/cache": cache})
    started = {name: Service(name, svc, mapping, root) for name, svc in services.items()}
    try:
        for wave in dependency_order(services):
            for name in wave:
                started[name].start()
            wait_healthy([started[n] for n in wave])
        yield started, mapping
    finally:
        for wave in reversed(dependency_order(services)):
            for name in wave:
                started[name].stop()


def router_base(mapping: Mapping) -> str:
    return f"http://127.0.0.1:{mapping.port('router-cpu', 8000)}"


def test_chat_completion_through_the_cpu_profile(cpu_cluster) -> None:
    services, mapping = cpu_cluster
    client = openai.OpenAI(base_url=router_base(mapping) + "/v1", api_key="unused", max_retries=0, timeout=120)
    (model,) = client.models.list().data
    assert model.id == EMBEDDED_NAME
    r = client.chat.completions.create(model=model.id, max_tokens=16,
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert r.choices[0].message.content.strip() and r.choices[0].finish_reason in ("stop", "length")
    assert 0 < r.usage.completion_tokens <= 16
    workers = {w["worker_id"]: w for w in httpx.get(router_base(mapping) + "/workers", timeout=10).json()}
    assert set(workers) == {"prefill-0", "decode-0"} and all(w["healthy"] for w in workers.values())
    assert workers["prefill-0"]["precision"] == {"prefill": "nvfp4", "decode": "bf16"}  # BF16 for the K/V projections
    assert workers["prefill-0"]["bf16_kv_proj"]
    assert workers["decode-0"]["precision"] == {"prefill": "bf16", "decode": "bf16"}
    health = httpx.get(router_base(mapping) + "/health", timeout=10).json()
    assert health["ready"] and (health["prefill_workers"], health["serving_workers"]) == (1, 1)


def test_every_dashboard_metric_is_exported(cpu_cluster) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    _, mapping = cpu_cluster
    dashboard = json.loads((df.DEPLOY / "grafana" / "dashboards" / "mixquant.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"\b(mixquant_[a-z_]+)", e)}
    text = httpx.get(router_base(mapping) + "/metrics", timeout=10).text
    exported = {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert wanted and not wanted - exported, f"plotted but not exported: {sorted(wanted - exported)}"


@pytest.mark.skipif(not os.environ.get("MIXQUANT_LONG_TESTS"), reason="a 1,100-token NVFP4 prefill on CPU takes "
                    "minutes on a busy 2-core machine; MIXQUANT_LONG_TESTS=1 runs it")
def test_a_long_prompt_is_prefilled_by_the_prefill_worker(cpu_cluster) -> None:
    """Longer than the router's --local-prefill-max-tokens (1024): NVFP4 prefill, KV over TCP to the decode worker."""
    from prometheus_client.parser import text_string_to_metric_families

    _, mapping = cpu_cluster
    client = openai.OpenAI(base_url=router_base(mapping) + "/v1", api_key="unused", max_retries=0, timeout=300)
    notes = " ".join(f"Step {i}: check the release notes and tag version {i}." for i in range(110))
    r = client.chat.completions.create(model=EMBEDDED_NAME, max_tokens=2, temperature=0,
                                       messages=[{"role": "user", "content": notes + " Summarize."}])
    assert r.usage.prompt_tokens > 1024 and r.choices[0].message.content

    def sample(name: str, worker: str) -> float:
        text = httpx.get(router_base(mapping) + "/metrics", timeout=10).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and s.labels.get("worker") == worker)

    deadline = time.monotonic() + 10  # the counters come with the workers' next heartbeats
    while sample("mixquant_worker_kv_transfers_ok", "prefill-0") < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sample("mixquant_worker_kv_transfers_ok", "prefill-0") >= 1
    assert sample("mixquant_worker_kv_bytes_sent", "prefill-0") > 0
    assert sample("mixquant_worker_kv_bytes_received", "decode-0") > 0
