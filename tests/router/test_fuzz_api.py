"""Fuzzing the OpenAI endpoints of a real router: every body, however malformed, gets either a response or an
OpenAI-shaped error with a 4xx status, never a 500 or a hang, and the router stays healthy afterwards."""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ints = st.one_of(st.integers(-3, 40), st.integers(-(2**70), 2**70))
floats = st.floats(allow_nan=False, allow_infinity=False, width=64)
scalars = st.one_of(st.none(), st.booleans(), ints, floats, st.text(max_size=12))
anything = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                         st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                        max_leaves=12)
roles = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), st.text(max_size=8))
content = st.one_of(st.text(max_size=40), st.none(), st.lists(st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "x"]), "text": st.one_of(st.text(max_size=20), ints)}),
    max_size=3), ints)
message = st.fixed_dictionaries({"role": roles, "content": content},
                                optional={"name": st.text(max_size=8), "tool_call_id": st.text(max_size=8),
                                          "tool_calls": anything})
tool = st.fixed_dictionaries({"type": st.sampled_from(["function", "other"]),
                              "function": st.fixed_dictionaries({"name": st.text(max_size=10)},
                                                                optional={"parameters": anything,
                                                                          "description": st.text(max_size=10)})})
common = {
    "max_tokens": st.one_of(ints, scalars), "max_completion_tokens": ints, "temperature": st.one_of(floats, scalars),
    "top_p": floats, "top_k": ints, "min_p": floats, "n": ints, "seed": ints, "stream": st.booleans(),
    "stream_options": anything, "stop": st.one_of(st.text(max_size=6), st.lists(st.text(max_size=6), max_size=5),
                                                  scalars),
    "presence_penalty": floats, "frequency_penalty": floats, "repetition_penalty": floats, "logit_bias": anything,
    "user": scalars, "prompt_cache_key": scalars, "ignore_eos": scalars, "min_tokens": ints,
    "stop_token_ids": st.lists(ints, max_size=3), "response_format": st.one_of(anything, st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "json_object", "json_schema", "xml"])},
        optional={"json_schema": anything})),
    "bogus_field": anything,
}
chat_body = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(message, min_size=0, max_size=4), anything)},
    optional={**common, "model": scalars, "logprobs": scalars, "top_logprobs": ints,
              "tools": st.one_of(st.lists(tool, max_size=2), anything),
              "tool_choice": st.one_of(st.sampled_from(["auto", "none", "required"]), anything)})
prompt = st.one_of(st.text(max_size=40), st.lists(ints, max_size=6), st.lists(st.text(max_size=10), max_size=3),
                   st.lists(st.lists(ints, max_size=4), max_size=3), anything)
completion_body = st.fixed_dictionaries(
    {"prompt": prompt},
    optional={**common, "model": scalars, "logprobs": st.one_of(ints, scalars), "echo": scalars,
              "suffix": scalars, "best_of": ints})
raw = st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode))

ALLOWED = {200, 400, 404, 413, 422, 429}


def check(r: httpx.Response) -> None:
    assert r.status_code in ALLOWED, (r.status_code, r.text[:500])
    if r.status_code == 200:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", r.text[-300:]
            for e in events[:-1]:
                json.loads(e)  # every event is JSON (chunks, or an error object)
        else:
            assert "choices" in r.json()
        return
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert {"type", "param", "code"} <= set(err)


FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])


@pytest.fixture
def http(api):
    with httpx.Client(base_url=api.router.base, timeout=60) as c:
        yield c
    assert httpx.get(api.router.base + "/health", timeout=5).status_code == 200


@FUZZ
@given(body=chat_body)
def test_chat_bodies(http, api, body) -> None:
    body.setdefault("model", api.model)
    check(http.post("/v1/chat/completions", json=body))


@FUZZ
@given(body=completion_body)
def test_completion_bodies(http, api, body) -> None:
    body.setdefault("model", api.model)
    check(http.post("/v1/completions", json=body))


@FUZZ
@given(payload=raw, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_raw_bytes(http, payload, path) -> None:
    check(http.post(path, content=payload, headers={"content-type": "application/json"}))
