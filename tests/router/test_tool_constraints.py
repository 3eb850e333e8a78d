"""What the router sends for constrained tool calls, and the 400s it answers (real router, scripted workers)."""

from __future__ import annotations

import json

import openai
import pytest
from conftest import scripted_router

from mixquant_serve.tokenizer import Tokenizer

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
           "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER, "strict": True}},
         {"type": "function", "function": {"name": "loose", "parameters": {"type": "object", "properties": {
             "n": {"type": "integer", "maximum": 9}}}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def set_reply(api, text: str) -> None:
    for w in api.workers:
        w.reply = text


def sent(workers, rid: str):
    return next(g for w in workers for g in w.generate_reqs() if g.rid.startswith(rid))


def test_every_tool_choice_but_none_sends_a_grammar(api) -> None:
    client = api.router.client()
    set_reply(api, '{"city": "Paris"}}\n</tool_call>')
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=api.model, messages=ASK, tools=TOOLS, tool_choice=named, n=2, seed=1)
    params = [sent(api.workers, f"{r.id}-{i}").params for i in range(2)]
    assert all(p.grammar is not None and '"additionalProperties": false' in p.grammar for p in params)
    assert "loose" not in params[0].grammar and params[0].json_schema is None
    assert [c.message.tool_calls[0].function.arguments for c in r.choices] == ['{"city": "Paris"}'] * 2
    for choice, reply in (("required", CALL.removeprefix('<tool_call>\n{"name": "')), ("auto", CALL)):
        set_reply(api, reply)
        r = client.chat.completions.create(model=api.model, messages=ASK, tools=TOOLS, tool_choice=choice)
        grammar = sent(api.workers, r.id).params.grammar
        assert "get_weather" in grammar and '"maximum": 9' in grammar  # constraint "all": non-strict held too
        assert r.choices[0].finish_reason == "tool_calls"
    r = client.chat.completions.create(model=api.model, messages=ASK, tools=TOOLS, tool_choice="none")
    assert sent(api.workers, r.id).params.grammar is None and not r.choices[0].message.tool_calls


def test_response_format_joins_the_auto_grammar(api) -> None:
    set_reply(api, '{"answer": "sunny"}')
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}}}
    r = api.router.client().chat.completions.create(model=api.model, messages=ASK, tools=TOOLS, response_format=fmt)
    params = sent(api.workers, r.id).params
    assert params.json_schema is None and "answer: %json" in params.grammar and '"answer"' in params.grammar
    assert json.loads(r.choices[0].message.content) == {"answer": "sunny"}


@pytest.mark.parametrize("tools, choice, param, words", [
    (TOOLS, {"type": "function", "function": {"name": "nope"}}, "tool_choice", ["'nope'"]),
    (TOOLS + [{"type": "function", "function": {"name": "broken", "parameters": {"type": "strin"}}}], "required",
     "tools.2.function.parameters", ["'broken'", "strin"]),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], "auto", "tools.0.function.parameters",
     ["JSON Schema"]),
])
def test_bad_tool_requests_are_400s_naming_the_field(api, tools, choice, param, words) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        api.router.client().chat.completions.create(model=api.model, messages=ASK, tools=tools, tool_choice=choice)
    err = e.value.response.json()["error"]
    assert err["param"] == param and all(w in err["message"] for w in words)


def test_strict_only_router_flag(tokenizer_dir, tokenizer: Tokenizer, tmp_path) -> None:
    with scripted_router(tokenizer_dir, tokenizer, tmp_path / "router.log", "--tool-call-constraint", "strict",
                         workers=1) as (router, workers):
        workers[0].reply = CALL
        client = router.client()
        r = client.chat.completions.create(model=tokenizer_dir.name, messages=ASK, tools=TOOLS[1:])
        assert sent(workers, r.id).params.grammar is None  # no strict function: auto is free
        r = client.chat.completions.create(model=tokenizer_dir.name, messages=ASK, tools=TOOLS)
        grammar = sent(workers, r.id).params.grammar
        assert '"additionalProperties": false' in grammar and '"maximum": 9' not in grammar
        assert r.choices[0].message.tool_calls[0].function.name == "get_weather"
