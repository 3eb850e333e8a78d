"""From OpenAI request fields to per-choice SamplingParams."""

from __future__ import annotations

import pytest

from router.errors import APIError
from router.openai_api import ChatCompletionRequest, CompletionRequest
from router.params import base_params, chat_logprobs, check_chat, fit_context, per_choice

MSG = [{"role": "user", "content": "x"}]


def test_fields_map_onto_sampling_params() -> None:
    req = ChatCompletionRequest(messages=MSG, temperature=0, stop="END", top_k=5, seed=1, ignore_eos=True,
                                logprobs=True, top_logprobs=3, stop_token_ids=[2], skip_special_tokens=False)
    p = base_params(req, 10, chat_logprobs(req))
    assert (p.temperature, p.stop, p.top_k, p.seed, p.ignore_eos) == (0.0, ("END",), 5, 1, True)
    assert (p.logprobs, p.stop_token_ids, p.skip_special_tokens, p.max_tokens) == (3, (2,), False, 10)
    default = base_params(ChatCompletionRequest(messages=MSG), None, None)
    assert (default.temperature, default.top_p, default.top_k, default.logprobs) == (1.0, 1.0, -1, None)


def test_fit_context_fills_and_checks() -> None:
    p = base_params(CompletionRequest(prompt="x"), None, None)
    assert fit_context(p, 100, 512, "prompt").max_tokens == 412
    with pytest.raises(APIError) as e:
        fit_context(p, 512, 512, "prompt")
    assert (e.value.status, e.value.code, e.value.param) == (400, "context_length_exceeded", "prompt")
    p = base_params(CompletionRequest(prompt="x"), 413, None)
    with pytest.raises(APIError):
        fit_context(p, 100, 512, "prompt")
    exact = base_params(CompletionRequest(prompt="x"), 412, None)
    assert fit_context(exact, 100, 512, "prompt").max_tokens == 412


def test_per_choice_seeds() -> None:
    p = base_params(CompletionRequest(prompt="x", seed=7), 4, None)
    assert [c.seed for c in per_choice(p, 3)] == [7, 8, 9]
    unseeded = base_params(CompletionRequest(prompt="x"), 4, None)
    assert [c.seed for c in per_choice(unseeded, 2)] == [None, None]


def test_chat_checks() -> None:
    check_chat(ChatCompletionRequest(messages=MSG, n=16, response_format={"type": "text"}))
    with pytest.raises(APIError) as e:
        check_chat(ChatCompletionRequest(messages=MSG, n=17))
    assert e.value.param == "n"
