"""Start a real cluster the way users do (`mixquant-serve launch`, subprocesses) for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


@contextmanager
def launched(*args: str, timeout: float = 300.0) -> Iterator[str]:
    """`mixquant-serve launch ARGS` on a free port; yields the base URL, stops it with SIGTERM."""
    port = free_port()
    log = open(ROOT / ".pytest_cache" / f"cluster-{port}.log", "w") if (ROOT / ".pytest_cache").is_dir() \
        else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "mixquant_serve.cli", "launch", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"launcher exited with {proc.returncode} (log: {getattr(log, 'name', '-')})")
            try:
                workers = get_json(f"{url}/workers")
                if workers and all(w["healthy"] for w in workers):
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("cluster did not become healthy")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
