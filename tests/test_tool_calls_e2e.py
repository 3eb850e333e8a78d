"""Constrained tool calls through the official openai client against real clusters (embedded model).

On its own the embedded SmolLM2-135M writes broken calls: for a named tool_choice it copied the tool's
definition into the arguments until max_tokens, for "required" it called functions never offered. Here every
call of many seeds and prompts must parse and validate against its function's schema, streamed or not, for
a named function, "required" and "auto" with strict functions, colocated and disaggregated.
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import jsonschema
import openai
import pytest
from cluster import launched, wait_idle_no_leaks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tool_calls import few_shot  # noqa: E402  (the benchmark's few-shot agent history, shared)

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
FLIGHTS = {"type": "object", "properties": {"origin": {"type": "string", "maxLength": 30},
                                            "destination": {"type": "string", "maxLength": 30},
                                            "max_stops": {"type": "integer", "minimum": 0, "maximum": 3}},
           "required": ["origin", "destination", "max_stops"], "additionalProperties": False}
SCHEMAS = {"get_weather": WEATHER, "search_flights": FLIGHTS}
TOOLS = [{"type": "function", "function": {"name": name, "description": desc, "parameters": SCHEMAS[name],
                                           "strict": True}}
         for name, desc in [("get_weather", "Current weather of a city"),
                            ("search_flights", "Flights between two cities")]]
PROMPTS = [
    [{"role": "user", "content": "What is the weather in Paris?"}],
    [{"role": "system", "content": "You are a travel agent. Use the functions."},
     {"role": "user", "content": "Find me a flight from Oslo to Rome, and tell me how warm Rome is."}],
]
NAMED = {"type": "function", "function": {"name": "search_flights"}}


def _cluster(*mode: str):
    return launched(*mode, "--context-length", "2048", "--max-total-tokens", "16384", "--max-running-requests", "16")


@pytest.fixture(scope="module")
def colocated(smollm_path):
    with _cluster("--mode", "colocated") as url:
        yield url


@pytest.fixture(scope="module")
def disaggregated(smollm_path):
    with _cluster() as url:  # one prefill and one decode worker: the grammar runs on the decode worker
        yield url


def client_of(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def client(colocated):
    yield client_of(colocated)
    wait_idle_no_leaks(colocated)


def check(calls: list[tuple[str, str]], names: set[str]) -> None:
    """Every (name, arguments) is a call to an offered function whose arguments fit its schema."""
    for name, arguments in calls:
        assert name in names, f"call to {name!r}, not offered"
        jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def streamed_calls(chunks) -> tuple[dict[int, list[tuple[str, str]]], dict[int, str]]:
    """Per choice: the calls assembled from the deltas (name first, then arguments) and the finish reason."""
    calls: dict[int, dict[int, list[str]]] = defaultdict(dict)
    reasons = {}
    for chunk in chunks:
        for ch in chunk.choices:
            for d in ch.delta.tool_calls or []:
                if d.index not in calls[ch.index]:
                    assert d.id.startswith("call_") and d.function.name, "a call starts with its id and name"
                    calls[ch.index][d.index] = [d.function.name, ""]
                else:
                    assert d.id is None and d.function.name is None
                calls[ch.index][d.index][1] += d.function.arguments or ""
            if ch.finish_reason:
                reasons[ch.index] = ch.finish_reason
    return {i: [tuple(c) for c in per.values()] for i, per in calls.items()}, reasons


def complete_calls(calls: list[tuple[str, str]], reason: str) -> list[tuple[str, str]]:
    """All calls of a choice that ended with tool_calls; all but the last one of a choice cut by max_tokens
    (a weak model may repeat parallel calls until then)."""
    assert reason in ("tool_calls", "length")
    return calls if reason == "tool_calls" else calls[:-1]


def test_named_and_required_calls_validate(client):
    for messages, choice, seed in ((PROMPTS[1], NAMED, 1), (PROMPTS[0], "required", 2)):
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, tool_choice=choice,
                                           n=3, seed=seed, temperature=1.0, max_tokens=64,
                                           parallel_tool_calls=False)
        for ch in r.choices:
            assert ch.finish_reason == "tool_calls" and ch.message.content is None
            calls = [(c.function.name, c.function.arguments) for c in ch.message.tool_calls]
            assert len(calls) == 1
            check(calls, {"search_flights"} if choice is NAMED else set(SCHEMAS))


def test_streamed_parallel_calls_validate(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=PROMPTS[1], tools=TOOLS, tool_choice="required", n=3, seed=3, temperature=1.0,
        max_tokens=80, stream=True))
    calls, reasons = streamed_calls(chunks)
    assert sorted(calls) == [0, 1, 2]
    for i, per_choice in calls.items():
        check(complete_calls(per_choice, reasons[i]), set(SCHEMAS))


def test_auto_with_strict_functions(client):
    """Free text or calls; every call the model opens is held to the offered functions and their schemas."""
    made = 0
    kw = dict(model=MODEL, tools=TOOLS, n=5, temperature=1.0, max_tokens=40)
    for ch in client.chat.completions.create(messages=few_shot("Weather in Paris?"), seed=0, **kw).choices:
        calls = [(c.function.name, c.function.arguments) for c in ch.message.tool_calls or []]
        check(complete_calls(calls, ch.finish_reason) if calls else [], set(SCHEMAS))
        made += len(calls)
    streamed, reasons = streamed_calls(client.chat.completions.create(
        messages=few_shot("And in Tokyo?"), seed=0, stream=True, **kw))
    for i, per_choice in streamed.items():
        check(complete_calls(per_choice, reasons[i]), set(SCHEMAS))
        made += len(per_choice)
    assert made >= 5  # the model did open calls (else this test would check nothing)


def test_disaggregated_streamed_and_cached(disaggregated):
    """The decode worker holds the grammar; a repeated prompt reuses its prefix."""
    client = client_of(disaggregated)
    for seed in (5, 6):
        chunks = list(client.chat.completions.create(
            model=MODEL, messages=PROMPTS[1], tools=TOOLS, tool_choice=NAMED, n=2, seed=seed, temperature=1.0,
            max_tokens=64, stream=True, stream_options={"include_usage": True}))
        calls, reasons = streamed_calls(chunks)
        assert sorted(calls) == [0, 1] and set(reasons.values()) == {"tool_calls"}
        for per_choice in calls.values():
            assert len(per_choice) == 1
            check(per_choice, {"search_flights"})
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0
    wait_idle_no_leaks(disaggregated)
