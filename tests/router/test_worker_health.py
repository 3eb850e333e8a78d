"""Worker health: a silent worker turns unhealthy within --worker-timeout, fails its requests promptly,
gets no new ones, and is healthy again once it speaks (also after a restart on the same address)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from conftest import RouterProcess, scripted_router, wait_for
from scripted_worker import ScriptedWorker

from mixquant_serve.tokenizer import Tokenizer

TIMEOUT = 1.0
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture
def pair(tokenizer_dir, tokenizer: Tokenizer, tmp_path
         ) -> Iterator[tuple[RouterProcess, list[ScriptedWorker]]]:
    with scripted_router(tokenizer_dir, tokenizer, tmp_path / "router.log", "--worker-timeout", str(TIMEOUT),
                         "--served-model-name", "x", prefix="h", heartbeat_s=0.1) as pair:
        yield pair


def health(router: RouterProcess) -> httpx.Response:
    return httpx.get(router.base + "/health", timeout=5)


def test_dead_worker_fails_in_flight_requests_and_traffic_moves(pair) -> None:
    router, workers = pair
    for w in workers:
        w.step_s = 0.05
    client = router.client()
    stream = client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    first = next(stream)
    results: dict[str, object] = {}

    def non_streaming() -> None:
        try:
            client.chat.completions.create(model="x", messages=MESSAGES, max_tokens=400,
                                           extra_body={"ignore_eos": True})
        except openai.APIStatusError as e:
            results["error"] = e

    # the second request goes to the other worker (least loaded); kill the worker of the stream
    victim = next(w for w in workers if any(g.rid == first.id for g in w.generate_reqs()))
    survivor = next(w for w in workers if w is not victim)
    victim.stop()
    killed_at = time.monotonic()
    with pytest.raises(openai.APIError) as e:
        for _ in stream:
            pass
    assert "stopped responding" in str(e.value)
    assert time.monotonic() - killed_at < TIMEOUT + 1.0

    t = threading.Thread(target=non_streaming)
    t.start()
    wait_for(lambda: len(survivor.generate_reqs()) == 1, 5)
    survivor.stop()
    t.join(TIMEOUT + 3)
    assert not t.is_alive(), "the non-streaming request hung"
    assert results["error"].status_code == 503
    assert results["error"].code == "worker_unavailable"
    r = health(router)
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_worker"
    with pytest.raises(openai.InternalServerError) as e503:
        client.completions.create(model="x", prompt="hi")
    assert e503.value.status_code == 503


def test_silent_worker_turns_unhealthy_and_recovers(pair) -> None:
    router, workers = pair
    w0, w1 = workers
    w0.mode = "silent"
    took = wait_for(lambda: not httpx.get(router.base + "/workers").json()[0]["healthy"], TIMEOUT + 2)
    assert took >= TIMEOUT * 0.5
    assert health(router).json()["healthy_workers"] == 1
    before = len(w0.generate_reqs())
    for _ in range(3):
        router.client().completions.create(model="x", prompt="hi", max_tokens=1)
    assert len(w0.generate_reqs()) == before  # nothing new went to the silent worker
    w0.mode = "run"
    wait_for(lambda: health(router).json()["healthy_workers"] == 2, 2)


def test_restarted_worker_is_found_again(pair, tokenizer: Tokenizer) -> None:
    router, workers = pair
    for w in workers:
        w.stop()
    wait_for(lambda: health(router).status_code == 503, TIMEOUT + 2)
    reborn = ScriptedWorker(tokenizer, "h0-again", heartbeat_s=0.1, bind=workers[0].address).start()
    try:
        wait_for(lambda: health(router).status_code == 200, 6)  # Hello repeats every few seconds
        snapshot = httpx.get(router.base + "/workers").json()
        assert snapshot[0]["healthy"] and snapshot[0]["info"]["worker_id"] == "h0-again"
        r = router.client().completions.create(model="x", prompt="hi", max_tokens=2)
        assert r.choices[0].text
    finally:
        reborn.stop()
