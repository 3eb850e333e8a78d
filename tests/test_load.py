"""benchmarks/load.py, short: 200 requests at concurrency 32 (chat, streams, named tool calls, n=2, clients that
leave early) on a real 2 prefill + 2 decode tcp cluster of the embedded model. Nothing lost, nothing
malformed, nothing failed, and every KV page back afterwards. The checks themselves are tested first, on
answers with one thing wrong each, so that the load test cannot pass by checking nothing."""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
from cluster import launched, wait_idle_no_leaks

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def load():
    return _module("load")


@pytest.fixture(scope="module")
def checks():
    return _module("load_checks")


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"arg": "x"}'}}
GOOD = {"id": "chatcmpl-1", "object": "chat.completion", "choices": [
    {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"},
    {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [CALL]},
     "finish_reason": "tool_calls"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}}


def _broken(path: tuple, value) -> dict:
    body = copy.deepcopy(GOOD)
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.mark.parametrize("path,value", [
    (("usage", "total_tokens"), 13), (("usage", "completion_tokens"), 99), (("choices", 1, "index"), 0),
    (("choices", 0, "finish_reason"), None), (("choices", 1, "message", "tool_calls"), []),
    (("choices", 1, "message", "tool_calls", 0, "function", "name"), "nope"),
    (("choices", 1, "message", "tool_calls", 0, "function", "arguments"), {"arg": "x"}),
    (("object", ), "chat.completion.chunk")])
def test_chat_check_catches_each_fault(checks, path, value):
    names = {"get_weather"}
    assert checks.chat_problems(GOOD, 2, 8, names) == []
    assert checks.chat_problems(_broken(path, value), 2, 8, names)


def _events(checks, events: list) -> list[str]:
    check = checks.StreamCheck(1, 8, {"get_weather"}, want_usage=True)
    for e in events:
        check.feed(e if isinstance(e, str) else json.dumps(e))
    return check.problems()


def test_stream_check_catches_each_fault(checks):
    def chunk(delta=None, finish=None, usage=None, choices=True):
        return {"id": "c", "object": "chat.completion.chunk", "usage": usage,
                "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}] if choices else []}
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{"}}
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    good = [chunk({"role": "assistant"}), chunk({"tool_calls": [call]}), chunk(finish="tool_calls"),
            chunk(usage=usage, choices=False), "[DONE]"]
    assert _events(checks, good) == []
    assert _events(checks, good[:-1])  # no [DONE]
    assert _events(checks, good + ["[DONE]"])  # twice
    assert _events(checks, [good[0], good[2], good[3], good[4]])  # tool_calls finish without a call
    assert _events(checks, good[:2] + good[3:])  # never finished
    assert _events(checks, good[:3] + [chunk(usage={**usage, "total_tokens": 6}, choices=False), "[DONE]"])
    assert _events(checks, good[:3] + ["[DONE]"])  # usage asked for, none came
    assert _events(checks, [good[0], "{not json", *good[1:]])


def test_error_shape(checks):
    assert checks.error_shape({"error": {"message": "m", "type": "t", "param": None, "code": None}}) == []
    assert checks.error_shape({"detail": "Not Found"})
    assert checks.error_shape({"error": {"message": "m"}})


def test_200_requests_at_concurrency_32_nothing_lost_or_malformed(load, smollm_path):
    args = ["--prefill-workers", "2", "--decode-workers", "2", "--transfer-backend", "tcp",
            "--context-length", "1024", "--max-total-tokens", "4096", "--local-prefill-max-tokens", "32",
            "--prefill-precision", "bf16"]  # most prompts go to the prefill workers; NVFP4 is emulated on CPU, slow
    cfg = load.LoadConfig(concurrency=32, requests=200, max_tokens=4, max_words=24, disconnect_fraction=0.1,
                          sample_every=2.0, timeout=240)
    with launched(*args) as url:
        s = asyncio.run(load.run_load(url, cfg))
        print(load.table(s))
        wait_idle_no_leaks(url)
    assert s["sent"] == 200
    assert s["lost"] == 0 and s["malformed"] == 0 and not s["failed"], s["problems"] or s["counts"]
    assert s["answered"] + s["disconnected"] == 200 and s["answered"] >= 150, s["counts"]
    assert s["leaked_pages"] and not any(s["leaked_pages"].values()), s["leaked_pages"]
    assert len(s["rss_mb"]) == 4 and all(r["peak"] > 100 for r in s["rss_mb"].values()), s["rss_mb"]
    assert len(s["samples"]) >= 2 and all(len(r["workers"]) == 4 for r in s["samples"])
