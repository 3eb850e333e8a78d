"""SIGTERM drains a worker (what Kubernetes and Docker send before stopping a container): the requests in flight
finish, new ones are refused as "worker_unavailable" (the router places them again), the worker tells its
routers it is draining, then exits 0. SIGINT and the drain timeout stop it with what is left failed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
from cluster import WorkerProc, get_json, launched

from mixquant_serve import SamplingParams

MODEL = "SmolLM2-135M-Instruct"
LONG = SamplingParams(max_tokens=160, temperature=0, ignore_eos=True)


def _worker(path: str, name: str, *args: str) -> WorkerProc:
    return WorkerProc("mixquant_serve.worker", "--model-path", path, "--context-length", "1024",
                      "--max-total-tokens", "4096", *args, name=name).wait_ready()


def _started(w: WorkerProc, rid: str, ids: list[int], params: SamplingParams = LONG) -> None:
    w.submit(rid, ids, params)
    while not w.outputs.get(rid):
        w.pump(0.05)


def _exit_code(w: WorkerProc, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while w.proc.poll() is None and time.monotonic() < deadline:
        w.pump(0.1)
    return w.proc.poll()


def test_sigterm_finishes_what_is_in_flight_and_refuses_the_rest(smollm_path):
    w = _worker(smollm_path, "drain-w")
    try:
        _started(w, "long", list(range(100, 140)))
        w.proc.send_signal(signal.SIGTERM)
        assert w.fresh_stats().draining  # announced at once, not at the end
        w.submit("late", list(range(100, 120)), SamplingParams(max_tokens=4))
        tokens, last = w.result("long")
        assert len(tokens) == 160 and last.finish_reason == "length" and last.error is None
        _, late = w.result("late")
        assert late.finish_reason == "error" and late.error_code == "worker_unavailable"
        assert _exit_code(w, 15) == 0
    finally:
        w.stop()


def test_drain_timeout_and_sigint_stop_with_the_rest_failed(smollm_path):
    w = _worker(smollm_path, "drain-t", "--drain-timeout", "1")
    try:
        _started(w, "long", list(range(100, 140)), SamplingParams(max_tokens=900, temperature=0, ignore_eos=True))
        w.proc.send_signal(signal.SIGTERM)
        tokens, last = w.result("long", timeout=20)
        assert last.finish_reason == "error" and last.error_code == "worker_unavailable" and len(tokens) < 900
        assert _exit_code(w, 10) == 0
    finally:
        w.stop()
    w = _worker(smollm_path, "drain-i")
    try:
        _started(w, "long", list(range(100, 140)), SamplingParams(max_tokens=900, temperature=0, ignore_eos=True))
        w.proc.send_signal(signal.SIGINT)
        _, last = w.result("long", timeout=20)
        assert last.error_code == "worker_unavailable"
        assert _exit_code(w, 10) == 0
    finally:
        w.stop()


async def _stream(client: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[int, str, int]:
    """(HTTP status, finish_reason, completion tokens) of a streamed completion."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "ignore_eos": True}
    finish, usage = None, 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                finish = next((c["finish_reason"] for c in chunk["choices"] if c.get("finish_reason")), finish)
                usage = (chunk.get("usage") or {}).get("completion_tokens", usage)
        return r.status_code, finish, usage


def test_a_rolling_restart_loses_no_request(smollm_path):
    """Two colocated workers behind the router; one gets SIGTERM with a stream in flight: that stream ends
    normally, the requests sent meanwhile all succeed (on the other worker), and the drained one exits."""
    args = ["--mode", "colocated", "--workers", "2", "--context-length", "1024", "--max-total-tokens", "4096",
            "--policy", "round_robin"]
    with launched(*args) as url:
        async def scenario():
            async with httpx.AsyncClient(timeout=120) as client:
                first = asyncio.ensure_future(_stream(client, url, "Count to one hundred:", 160))
                victim = None
                while victim is None:
                    await asyncio.sleep(0.1)
                    victim = next((w for w in get_json(f"{url}/workers") if w["stats"]
                                   and w["stats"]["num_running"] > 0), None)
                signal_at = time.monotonic()
                os.kill(victim["info"]["pid"], signal.SIGTERM)
                others = [await _stream(client, url, f"Say {i} in words.", 8) for i in range(4)]
                return victim, signal_at, await first, others

        victim, signal_at, first, others = asyncio.run(scenario())
        assert first == (200, "length", 160), first
        assert all(o[0] == 200 and o[2] == 8 for o in others), others
        deadline = time.monotonic() + 30
        while (entry := next((w for w in get_json(f"{url}/workers") if w["url"] == victim["url"]), None)) \
                and entry["healthy"]:
            assert time.monotonic() < deadline, "the drained worker never left"
            time.sleep(0.3)
        assert time.monotonic() - signal_at < 30
