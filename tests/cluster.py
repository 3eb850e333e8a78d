"""Start a real cluster the way users do (`mixquant-serve launch`, subprocesses) for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from mixquant_serve.launcher import free_port, launched_subprocess

ROOT = Path(__file__).resolve().parents[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextmanager
def launched(*args: str, timeout: float = 300.0) -> Iterator[str]:
    """`mixquant-serve launch ARGS` on a free port; yields the base URL, stops it with SIGTERM. The log goes to
    .pytest_cache/cluster-<n>.log."""
    logs = ROOT / ".pytest_cache"
    log_path = logs / f"cluster-{free_port()}.log" if logs.is_dir() else None
    with launched_subprocess(args, log_path, timeout) as url:
        yield url


def wait_idle_no_leaks(url: str, timeout: float = 15.0) -> list[dict]:
    """Until every worker is idle with all KV pages free or held by its prefix cache; returns the stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = [w["stats"] for w in get_json(f"{url}/workers")]
        idle = all(s and s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats)
        whole = all(s and s["free_pages"] + s["cached_pages"] == s["total_pages"] for s in stats)
        if idle and whole:
            return stats
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not idle or KV pages leaked: {stats}")
        time.sleep(0.3)


class WorkerProc:
    """One worker process (`python -m prefill_worker|decode_worker|mixquant_serve.worker`) driven over ZMQ
    by the test itself, which plays the router: Hello, GenerateReq, AbortReq; it keeps the latest stats."""

    def __init__(self, module: str, *args: str, name: str, env: dict[str, str] | None = None) -> None:
        from mixquant_serve.protocol.channels import PeerLink

        self.port = free_port()
        self.url = f"tcp://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args, "--port", str(self.port),
                                      "--worker-id", name, "--threads", "1"],
                                     env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self.link = PeerLink(self.url)
        self.info = None
        self.stats = None
        self.outputs: dict[str, list] = {}

    def wait_ready(self, timeout: float = 120.0) -> WorkerProc:
        from mixquant_serve.protocol.messages import Hello

        deadline = time.monotonic() + timeout
        while self.info is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"worker on {self.url} did not start")
            self.link.send(Hello(router_id="test"))
            self.pump(0.5)
        return self

    def pump(self, seconds: float = 0.05) -> None:
        from mixquant_serve.protocol.messages import ReqOutputs, WorkerInfo, WorkerStats

        end = time.monotonic() + seconds
        while True:
            for msg in self.link.recv_all():
                if isinstance(msg, WorkerInfo):
                    self.info = msg
                elif isinstance(msg, WorkerStats):
                    self.stats = msg
                elif isinstance(msg, ReqOutputs):
                    for out in msg.outputs:
                        self.outputs.setdefault(out.rid, []).append(out)
            if time.monotonic() >= end:
                return
            time.sleep(0.01)

    def submit(self, rid: str, ids: list[int], params, prefill_url: str | None = None,
               local_prefill_max_tokens: int | None = None) -> None:
        from mixquant_serve.protocol.messages import GenerateReq

        self.link.send(GenerateReq(rid=rid, input_ids=ids, params=params, prefill_url=prefill_url,
                                   local_prefill_max_tokens=local_prefill_max_tokens))

    def result(self, rid: str, timeout: float = 120.0):
        """(all token ids, the final ReqOutput) of a submitted request."""
        deadline = time.monotonic() + timeout
        while not (self.outputs.get(rid) and self.outputs[rid][-1].finished):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{rid} did not finish")
            self.pump()
        outs = self.outputs[rid]
        return [t for o in outs for t in o.token_ids], outs[-1]

    def fresh_stats(self):
        """Stats sent after this call (heartbeats come every 0.5 s)."""
        self.stats = None
        while self.stats is None:
            self.pump(0.1)
        return self.stats

    def stop(self) -> None:
        self.link.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # at once (SIGTERM would drain what is in flight first)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
