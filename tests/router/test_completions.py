"""Legacy completions through the real router: prompt forms, n, echo, logprobs, streaming."""

from __future__ import annotations

from scripted_worker import reply_ids, reply_text

from mixquant_serve.tokenizer import Tokenizer


def _req(api, rid: str):
    return sorted((g for w in api.workers for g in w.generate_reqs() if g.rid.startswith(rid)),
                  key=lambda g: g.rid)


def test_string_prompt(api, tokenizer: Tokenizer) -> None:
    r = api.router.client().completions.create(model=api.model, prompt="Once upon a time", max_tokens=3)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == reply_text(tokenizer, None, 3) and r.choices[0].finish_reason == "length"
    prompt = tokenizer.encode("Once upon a time")
    assert _req(api, r.id)[0].input_ids == prompt
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 3)


def test_prompt_forms_give_one_choice_per_prompt(api, tokenizer: Tokenizer) -> None:
    client = api.router.client()
    r = client.completions.create(model=api.model, prompt=[5, 6, 7], max_tokens=1)
    assert _req(api, r.id)[0].input_ids == [5, 6, 7] and len(r.choices) == 1
    r = client.completions.create(model=api.model, prompt=["one", "two words"], max_tokens=1)
    assert [c.index for c in r.choices] == [0, 1]
    assert [g.input_ids for g in _req(api, r.id)] == [tokenizer.encode("one"), tokenizer.encode("two words")]
    assert r.usage.prompt_tokens == len(tokenizer.encode("one")) + len(tokenizer.encode("two words"))
    r = client.completions.create(model=api.model, prompt=[[1, 2], [3, 4, 5]], max_tokens=2, n=2, seed=0)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    reqs = _req(api, r.id)
    assert [(g.input_ids, g.params.seed) for g in reqs] == [([1, 2], 0), ([1, 2], 1), ([3, 4, 5], 0),
                                                            ([3, 4, 5], 1)]
    assert [c.text for c in r.choices] == [reply_text(tokenizer, s, 2) for s in (0, 1, 0, 1)]
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 8


def test_cached_tokens_reported(api) -> None:
    # the two choices of one request share a worker, which caches whole 16-token pages of the first one
    prompt = list(range(100, 140))
    r = api.router.client().completions.create(model=api.model, prompt=prompt, max_tokens=1, n=2)
    assert r.usage.prompt_tokens == 40 and r.usage.prompt_tokens_details.cached_tokens == 32


def test_echo_prepends_the_prompt(api, tokenizer: Tokenizer) -> None:
    client = api.router.client()
    r = client.completions.create(model=api.model, prompt="Hello there", max_tokens=2, echo=True)
    assert r.choices[0].text == "Hello there" + reply_text(tokenizer, None, 2)
    chunks = list(client.completions.create(model=api.model, prompt="Hi", max_tokens=2, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Hi" + reply_text(tokenizer, None, 2)


def test_streaming_and_usage(api, tokenizer: Tokenizer) -> None:
    chunks = list(api.router.client().completions.create(
        model=api.model, prompt="Count:", max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    body = chunks[:-1]
    assert "".join(c.choices[0].text for c in body) == reply_text(tokenizer, None, 4)
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in body[:-1]) and len(body) >= 3


def test_legacy_logprobs(api, tokenizer: Tokenizer) -> None:
    client = api.router.client()
    r = client.completions.create(model=api.model, prompt="Go", max_tokens=3, logprobs=2)
    lp = r.choices[0].logprobs
    ids = reply_ids(tokenizer, None)[:3]
    assert lp.tokens == tokenizer.token_strings(ids)
    assert lp.token_logprobs == [-0.25] * 3
    assert all(len(t) == 2 for t in lp.top_logprobs)
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]
    chunks = list(client.completions.create(model=api.model, prompt="Go", max_tokens=3, logprobs=1,
                                            stream=True))
    offsets = [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset
