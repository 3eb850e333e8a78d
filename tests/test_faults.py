"""Faults on real multi-process CPU clusters of the embedded model, each with requests in flight:
- a prefill worker SIGSTOPped (hung, not dead) while it prefills and transfers: it is marked unhealthy, its
  requests are answered anyway (the decode worker's transfer times out, the router retries with local
  prefill), and after SIGCONT it is healthy and placed on again;
- a decode worker SIGSTOPped while it decodes: marked unhealthy, its requests retried on the other decode
  worker and answered; after SIGCONT it frees what the router aborted and takes new work;
- the router SIGKILLed under load and started again: the workers register with the new router, which
  serves new requests, and the requests of the dead router are aborted on the workers (all pages back
  long before they would have finished);
- a decode worker whose KV pool is full: a bounded number of requests wait for pages, the next ones get
  429 with Retry-After in OpenAI's error shape, nothing fails with a 5xx, and the worker stays up.
Every test ends with every worker idle and every KV page free or held by a prefix cache."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
from cluster import ROOT, get_json, launched, wait_idle_no_leaks

from mixquant_serve.launcher import free_port

MODEL = "SmolLM2-135M-Instruct"
LONG_PROMPT = " ".join(f"Line {i}: the worker at rack {i % 9} logged status {i * 7 % 31}." for i in range(16))


def _body(i: int, max_tokens: int, prompt: str = LONG_PROMPT) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "prompt_cache_key": f"fault-{i}",
            "messages": [{"role": "user", "content": f"Case {i}. {prompt}"}]}


async def _post_all(url: str, bodies: list[dict], timeout: float = 150) -> list[httpx.Response | Exception]:
    async with httpx.AsyncClient(timeout=timeout) as client:
        return await asyncio.gather(*[client.post(f"{url}/v1/chat/completions", json=b) for b in bodies],
                                    return_exceptions=True)


def _worker(url: str, role: str) -> list[dict]:
    return [w for w in get_json(f"{url}/workers") if w["role"] == role]


def _wait(predicate, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


async def _stop_when_busy(url: str, role: str, busy, bodies: list[dict]) -> tuple[list, dict, bool]:
    """Send bodies; once a worker of `role` satisfies busy(stats), SIGSTOP it until every response is in
    (then SIGCONT). Returns the responses, that worker's /workers entry, and whether the router marked it
    unhealthy meanwhile."""
    task = asyncio.ensure_future(_post_all(url, bodies))
    victim = None
    while victim is None:
        assert not task.done(), "the requests finished before the worker was busy"
        victim = next((w for w in _worker(url, role) if w["stats"] and busy(w["stats"])), None)
        await asyncio.sleep(0.05)
    os.kill(victim["info"]["pid"], signal.SIGSTOP)
    unhealthy = False
    try:
        while not task.done():
            await asyncio.sleep(0.2)
            entry = next(w for w in get_json(f"{url}/workers") if w["url"] == victim["url"])
            unhealthy = unhealthy or not entry["healthy"]
        responses = task.result()
    finally:
        os.kill(victim["info"]["pid"], signal.SIGCONT)
    return responses, victim, unhealthy


def _assert_all_200(responses: list) -> None:
    bad = [r if isinstance(r, Exception) else (r.status_code, r.text[:200]) for r in responses
           if isinstance(r, Exception) or r.status_code != 200]
    assert not bad, bad


def _taken_back(url: str, victim: dict, timeout: float = 30) -> None:
    """The resumed worker is healthy again and new requests reach it."""
    _wait(lambda: next(w for w in get_json(f"{url}/workers") if w["url"] == victim["url"])["healthy"], timeout,
          "the resumed worker to be healthy")
    key = "routed" if victim["role"] == "decode" else "prefills_assigned"
    before = next(w for w in get_json(f"{url}/workers") if w["url"] == victim["url"])[key]
    _assert_all_200(asyncio.run(_post_all(url, [_body(100 + i, 2, "Short.") for i in range(4)])))
    after = next(w for w in get_json(f"{url}/workers") if w["url"] == victim["url"])[key]
    assert after > before, f"no new request reached {victim['worker_id']}"


def _retries(url: str) -> float:
    return float(next(ln.split()[-1] for ln in httpx.get(f"{url}/metrics").text.splitlines()
                      if ln.startswith("mixquant_router_retries_total")))


@pytest.fixture(scope="module")
def stoppable(smollm_path):
    """2 prefill + 2 decode workers (tcp), a 3 s worker timeout, a 4 s transfer timeout; every prompt prefilled
    remotely in BF16 in 64-token chunks (many short steps: a worker is caught mid-transfer)."""
    args = ["--prefill-workers", "2", "--decode-workers", "2", "--transfer-backend", "tcp", "--transfer-timeout",
            "4", "--worker-timeout", "3", "--local-prefill-max-tokens", "0", "--context-length", "1024",
            "--max-total-tokens", "8192", "--policy", "round_robin", "--prefill-precision", "bf16",
            "--chunked-prefill-size", "64"]
    with launched(*args) as url:
        yield url


def test_a_stopped_prefill_worker_mid_transfer(stoppable):
    url, before = stoppable, _retries(stoppable)
    responses, victim, unhealthy = asyncio.run(
        _stop_when_busy(url, "prefill", lambda s: s["num_running"] > 0, [_body(i, 4) for i in range(4)]))
    _assert_all_200(responses)
    assert unhealthy, "the router never marked the stopped prefill worker unhealthy"
    assert _retries(url) > before, "no request was retried"
    _taken_back(url, victim)
    wait_idle_no_leaks(url, timeout=30)


def test_a_stopped_decode_worker_mid_decode(stoppable):
    url, before = stoppable, _retries(stoppable)
    bodies = [_body(10 + i, 32, "Count slowly.") for i in range(6)]
    responses, victim, unhealthy = asyncio.run(
        _stop_when_busy(url, "decode", lambda s: s["num_running"] >= 2, bodies))
    _assert_all_200(responses)
    assert all(r.json()["usage"]["completion_tokens"] == 32 for r in responses)
    assert unhealthy, "the router never marked the stopped decode worker unhealthy"
    assert _retries(url) >= before + 2, "the stopped worker's requests were not placed again"
    _taken_back(url, victim)
    wait_idle_no_leaks(url, timeout=30)


# ---------------------------------------------------------------- clusters started by hand
@contextmanager
def _processes(smollm_path: str, decode_args: tuple[str, ...] = (), router_timeout: float = 4.0
               ) -> Iterator[dict]:
    """A router with a registration socket and 1 prefill + 1 decode worker that register with it; the dict
    holds the router's Popen ('router'), how to start it again ('start_router'), and the HTTP url."""
    logs = ROOT / ".pytest_cache"
    logs.mkdir(exist_ok=True)
    http, registry = free_port(), free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["--model-path", smollm_path, "--threads", "1", "--router-url", f"tcp://127.0.0.1:{registry}",
              "--router-timeout", str(router_timeout), "--transfer-backend", "tcp", "--context-length", "1024"]
    procs: list[subprocess.Popen] = []

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        log = open(logs / f"faults-{name}-{http}.log", "a")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([sys.executable, "-m", *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        procs.append(proc)
        return proc

    def start_router() -> subprocess.Popen:
        state["router"] = spawn("router", ["router", "--model-path", smollm_path, "--port", str(http),
                                           "--registry-port", str(registry), "--worker-timeout", "5"])
        return state["router"]

    state: dict = {"url": f"http://127.0.0.1:{http}", "start_router": start_router}
    try:
        start_router()
        spawn("prefill", ["prefill_worker", *common, "--max-total-tokens", "8192", "--worker-id", "prefill-0"])
        spawn("decode", ["decode_worker", *common, "--worker-id", "decode-0", *decode_args])
        _wait_cluster(state["url"], 2, procs)
        yield state
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGINT)  # at once: workers drain on SIGTERM
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _wait_cluster(url: str, workers: int, procs: list[subprocess.Popen] = (), timeout: float = 180) -> None:
    def ready():
        dead = [p.args[2] for p in procs if p.poll() is not None]
        assert not dead, f"{dead} exited during start-up (logs in .pytest_cache/faults-*.log)"
        try:
            ws = get_json(f"{url}/workers")
        except OSError:
            return False
        return len(ws) == workers and all(w["healthy"] for w in ws)
    _wait(ready, timeout, f"{workers} healthy workers at {url}", every=0.5)


def test_router_killed_and_restarted_under_load(smollm_path):
    with _processes(smollm_path, ("--max-total-tokens", "8192")) as c:
        url = c["url"]
        bodies = [_body(i, 600, "Write a long story.") for i in range(4)]

        async def load_then_kill() -> list:
            task = asyncio.ensure_future(_post_all(url, bodies, timeout=60))
            while sum(w["stats"]["num_running"] for w in _worker(url, "decode") if w["stats"]) < 4:
                assert not task.done(), "the requests ended before the router was killed"
                await asyncio.sleep(0.1)
            pids = {w["worker_id"]: w["info"]["pid"] for w in get_json(f"{url}/workers")}
            c["router"].kill()
            c["router"].wait()
            c["pids"] = pids
            return await task

        responses = asyncio.run(load_then_kill())
        assert all(isinstance(r, httpx.HTTPError) for r in responses), responses  # their router died
        killed_at = time.monotonic()
        c["start_router"]()
        _wait_cluster(url, 2, timeout=60)  # the workers registered again: the new router knows no urls
        assert {w["worker_id"]: w["info"]["pid"] for w in get_json(f"{url}/workers")} == c["pids"]
        r = httpx.post(f"{url}/v1/chat/completions", json=_body(9, 3, "Hi."), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        stats = wait_idle_no_leaks(url, timeout=30)
        # 600 tokens each would take far longer than this on CPU: the orphans were aborted, not finished
        assert time.monotonic() - killed_at < 45
        decode = next(s for s in stats if s["worker_id"] == "decode-0")
        assert decode["counters"]["orphans_aborted"] >= 4, decode["counters"]


def test_a_full_decode_kv_pool_queues_to_a_bound_then_429(smollm_path):
    # 40 pages of 16 tokens: each request needs ~10 (a ~90-token prompt and 64 new tokens), so ~4 run, 2 wait
    decode = ("--max-total-tokens", "640", "--context-length", "512", "--max-queued-requests", "2")
    with _processes(smollm_path, decode) as c:
        url = c["url"]
        bodies = [_body(i, 64, "Describe the sea. " * 8) for i in range(16)]
        responses = asyncio.run(_post_all(url, bodies, timeout=240))
        assert not [r for r in responses if isinstance(r, Exception)], responses
        by_status = {}
        for r in responses:
            by_status.setdefault(r.status_code, []).append(r)
        assert set(by_status) == {200, 429}, {k: v[0].text[:200] for k, v in by_status.items()}
        assert len(by_status[200]) >= 3
        for r in by_status[429]:
            assert r.headers.get("retry-after", "").isdigit(), r.headers
            err = r.json()["error"]
            assert err["type"] == "rate_limit_error" and err["code"] == "overloaded" and err["message"], err
        assert all(r.json()["usage"]["completion_tokens"] == 64 for r in by_status[200])
        stats = wait_idle_no_leaks(url, timeout=30)
        assert all(w["healthy"] for w in get_json(f"{url}/workers"))
        d = next(s for s in stats if s["worker_id"] == "decode-0")
        assert d["total_pages"] == 40, d
        # the refused clients retry once the queue has drained, and are answered
        again = asyncio.run(_post_all(url, [bodies[0]], timeout=120))
        assert again[0].status_code == 200

