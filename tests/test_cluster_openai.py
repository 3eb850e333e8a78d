"""The official openai client against a cluster started by `mixquant-serve launch` (real subprocesses)."""

from __future__ import annotations

import httpx
import openai
import pytest
from cluster import get_json, launched, wait_idle_no_leaks

MODEL = "SmolLM2-135M-Instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def server(smollm_path):
    args = ["--mode", "colocated", "--context-length", "1024", "--max-total-tokens", "8192",
            "--max-running-requests", "16"]
    with launched(*args) as url:
        yield url


@pytest.fixture
def client(server):
    yield openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)
    wait_idle_no_leaks(server)  # after every test: nothing running, no KV page leaked


def test_chat_non_streaming(client):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens and u.completion_tokens > 0


def test_chat_streaming_equals_non_streaming_and_reuses_prefix(client):
    whole = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=32,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == whole.usage.completion_tokens
    # the same prompt again: its full pages come from the prefix cache
    assert usage.prompt_tokens_details.cached_tokens >= 16


def test_completions_both_ways(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0, stream=True,
        extra_body={"ignore_eos": True}))
    assert streamed == r.choices[0].text


def test_models_and_metrics(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    text = httpx.get(f"{server}/metrics").text
    assert "mixquant_router_requests_total" in text
    # which precision each phase runs (the default: Mix-Quant, NVFP4 prefill and BF16 decode)
    assert 'prefill_precision="nvfp4"' in text and 'decode_precision="bf16"' in text


@pytest.mark.parametrize("call, status, code", [
    (lambda c: c.chat.completions.create(model="nope", messages=QUESTION), 404, "model_not_found"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi " * 2000}]),
     400, "context_length_exceeded"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=0), 400, None),
    (lambda c: c.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=10**6), 400,
     "context_length_exceeded"),
    (lambda c: c.chat.completions.create(model=MODEL, messages=QUESTION, n=1000), 400, None),
    (lambda c: c.chat.completions.create(model=MODEL, messages=QUESTION, temperature="hot"), 422, None),
])
def test_invalid_requests_get_openai_errors(server, client, call, status, code):
    with pytest.raises(openai.APIStatusError) as e:
        call(client)
    assert e.value.status_code == status
    err = e.value.response.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"} and err["message"]
    if code:
        assert err["code"] == code
    assert get_json(f"{server}/health")["status"] == "ok"


def test_malformed_json(server, client):
    r = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "message" in r.json()["error"]


def test_disconnect_mid_stream_frees_pages(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # the client fixture's teardown asserts the worker is idle with every page back


def test_structured_output_follows_the_schema(client):
    import json

    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0, max_tokens=64,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0.7, seed=3, max_tokens=64,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "answer", "schema": schema}})
    doc = json.loads(r.choices[0].message.content)
    assert set(doc) == {"city", "population"} and isinstance(doc["population"], int)


def test_an_invalid_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "x", "schema": {"type": 5}}})
    assert e.value.response.json()["error"]["param"] == "response_format"


def test_the_printed_examples_run_as_pasted(server):
    """The curl and openai commands that `mixquant-serve launch` prints, run in a shell as printed."""
    import json
    import subprocess

    from mixquant_serve.config import EngineConfig
    from mixquant_serve.launcher import ClusterSpec, banner

    lines = banner(server, MODEL, ClusterSpec(EngineConfig(), mode="colocated")).splitlines()
    curl, py = (lines[lines.index(title) + 1].strip() for title in ("curl:", "openai (Python):"))
    out = subprocess.run(curl + " -s --max-time 120", shell=True, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["choices"][0]["message"]["content"]
    out = subprocess.run(py, shell=True, capture_output=True, text=True, timeout=150)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_fuzzed_sampling_parameters_never_break_the_engine(server):
    """Random (well-typed, often out-of-range) sampling parameters against the real engine: a response or a
    4xx OpenAI error each time, the workers stay healthy, and no KV page leaks."""
    import json

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    floats = st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1.0, 1e-9, 2.0, 1e6, -1e6]))
    ints = st.one_of(st.integers(-2, 40), st.sampled_from([0, 1, 49151, 49152, 2**31]))
    fields = st.fixed_dictionaries({}, optional={
        "temperature": floats, "top_p": floats, "top_k": ints, "min_p": floats, "seed": ints, "n": ints,
        "frequency_penalty": floats, "presence_penalty": floats, "repetition_penalty": floats,
        "min_tokens": ints, "logprobs": st.one_of(st.booleans(), ints), "top_logprobs": ints,
        "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=4)),
        "stop_token_ids": st.lists(ints, max_size=3), "ignore_eos": st.booleans(), "stream": st.booleans(),
        "skip_special_tokens": st.booleans(),
        "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}])})

    @settings(max_examples=100, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(fields=fields, max_tokens=st.integers(1, 4), chat=st.booleans())
    def run(fields, max_tokens, chat):
        if not chat:
            fields.pop("top_logprobs", None)
            if isinstance(fields.get("logprobs"), bool):
                fields.pop("logprobs")
        body = {"model": MODEL, "max_tokens": max_tokens, **fields}
        body.update({"messages": QUESTION} if chat else {"prompt": "The capital of France is"})
        r = httpx.post(f"{server}/v1/{'chat/completions' if chat else 'completions'}", json=body, timeout=120)
        assert r.status_code in (200, 400, 422), (body, r.status_code, r.text[:300])
        if r.status_code != 200:
            assert r.json()["error"]["message"], body
        elif body.get("stream"):
            events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1]), r.text[-300:]

    run()
    assert all(w["healthy"] for w in get_json(f"{server}/workers"))
    wait_idle_no_leaks(server)
