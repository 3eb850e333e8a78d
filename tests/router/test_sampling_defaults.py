"""Sampling defaults: fields a request leaves out take the model's generation_config.json values
(`--sampling-defaults model`, the default, as in SGLang and vLLM) or OpenAI's (`--sampling-defaults openai`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import scripted_router

from router.openai_api import ChatCompletionRequest
from router.params import SamplingDefaults, base_params

QWEN3_STYLE = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "eos_token_id": [2]}
MSG = [{"role": "user", "content": "hi"}]


def test_defaults_come_from_generation_config_and_lose_to_the_request(tmp_path: Path) -> None:
    config = {**QWEN3_STYLE, "min_p": 0, "repetition_penalty": 1.05}
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    defaults = SamplingDefaults.load(str(tmp_path), "model")
    assert defaults == SamplingDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.0, repetition_penalty=1.05)
    assert SamplingDefaults.load(str(tmp_path), "openai") == SamplingDefaults()
    p = base_params(ChatCompletionRequest(messages=MSG), None, None, defaults=defaults)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty) == (0.6, 0.95, 20, 1.05)
    p = base_params(ChatCompletionRequest(messages=MSG, temperature=0, top_k=-1), None, None, defaults=defaults)
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 0.95, -1)


@pytest.mark.parametrize("content", [{"temperature": -3}, {"top_p": "high"}, "not json", {"top_k": True}])
def test_unusable_generation_configs_fall_back_to_openai_defaults(tmp_path: Path, content) -> None:
    text = content if isinstance(content, str) else json.dumps(content)
    (tmp_path / "generation_config.json").write_text(text)
    assert SamplingDefaults.load(str(tmp_path), "model") == SamplingDefaults()


@pytest.mark.parametrize("source", ["model", "openai"])
def test_the_router_applies_the_chosen_defaults(source: str, tokenizer_dir: Path, tokenizer, tmp_path: Path) -> None:
    model = tmp_path / tokenizer_dir.name
    shutil.copytree(tokenizer_dir, model)
    (model / "generation_config.json").write_text(json.dumps(QWEN3_STYLE))
    with scripted_router(model, tokenizer, tmp_path / "router.log", "--sampling-defaults", source,
                         workers=1) as (router, (worker,)):
        client = router.client()
        client.chat.completions.create(model=model.name, messages=MSG, max_tokens=2)
        client.chat.completions.create(model=model.name, messages=MSG, max_tokens=2, temperature=0.2)
        first, second = (g.params for g in worker.generate_reqs())
        expected = (0.6, 0.95, 20) if source == "model" else (1.0, 1.0, -1)
        assert (first.temperature, first.top_p, first.top_k) == expected
        assert (second.temperature, second.top_p, second.top_k) == (0.2, *expected[1:])
