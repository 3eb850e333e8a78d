"""Chat completions through the real router and the official openai client."""

from __future__ import annotations

import json

import httpx
from conftest import RouterProcess
from scripted_worker import REPLY, reply_ids, reply_text

from mixquant_serve.tokenizer import Tokenizer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say the alphabet."}]


def test_non_streaming_reply_usage_and_params(api, tokenizer: Tokenizer) -> None:
    client = api.router.client()
    r = client.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=4, temperature=0.5,
                                       top_p=0.9, seed=3, stop=["zulu"], presence_penalty=0.5,
                                       extra_body={"top_k": 7, "min_p": 0.1, "repetition_penalty": 1.1,
                                                   "min_tokens": 1, "stop_token_ids": [5]})
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == api.model
    choice = r.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == reply_text(tokenizer, 3, 4)
    assert choice.finish_reason == "length"
    prompt = tokenizer.encode_chat(MESSAGES)
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 4
    assert r.usage.total_tokens == len(prompt) + 4
    req = next(g for w in api.workers for g in w.generate_reqs() if g.rid == r.id)
    assert req.input_ids == prompt
    p = req.params
    assert (p.max_tokens, p.temperature, p.top_p, p.seed, p.stop, p.presence_penalty) == (4, 0.5, 0.9, 3,
                                                                                        ("zulu",), 0.5)
    assert (p.top_k, p.min_p, p.repetition_penalty, p.min_tokens, p.stop_token_ids) == (7, 0.1, 1.1, 1, (5,))


def test_default_max_tokens_fills_the_context_and_reply_stops(api, tokenizer: Tokenizer) -> None:
    r = api.router.client().chat.completions.create(model=api.model, messages=MESSAGES,
                                                    max_completion_tokens=None)
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.split() == list(REPLY)
    req = next(g for w in api.workers for g in w.generate_reqs() if g.rid == r.id)
    assert req.params.max_tokens == api.workers[0].context_length - len(req.input_ids)


def test_max_completion_tokens_and_stop_string(api) -> None:
    client = api.router.client()
    r = client.chat.completions.create(model=api.model, messages=MESSAGES, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    r = client.chat.completions.create(model=api.model, messages=MESSAGES, stop="delta")
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content.split() == ["alpha", "bravo", "charlie"]


def test_streaming_role_content_finish_and_done(api, tokenizer: Tokenizer) -> None:
    client = api.router.client()
    chunks = list(client.chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=5,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reply_text(tokenizer, None, 5)
    assert len([c for c in chunks if c.choices[0].delta.content]) >= 3  # streamed, not one lump
    assert all(c.usage is None for c in chunks)


def test_stream_raw_sse_ends_with_done_and_include_usage(api) -> None:
    body = {"model": api.model, "messages": MESSAGES, "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", api.router.base + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 3
    assert "cached_tokens" in last["usage"]["prompt_tokens_details"]
    middle = [json.loads(e[6:]) for e in events[:-2]]
    assert all(m["usage"] is None for m in middle)


def test_n_fans_out_with_seed_plus_i(api, tokenizer: Tokenizer) -> None:
    client = api.router.client()
    r = client.chat.completions.create(model=api.model, messages=MESSAGES, n=3, seed=4, max_tokens=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for i, c in enumerate(r.choices):
        assert c.message.content == reply_text(tokenizer, 4 + i, 2)
    reqs = [g for w in api.workers for g in w.generate_reqs() if g.rid.startswith(r.id + "-")]
    assert sorted(g.params.seed for g in reqs) == [4, 5, 6]
    assert r.usage.completion_tokens == 6
    assert r.usage.prompt_tokens == len(reqs[0].input_ids)  # the prompt counts once


def test_n_streaming_covers_every_choice(api, tokenizer: Tokenizer) -> None:
    chunks = list(api.router.client().chat.completions.create(model=api.model, messages=MESSAGES, n=2,
                                                               seed=1, max_tokens=2, stream=True))
    texts = {0: "", 1: ""}
    finished = set()
    for c in chunks:
        ch = c.choices[0]
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            finished.add(ch.index)
    assert finished == {0, 1}
    assert texts == {0: reply_text(tokenizer, 1, 2), 1: reply_text(tokenizer, 2, 2)}


def test_logprobs_and_top_logprobs(api, tokenizer: Tokenizer) -> None:
    r = api.router.client().chat.completions.create(model=api.model, messages=MESSAGES, max_tokens=3,
                                                    logprobs=True, top_logprobs=2)
    content = r.choices[0].logprobs.content
    assert len(content) == 3
    ids = reply_ids(tokenizer, None)[:3]
    for entry, tid in zip(content, ids, strict=True):
        assert entry.token == tokenizer.token_strings([tid])[0]
        assert entry.bytes == tokenizer.token_bytes([tid])[0]
        assert entry.logprob == -0.25 and len(entry.top_logprobs) == 2
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_content_parts_are_joined(api, tokenizer: Tokenizer) -> None:
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]}]
    r = api.router.client().chat.completions.create(model=api.model, messages=msgs, max_tokens=1)
    req = next(g for w in api.workers for g in w.generate_reqs() if g.rid == r.id)
    assert req.input_ids == tokenizer.encode_chat([{"role": "user", "content": "Say hi"}])


def test_chat_template_file_and_kwargs_with_a_second_router(api, tokenizer_dir, tokenizer: Tokenizer,
                                                           tmp_path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}|{{ greeting }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]{% endif %}")
    second = RouterProcess(tokenizer_dir, [w.address for w in api.workers], tmp_path / "r2.log",
                           "--chat-template", str(template), "--served-model-name", "custom")
    try:
        kwargs = {"chat_template_kwargs": {"greeting": "ahoy"}}
        client = second.wait_ready().client()
        r = client.chat.completions.create(model="custom", messages=MESSAGES, max_tokens=2, extra_body=kwargs)
        assert r.model == "custom" and r.choices[0].message.content == reply_text(tokenizer, None, 2)
        req = next(g for w in api.workers for g in w.generate_reqs() if g.rid == r.id)
        expected = "[system|ahoy] Be brief.\n[user|ahoy] Say the alphabet.\n[assistant]"
        assert req.input_ids == tokenizer.encode(expected, add_special_tokens=False)
    finally:
        second.stop()
