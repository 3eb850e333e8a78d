"""`mixquant-serve launch`: start the router and the workers on this machine as child processes,
wait until every worker is healthy, print how to call the server, and stop them all on Ctrl-C/SIGTERM.

The children are the same processes Compose or Kubernetes would run one per container
(`python -m mixquant_serve.worker`, `python -m router`); the launcher only wires their addresses.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

from mixquant_serve.cli_args import engine_args_to_argv
from mixquant_serve.config import EngineConfig


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher dies, so no orphan keeps a port or a GPU (Linux)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(self.argv, env={**env, **self.env}, preexec_fn=_die_with_parent)

    @property
    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


@dataclass
class ClusterSpec:
    engine: EngineConfig
    host: str = "127.0.0.1"
    port: int = 8000
    mode: str = "disaggregated"  # or "colocated"
    workers: int = 1  # colocated workers
    prefill_workers: int = 1
    decode_workers: int = 1
    transfer_backend: str = "tcp"
    threads_per_worker: int = 0
    router_args: list[str] = field(default_factory=list)
    transfer_timeout: float | None = None

    @property
    def num_workers(self) -> int:
        return self.workers if self.mode == "colocated" else self.prefill_workers + self.decode_workers


def _gpu_count() -> int:
    """GPUs visible to this launcher (without importing torch): CUDA_VISIBLE_DEVICES or nvidia-smi."""
    if (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


class Cluster:
    def __init__(self, spec: ClusterSpec) -> None:
        self.spec = spec
        self.url = f"http://{spec.host}:{spec.port}"
        self.children: list[Child] = []
        self.gpus = _gpu_count()

    def _threads(self) -> int:
        """CPU threads per worker: the cores less one for the router, shared out. Oversubscribed
        OpenMP threads wait on each other's time slices (a 576x1728 bf16 GEMM: 0.1 ms alone, 8 ms
        with two threads on two busy cores), so never more threads than cores."""
        if self.spec.threads_per_worker:
            return self.spec.threads_per_worker
        return max(1, ((os.cpu_count() or 1) - 1) // self.spec.num_workers)

    def _worker(self, index: int, name: str, module: str, engine: EngineConfig, extra: list[str]) -> tuple[Child, str]:
        port = free_port()
        argv = [sys.executable, "-m", module, *engine_args_to_argv(engine), "--port", str(port),
                "--worker-id", name, "--threads", str(self._threads()), *extra]
        env = {"CUDA_VISIBLE_DEVICES": str(index % self.gpus)} if self.gpus else {}
        return Child(name, argv, env), f"tcp://127.0.0.1:{port}"

    def plan(self) -> list[Child]:
        spec = self.spec
        children, router = [], [sys.executable, "-m", "router", "--model-path", spec.engine.model_path,
                                "--host", spec.host, "--port", str(spec.port), *spec.router_args]
        if spec.mode == "colocated":
            urls = []
            for i in range(spec.workers):
                child, url = self._worker(i, f"worker-{i}", "mixquant_serve.worker", spec.engine, [])
                children.append(child), urls.append(url)
            router += ["--worker-urls", ",".join(urls)]
        else:
            transfer = ["--transfer-backend", spec.transfer_backend]
            if spec.transfer_timeout is not None:
                transfer += ["--transfer-timeout", str(spec.transfer_timeout)]
            # a prefill worker holds its prefill precision, and BF16 too where it computes the prompt's K/V
            # projections in BF16 (--bf16-kv-proj)
            kv = spec.engine.wants_bf16_kv_proj and spec.engine.decode_precision == "bf16"
            prefill_engine = replace(spec.engine, decode_precision="bf16" if kv else spec.engine.prefill_precision)
            decode_engine = replace(spec.engine, prefill_precision=spec.engine.decode_precision)
            p_urls, d_urls = [], []
            for i in range(spec.prefill_workers):
                child, url = self._worker(i, f"prefill-{i}", "prefill_worker", prefill_engine, transfer)
                children.append(child), p_urls.append(url)
            for i in range(spec.decode_workers):
                child, url = self._worker(spec.prefill_workers + i, f"decode-{i}", "decode_worker",
                                          decode_engine, transfer)
                children.append(child), d_urls.append(url)
            router += ["--prefill-urls", ",".join(p_urls), "--decode-urls", ",".join(d_urls)]
        if spec.engine.served_model_name:
            router += ["--served-model-name", spec.engine.served_model_name]
        return [Child("router", router), *children]

    def start(self) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.children = self.plan()
        for child in self.children:
            child.start(env)

    def wait_ready(self, timeout: float) -> None:
        """Until the router reports every worker healthy; raises if a child exits or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if dead := [c for c in self.children if c.exited is not None]:
                raise RuntimeError(f"{dead[0].name} exited with code {dead[0].exited} during start-up")
            workers = router_workers(self.url)
            if workers is not None and len(workers) == self.spec.num_workers and all(w["healthy"] for w in workers):
                return
            time.sleep(0.5)
        raise RuntimeError(f"the cluster was not healthy within {timeout:.0f} s")

    def stop(self, grace: float = 10.0) -> None:
        """Router first (no new requests), then workers; SIGKILL whatever outlives the grace period. Workers get
        SIGINT: with the router gone there is no one to drain for (SIGTERM would make them drain)."""
        for child in self.children:
            if child.exited is None:
                child.proc.send_signal(signal.SIGTERM if child.name == "router" else signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(grace if child.name == "router" else 0.1)
        deadline = time.monotonic() + grace
        for child in self.children:
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.proc.kill()
                child.proc.wait()

    def serve_forever(self) -> int:
        """Block until a signal (exit 0) or the router dying (exit 1); a dead worker is reported only."""
        stop = {"flag": False}

        def handler(signum: int, frame: object) -> None:
            stop["flag"] = True

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
        reported: set[str] = set()
        while not stop["flag"]:
            for child in self.children:
                code = child.exited
                if code is not None and child.name not in reported:
                    reported.add(child.name)
                    print(f"[mixquant] {child.name} exited with code {code}", file=sys.stderr, flush=True)
                    if child.name == "router":
                        return 1
            time.sleep(0.5)
        return 0


def router_workers(url: str) -> list[dict] | None:
    """The router's GET /workers, or None while it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/workers", timeout=2) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def launched_subprocess(args: Sequence[str], log_path: str | os.PathLike | None = None,
                        timeout: float = 600.0) -> Iterator[str]:
    """`mixquant-serve launch ARGS` as a child process on a free port (for tests and benchmarks): yields the
    base URL once every worker is healthy; SIGTERM (then SIGKILL) at the end. Output goes to log_path."""
    port = free_port()
    with open(log_path or os.devnull, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mixquant_serve.cli", "launch", "--port", str(port), *args],
                                stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while not ((workers := router_workers(url)) and all(w["healthy"] for w in workers)):
                if proc.poll() is not None:
                    raise RuntimeError(f"the launcher exited with {proc.returncode} (log: {log_path or '-'})")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the cluster was not healthy within {timeout:.0f} s (log: {log_path or '-'})")
                time.sleep(0.5)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _client_python() -> str:
    """The interpreter to paste: this one when it has the openai client (make serve installs it), else python."""
    if importlib.util.find_spec("openai") is None:
        return "pip install openai==3.51.0 && python"
    rel = os.path.relpath(sys.executable)
    return sys.executable if rel.startswith("..") else rel


def banner(url: str, model: str, spec: ClusterSpec) -> str:
    chat = f"{url}/v1/chat/completions"
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                       "max_tokens": 64})
    py = (f"from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='none'); "
          f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', "
          f"'content': 'What is the capital of France?'}}], max_tokens=64).choices[0].message.content)")
    eng = spec.engine
    layout = (f"{spec.workers} colocated worker(s)" if spec.mode == "colocated" else
              f"{spec.prefill_workers} prefill + {spec.decode_workers} decode workers, KV over {spec.transfer_backend}")
    return "\n".join([
        "",
        f"mixquant-serve is ready at {url}/v1",
        f"  model {model}; {layout}; prefill {eng.prefill_precision}, decode {eng.decode_precision}",
        "",
        "curl:",
        f"  curl {chat} -H 'Content-Type: application/json' -d '{body}'",
        "",
        "openai (Python):",
        f'  {_client_python()} -c "{py}"',
        "",
        "Press Ctrl-C to stop.",
        "",
    ])
