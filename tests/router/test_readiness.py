"""Liveness and readiness: /health (= /health/ready) answers 200 only when the healthy workers form the configured
topology; /health/live answers while the router runs. A prefill that a decode worker does because no prefill worker
is healthy is logged and counted."""

from __future__ import annotations

import httpx
import pytest
from conftest import RouterProcess, free_port, metric, wait_for
from scripted_worker import ScriptedWorker

from router.args import parse_args

MESSAGES = [{"role": "user", "content": "hello"}]


def status(router: RouterProcess, path: str = "/health") -> tuple[int, dict]:
    r = httpx.get(router.base + path, timeout=5)
    return r.status_code, r.json()


def test_registered_decode_worker_alone_is_not_ready(tokenizer, tokenizer_dir, tmp_path) -> None:
    port = free_port()
    url = f"tcp://127.0.0.1:{port}"
    router = RouterProcess(tokenizer_dir, [], tmp_path / "router.log", "--registry-port", str(port),
                           "--served-model-name", "m", "--min-prefill-workers", "1")
    workers = []
    try:
        router.wait_ready(healthy=False)
        assert status(router, "/health/live") == (200, {"status": "alive"})
        workers.append(ScriptedWorker(tokenizer, "d0", heartbeat_s=0.1, role="decode", router_url=url).start())
        wait_for(lambda: httpx.get(router.base + "/workers").json() and
                 httpx.get(router.base + "/workers").json()[0]["healthy"], 5)
        code, body = status(router)
        assert code == 503 and body["error"]["code"] == "not_ready" and not body["ready"]
        assert body["reason"] == "not ready: healthy 0 of 1 prefill workers"
        assert (body["serving_workers"], body["prefill_workers"]) == (1, 0)
        assert status(router, "/health/ready")[0] == 503
        # a request now is still answered, by the decode worker alone: logged and counted
        r = router.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert r.choices[0].message.content and workers[0].generate_reqs()[0].prefill_url is None
        assert metric(router.base, "mixquant_router_no_prefill_worker") == 1
        assert "no healthy prefill worker: decode worker d0 prefills whole prompts itself" in router.log()
        workers.append(ScriptedWorker(tokenizer, "p0", heartbeat_s=0.1, role="prefill", router_url=url).start())
        wait_for(lambda: status(router)[0] == 200, 5)
        code, body = status(router, "/health/ready")
        assert code == 200 and body["ready"] and body["reason"] == "ready" and body["prefill_workers"] == 1
        router.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=2)
        assert workers[0].generate_reqs()[-1].prefill_url == workers[1].address
        assert metric(router.base, "mixquant_router_no_prefill_worker") == 1  # not counted with a prefill worker
    finally:
        router.stop()
        for w in workers:
            w.stop()


def test_named_prefill_worker_is_needed_and_minimums_apply(tokenizer, tokenizer_dir, tmp_path) -> None:
    prefill = ScriptedWorker(tokenizer, "p0", heartbeat_s=0.1, role="prefill", mode="silent").start()
    decode = [ScriptedWorker(tokenizer, f"d{i}", heartbeat_s=0.1, role="decode").start() for i in range(2)]
    router = RouterProcess(tokenizer_dir, [], tmp_path / "router.log", "--prefill-urls", prefill.address,
                           "--decode-urls", ",".join(w.address for w in decode), "--min-decode-workers", "2",
                           "--worker-timeout", "1.0")
    try:
        router.wait_ready(healthy=False)
        wait_for(lambda: sum(w["healthy"] for w in httpx.get(router.base + "/workers").json()) == 2, 5)
        code, body = status(router)  # auto: a named prefill worker must be healthy
        assert code == 503 and body["min_prefill_workers"] == 1 and body["prefill_workers"] == 0
        prefill.mode = "run"
        wait_for(lambda: status(router)[0] == 200, 5)
        decode[1].mode = "silent"  # below --min-decode-workers 2
        wait_for(lambda: status(router)[0] == 503, 5)
        assert status(router)[1]["reason"] == "not ready: healthy 1 of 2 decode workers"
        assert status(router, "/health/live")[0] == 200  # alive all along
        decode[1].mode = "run"
        wait_for(lambda: status(router)[0] == 200, 5)
    finally:
        router.stop()
        prefill.stop()
        for w in decode:
            w.stop()


def test_decode_only_cluster_is_ready_with_min_prefill_zero(tokenizer, tokenizer_dir, tmp_path) -> None:
    decode = ScriptedWorker(tokenizer, "d0", heartbeat_s=0.1, role="decode").start()
    router = RouterProcess(tokenizer_dir, [], tmp_path / "router.log", "--decode-urls", decode.address,
                           "--min-prefill-workers", "0")
    try:
        router.wait_ready()
        code, body = status(router)
        assert code == 200 and body["min_prefill_workers"] == 0 and body["serving_workers"] == 1
    finally:
        router.stop()
        decode.stop()


@pytest.mark.parametrize("argv", [["--min-prefill-workers", "-2"], ["--min-decode-workers", "0"]])
def test_minimums_are_checked(argv: list[str], tmp_path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--model-path", str(tmp_path), "--registry-port", "1", *argv])
    assert parse_args(["--model-path", str(tmp_path), "--registry-port", "1"]).min_prefill_workers == -1


def test_liveness_fails_once_the_worker_watch_stopped(tokenizer_dir) -> None:
    from fastapi.testclient import TestClient

    from router.app import create_app

    app = create_app(parse_args(["--model-path", str(tokenizer_dir), "--worker-urls", f"tcp://127.0.0.1:{free_port()}"]))
    with TestClient(app) as client:
        assert client.get("/health/live").json() == {"status": "alive"}
        assert client.get("/health").status_code == 503  # alive, but no worker: not ready
        watch = app.state.router.pool._watch
        watch.get_loop().call_soon_threadsafe(watch.cancel)
        wait_for(watch.done, 5)
        r = client.get("/health/live")
        assert r.status_code == 500 and r.json()["error"]["code"] == "router_dead"
