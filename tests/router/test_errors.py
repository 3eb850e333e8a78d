"""Every error path answers with its status and an OpenAI-shaped body, and the router stays healthy."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
from conftest import RouterProcess, free_port
from scripted_worker import Failure

CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "hi"}]


def post(api, path: str, body: object = None, **kw: object) -> httpx.Response:
    return httpx.post(api.router.base + path, json=body, timeout=30, **kw)


def check_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


def chat(api, **fields: object) -> httpx.Response:
    return post(api, CHAT, {"model": api.model, "messages": MESSAGES, **fields})


def test_malformed_json_is_400(api) -> None:
    r = httpx.post(api.router.base + CHAT, content=b'{"model": "x", "messages": [', timeout=10,
                   headers={"content-type": "application/json"})
    check_error(r, 400)


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": "hot"}, "temperature"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
    ({"messages": []}, "messages"),
    ({"n": [1]}, "n"),
])
def test_schema_violations_are_422_naming_the_field(api, fields: dict, param: str) -> None:
    err = check_error(chat(api, **fields), 422)
    assert err["param"].startswith(param) and param.split(".")[0] in err["message"]


def test_missing_field_is_422(api) -> None:
    err = check_error(post(api, CHAT, {"model": api.model}), 422, param="messages")
    assert "messages" in err["message"]
    check_error(post(api, "/v1/completions", {"model": api.model}), 422, param="prompt")


def test_unknown_model_is_404(api) -> None:
    check_error(post(api, CHAT, {"model": "gpt-17", "messages": MESSAGES}), 404, "model", "model_not_found")
    with pytest.raises(openai.NotFoundError) as e:
        api.router.client().completions.create(model="nope", prompt="x")
    assert e.value.code == "model_not_found"


def test_context_length_exceeded(api) -> None:
    ctx = api.workers[0].context_length
    long_prompt = list(range(1, ctx + 1))
    too_long = post(api, "/v1/completions", {"prompt": long_prompt})
    check_error(too_long, 400, "prompt", "context_length_exceeded")
    check_error(post(api, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": ctx}), 400, "max_tokens",
                "context_length_exceeded")
    check_error(chat(api, max_tokens=ctx), 400, "max_tokens", "context_length_exceeded")
    with pytest.raises(openai.BadRequestError) as e:
        api.router.client().completions.create(model=api.model, prompt=long_prompt, max_tokens=1)
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize(("fields", "param"), [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": -3}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"n": 17}, "n"),
    ({"n": 0}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": [""]}, "stop"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
    ({"response_format": {"type": "grammar"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_chat_parameters_are_400(api, fields: dict, param: str) -> None:
    check_error(chat(api, **fields), 400, param)


@pytest.mark.parametrize(("fields", "param"), [
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 3}, "best_of"),
    ({"echo": True, "logprobs": 1}, "echo"),
    ({"logprobs": 21}, "logprobs"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [1, -2]}, "prompt"),
    ({"prompt": [[1], [49152]]}, "prompt"),  # the embedded model's vocabulary is 0..49151
    ({"prompt": [2**70]}, "prompt"),
])
def test_bad_completion_parameters_are_400(api, fields: dict, param: str) -> None:
    check_error(post(api, "/v1/completions", {"prompt": "x", **fields}), 400, param)


def test_sampling_error_through_openai_client(api) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        api.router.client().chat.completions.create(model=api.model, messages=MESSAGES, temperature=9)
    assert e.value.param == "temperature"


def test_body_over_limit_is_413(api) -> None:
    check_error(chat(api, user="x" * 70_000), 413)
    # without a content-length header (chunked upload) the limit holds too
    payload = b'{"model": "m", "messages": [], "user": "' + b"x" * 70_000 + b'"}'
    r = httpx.post(api.router.base + CHAT, content=iter([payload[:1000], payload[1000:]]), timeout=10)
    check_error(r, 413)


def test_unknown_route_and_method(api) -> None:
    check_error(httpx.get(api.router.base + "/v1/nothing"), 404)
    check_error(httpx.get(api.router.base + CHAT), 405)


def test_worker_failure_is_500_or_429(api) -> None:
    for w in api.workers:
        w.fail = Failure(0, "engine exploded", "internal_error")
    err = check_error(chat(api), 500, code="internal_error")
    assert "engine exploded" in err["message"]
    check_error(chat(api, stream=True), 500)  # fails before the first token: a status, not a stream
    for w in api.workers:
        w.fail = Failure(0, "queue full", "overloaded")  # a worker's queue for KV cache space is full
    r = chat(api)
    check_error(r, 429, code="overloaded")
    assert r.headers["retry-after"].isdigit()
    with pytest.raises(openai.RateLimitError):
        api.router.client().chat.completions.create(model=api.model, messages=MESSAGES)


def test_worker_failure_mid_stream_is_an_error_event(api) -> None:
    for w in api.workers:
        w.fail = Failure(2, "lost the KV cache", "internal_error")
    body = {"model": api.model, "messages": MESSAGES, "stream": True}
    with httpx.stream("POST", api.router.base + CHAT, json=body, timeout=30) as r:
        assert r.status_code == 200
        events = [e for e in r.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert '"error"' in events[-2] and "lost the KV cache" in events[-2]
    with pytest.raises(openai.APIError):
        list(api.router.client().chat.completions.create(model=api.model, messages=MESSAGES, stream=True))


def test_too_many_pending_is_429(api) -> None:
    for w in api.workers:
        w.mode = "stall"

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=api.router.base, timeout=30) as client:
            held = [asyncio.create_task(client.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2}))
                    for _ in range(8)]
            for _ in range(100):
                if sum(len(w.generate_reqs()) for w in api.workers) >= before + 8:
                    break
                await asyncio.sleep(0.05)
            check_error(await client.post(CHAT, json={"messages": MESSAGES}), 429)
            with pytest.raises(openai.RateLimitError):
                api.router.client().completions.create(model=api.model, prompt="x")
            for w in api.workers:
                w.mode = "run"
            assert [r.status_code for r in await asyncio.gather(*held)] == [200] * 8

    before = sum(len(w.generate_reqs()) for w in api.workers)
    asyncio.run(scenario())
    assert chat(api, max_tokens=1).status_code == 200


def test_health_stays_ok_after_errors(api) -> None:
    r = httpx.get(api.router.base + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["healthy_workers"] == 2
    assert chat(api, max_tokens=1).status_code == 200


def test_no_healthy_worker_is_503(tokenizer_dir, tmp_path) -> None:
    router = RouterProcess(tokenizer_dir, [f"tcp://127.0.0.1:{free_port()}"], tmp_path / "router.log")
    try:
        router.wait_ready(healthy=False)
        r = httpx.get(router.base + "/health")
        assert r.status_code == 503 and r.json()["status"] == "unavailable"
        check_error(httpx.post(router.base + CHAT, json={"messages": MESSAGES}, timeout=10), 503)
        check_error(httpx.post(router.base + CHAT, json={"messages": "x"}, timeout=10), 422)
    finally:
        router.stop()
