"""Structured output in the engine: the JSON Schema constrains every token (llguidance masks)."""

from __future__ import annotations

import json

import pytest

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.engine.engine import RequestError

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "tags": {"type": "array",
          "items": {"type": "string"}, "maxItems": 3}, "score": {"type": "number"}},
          "required": ["name", "tags", "score"], "additionalProperties": False}


@pytest.fixture(scope="module")
def engine(smollm_path) -> Engine:
    return Engine(smollm_path, prefill_precision="bf16", decode_precision="bf16", context_length=1024,
                  max_total_tokens=4096)


def prompt(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode_chat([{"role": "user", "content": text}])


@pytest.mark.parametrize("temperature, seed", [(0.0, None), (1.0, 7), (1.0, 8)])
def test_output_matches_the_schema(engine, temperature, seed):
    params = SamplingParams(max_tokens=120, temperature=temperature, seed=seed, json_schema=json.dumps(SCHEMA))
    out = engine.generate([prompt(engine, "Describe a cat as JSON.")], params)[0]
    doc = json.loads(out.text)
    assert out.finish_reason == "stop" and set(doc) == {"name", "tags", "score"}
    assert isinstance(doc["tags"], list) and len(doc["tags"]) <= 3 and isinstance(doc["score"], (int, float))


def test_unconstrained_output_is_not_json_and_constrained_is(engine):
    ids = prompt(engine, "Tell me a short story about a dragon.")
    free = engine.generate([ids], SamplingParams(max_tokens=24, temperature=0))[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(free.text)
    title = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40}},
             "required": ["title"], "additionalProperties": False}
    doc = engine.generate([ids], SamplingParams(max_tokens=64, temperature=0, json_schema=json.dumps(title)))[0]
    assert doc.finish_reason == "stop" and set(json.loads(doc.text)) == {"title"}


def test_a_bad_schema_is_refused_without_state_change(engine):
    with pytest.raises(RequestError) as e:
        engine.add_request("bad", prompt(engine, "hi"), SamplingParams(json_schema='{"type": 5}'))
    assert e.value.param == "response_format" and "bad" not in engine.requests
