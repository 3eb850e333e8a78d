"""Issue 5's acceptance tests: the official openai client against a real disaggregated cluster
(`mixquant-serve launch --mode disaggregated`, 2 prefill + 2 decode worker processes, tcp KV transfer).

Where each request went is read from GET /workers: `routed` counts the GenerateReqs the router sent to a
decode worker, `prefills_assigned` the ones that named a prefill worker. Turns that add fewer than 64 tokens
are prefilled by the decode worker itself, longer ones by a prefill worker (--local-prefill-max-tokens 64),
so both paths are exercised. The tests run in file order; the last one kills a decode worker.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import openai
import pytest
from cluster import get_json, launched

MODEL = "SmolLM2-135M-Instruct"
KEY = "e2e-secret-key"
WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.fixture(scope="module")
def server(smollm_path):
    with launched("--mode", "disaggregated", "--prefill-workers", "2", "--decode-workers", "2",
                  "--transfer-backend", "tcp", "--context-length", "2048", "--max-total-tokens", "8192",
                  "--local-prefill-max-tokens", "64", "--api-key", KEY) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=180)


def workers(server: str) -> dict[str, dict]:
    return {w["url"]: w for w in get_json(f"{server}/workers")}


def moved(before: dict[str, dict], after: dict[str, dict], field: str) -> dict[str, int]:
    """url -> how much `field` grew between two /workers snapshots (only those that grew)."""
    return {u: after[u][field] - before[u][field] for u in after if after[u][field] > before[u].get(field, 0)}


def metric(server: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(f"{server}/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name in (name, name + "_total") and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def turn(client: openai.OpenAI, messages: list[dict], session: str, max_tokens: int = 16):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                          max_tokens=max_tokens, prompt_cache_key=session)


def tool_output(i: int) -> str:
    return f"Tool output {i}: " + " ".join(f"line{i}-{k} ok" for k in range(40))


def test_turns_of_a_session_land_on_one_pair_and_reuse_earlier_turns(server, client) -> None:
    page = next(iter(workers(server).values()))["info"]["page_size"]
    messages = [{"role": "system", "content": "You are a build agent. " * 10},
                {"role": "user", "content": "Run the build and report."}]
    pairs, prev_prompt = set(), None
    for i in range(4):
        before = workers(server)
        r = turn(client, messages, "e2e-session-1")
        after = workers(server)
        decode, prefill = moved(before, after, "routed"), moved(before, after, "prefills_assigned")
        assert list(decode.values()) == [1] and list(prefill.values()) == [1], (decode, prefill)
        (d_url,), (p_url,) = decode, prefill
        assert (after[d_url]["role"], after[p_url]["role"]) == ("decode", "prefill")
        pairs.add((p_url, d_url))
        if prev_prompt is not None:  # turn n's cache covers turns 1..n-1 (whole pages)
            assert r.usage.prompt_tokens_details.cached_tokens >= prev_prompt // page * page
        prev_prompt = r.usage.prompt_tokens
        messages += [{"role": "assistant", "content": r.choices[0].message.content},
                     {"role": "user", "content": tool_output(i)}]
    assert len(pairs) == 1, pairs
    snapshot = workers(server)
    assert all(snapshot[u]["sessions"] >= 1 for u in next(iter(pairs)))


def test_sessions_sharing_a_system_prompt_go_to_the_worker_that_cached_it(server, client) -> None:
    system = {"role": "system", "content": "You review pull requests for a compiler team. " * 12}
    before = workers(server)
    turn(client, [system, {"role": "user", "content": "Review PR 1."}], "e2e-shared-a")
    first = moved(before, workers(server), "routed")
    time.sleep(1.5)  # the decode worker's cache report reaches the router with its next heartbeats
    prefix_before = metric(server, "mixquant_router_placements", role="decode", kind="prefix")
    before = workers(server)
    turn(client, [system, {"role": "user", "content": "Review PR 2, please."}], "e2e-shared-b")
    second = moved(before, workers(server), "routed")
    assert set(second) == set(first), (first, second)
    assert metric(server, "mixquant_router_placements", role="decode", kind="prefix") - prefix_before == 1


def test_tool_calls_non_streaming_and_streaming(server, client) -> None:
    # The second request reuses the first one's KV (prefilled in NVFP4 by a prefill worker) where the first
    # computed it, so greedy outputs may differ in their arguments: compare the shape, not the text.
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model=MODEL, messages=ask, tools=WEATHER, tool_choice=named,
                                           temperature=0, max_tokens=48)
    (call,) = whole.choices[0].message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict) and whole.choices[0].message.content is None
    assert whole.choices[0].finish_reason == "tool_calls"  # a named call is held to its schema: it completes
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask, tools=WEATHER, tool_choice=named,
                                                 temperature=0, max_tokens=48, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert {d.index for d in deltas} == {0} and deltas[0].id.startswith("call_")  # name first, then arguments
    assert deltas[0].function.name == "get_weather"
    assert isinstance(json.loads("".join(d.function.arguments or "" for d in deltas)), dict)
    assert not any(c.choices[0].delta.content for c in chunks if c.choices)
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    # the tool's answer goes back in, and the model answers in text
    history = ask + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": "get_weather",
                                                         "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "sunny"}'}]
    answer = client.chat.completions.create(model=MODEL, messages=history, tools=WEATHER, tool_choice="none",
                                            temperature=0, max_tokens=24)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_requests_without_a_valid_key_get_401(server) -> None:
    bad = openai.OpenAI(base_url=f"{server}/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    r = httpx.post(f"{server}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_killing_the_bound_decode_worker_rebinds_and_the_next_turn_answers(server, client) -> None:
    messages = [{"role": "system", "content": "You are a geography tutor."},
                {"role": "user", "content": "Name a large European country."}]
    before = workers(server)
    r = turn(client, messages, "e2e-kill")
    (bound,) = moved(before, workers(server), "routed")
    os.kill(workers(server)[bound]["info"]["pid"], signal.SIGKILL)
    moves = metric(server, "mixquant_router_session_moves", role="decode")
    messages += [{"role": "assistant", "content": r.choices[0].message.content},
                 {"role": "user", "content": "What is the capital of France?"}]
    before = workers(server)
    r = turn(client, messages, "e2e-kill", max_tokens=32)
    after = workers(server)
    (now,) = [u for u in moved(before, after, "routed") if u != bound]  # (a request may have hit it first)
    assert now != bound and after[now]["role"] == "decode" and not after[bound]["healthy"]
    assert "Paris" in r.choices[0].message.content
    assert metric(server, "mixquant_router_session_moves", role="decode") - moves == 1
