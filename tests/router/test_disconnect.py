"""A client that goes away makes the router abort its requests at the worker, promptly."""

from __future__ import annotations

import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


def wait_aborted(api, rid_prefix: str, count: int = 1, timeout: float = 3.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        aborted = {r for w in api.workers for r in w.aborted() if r.startswith(rid_prefix)}
        if len(aborted) >= count:
            return aborted
        time.sleep(0.02)
    raise AssertionError(f"no AbortReq for {rid_prefix} within {timeout} s")


def inflight(api) -> float:
    for family in text_string_to_metric_families(httpx.get(api.router.base + "/metrics").text):
        if family.name == "mixquant_router_inflight_requests":
            return family.samples[0].value
    raise AssertionError("no in-flight gauge")


def wait_idle(api, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while inflight(api) != 0:
        assert time.monotonic() < deadline, "requests still in flight"
        time.sleep(0.05)


def test_disconnect_mid_stream_aborts(api) -> None:
    for w in api.workers:
        w.step_s = 0.05
    stream = api.router.client().chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=400,
                                                         stream=True, extra_body={"ignore_eos": True})
    chunks = [next(stream) for _ in range(3)]
    stream.close()
    closed_at = time.monotonic()
    assert wait_aborted(api, chunks[0].id) == {chunks[0].id}
    assert time.monotonic() - closed_at < 1.0
    wait_idle(api)
    assert api.router.client().chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=1)


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_before_the_first_token_aborts(api, stream: bool) -> None:
    for w in api.workers:
        w.mode = "stall"
    seen = {g.rid for w in api.workers for g in w.generate_reqs()}
    body = {"model": api.model, "messages": MESSAGES, "n": 2, "stream": stream}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(api.router.base + "/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    new = {g.rid for w in api.workers for g in w.generate_reqs()} - seen
    assert len(new) == 2
    rid = new.pop().rsplit("-", 1)[0]
    assert wait_aborted(api, rid, count=2) == {f"{rid}-0", f"{rid}-1"}
    wait_idle(api)


def test_finished_requests_are_not_aborted(api) -> None:
    client = api.router.client()
    r = client.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=2)
    chunks = list(client.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=2,
                                                 stream=True))
    time.sleep(0.3)
    aborted = {a for w in api.workers for a in w.aborted()}
    assert r.id not in aborted and chunks[0].id not in aborted
