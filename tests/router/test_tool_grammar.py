"""Tool-call grammars, run by llguidance on the embedded model's tokenizer: what they accept and refuse."""

from __future__ import annotations

import json

import llguidance
import pytest

from mixquant_serve.engine.structured import llguidance_tokenizer_json
from mixquant_serve.tokenizer import Tokenizer
from router.errors import APIError
from router.openai_api import ChatCompletionRequest
from router.tool_grammar import Function, auto_grammar, named_grammar, required_grammar, schema_error
from router.tools import plan_tools

WEATHER = Function("get_weather", {"type": "object", "properties": {
    "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False})
ODD = Function('we"ird', {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3}}})
PARIS = '{"city": "Paris", "unit": "celsius"}'
END = "}\n</tool_call>"


def call(name: str, args: str) -> str:
    return '<tool_call>\n{"name": "' + name + '", "arguments": ' + args + END


@pytest.fixture(scope="module")
def lltok(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    return llguidance.LLTokenizer(llguidance_tokenizer_json(tokenizer.to_json()))


@pytest.fixture(scope="module")
def accepts(tokenizer: Tokenizer, lltok):
    def run(grammar: str, text: str) -> bool:
        """Whether the model's tokens of `text` are all allowed and leave the grammar complete."""
        m = llguidance.LLMatcher(lltok, grammar, log_level=0)
        assert not m.is_error(), m.get_error()
        return all(m.consume_token(t) for t in tokenizer.encode(text, add_special_tokens=False)) and m.is_accepting()
    return run


def test_named_call(accepts) -> None:
    g = named_grammar(WEATHER)
    assert accepts(g, PARIS + END)
    assert not accepts(g, '{"city": "Paris", "unit": "kelvin"}' + END)
    assert not accepts(g, '{"city": "Paris", "unit": "celsius", "day": 1}' + END)
    assert not accepts(g, '{"city": "Paris"}' + END)
    assert not accepts(g, PARIS)  # the call must close
    assert not accepts(g, '{"city":"Paris","unit":"celsius"}' + END)  # one JSON style: no room for blanks


def test_required_calls(accepts) -> None:
    one, many = required_grammar([WEATHER, ODD], False), required_grammar([WEATHER, ODD], True)
    first = 'get_weather", "arguments": ' + PARIS + END
    odd = 'we\\"ird", "arguments": {"n": 2}' + END
    assert accepts(one, first) and accepts(one, odd) and accepts(many, first)
    assert accepts(many, first + "\n" + call('we\\"ird', '{"n": 3}'))
    assert not accepts(one, first + "\n" + call('we\\"ird', '{"n": 3}'))  # parallel_tool_calls false
    assert not accepts(many, first + "\n" + call('we\\"ird', '{"n": 4}'))  # maximum 3
    assert not accepts(one, 'get_wether", "arguments": ' + PARIS + END)  # not offered
    assert json.loads('{"name": "we\\"ird"}')["name"] == ODD.name


def test_auto_text_and_calls(accepts) -> None:
    g = auto_grammar([WEATHER])
    assert accepts(g, "No call needed: 3 < 4, <tool_response> is fine.\nBye")
    assert accepts(g, "Let me check. " + call("get_weather", PARIS) + "\nDone.")
    assert accepts(g, call("get_weather", PARIS) + "\n" + call("get_weather", PARIS))
    assert not accepts(g, "Sure " + call("get_wether", PARIS))
    assert not accepts(g, call("get_weather", '{"town": "Paris"}'))
    with_answer = auto_grammar([WEATHER], '{"type": "object", "properties": {"a": {"type": "integer"}}, '
                                          '"required": ["a"]}')
    assert accepts(with_answer, '{"a": 1}') and accepts(with_answer, call("get_weather", PARIS))
    assert not accepts(with_answer, "prose") and not accepts(with_answer, '{"b": 1}')


def test_byte_level_tokenizer_is_read_as_such(tokenizer: Tokenizer, lltok) -> None:
    """Spaces and newlines ("Ġ", "Ċ" tokens) reach the grammar as the bytes they stand for."""
    ids = tokenizer.encode(" a\nb", add_special_tokens=False)
    assert lltok.decode_bytes(ids) == b" a\nb"


def plan(**kw):
    return plan_tools(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **kw))


def tools(*fns: Function, strict: bool = True) -> list[dict]:
    return [{"type": "function", "function": {"name": f.name, "parameters": f.parameters, "strict": strict}}
            for f in fns]


def test_plans_carry_grammars() -> None:
    named = plan(tools=tools(WEATHER, ODD), tool_choice={"type": "function", "function": {"name": 'we"ird'}})
    assert named.forced.endswith('{"name": "we\\"ird", "arguments": ') and '"maximum": 3' in named.grammar
    assert "get_weather" not in named.grammar
    assert plan(tools=tools(WEATHER), tool_choice="required").grammar.count("fn_") >= 2
    assert plan(tools=tools(WEATHER)).grammar is not None
    assert plan(tools=tools(WEATHER), tool_choice="none").grammar is None


def test_strict_only_constraint() -> None:
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=tools(WEATHER, strict=False))
    assert plan_tools(req, "strict").grammar is None and plan_tools(req, "all").grammar is not None
    mixed = tools(WEATHER) + tools(ODD, strict=False)
    g = plan_tools(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=mixed), "strict").grammar
    assert '"enum"' in g and '"maximum"' not in g  # the non-strict function takes any JSON object
    required = ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=tools(ODD, strict=False),
                                     tool_choice="required")
    assert '"maximum"' in plan_tools(required, "strict").grammar  # required is always held to the schema


def test_schemas_llguidance_cannot_compile_name_the_function() -> None:
    bad = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}
    assert schema_error(bad) and schema_error(WEATHER.parameters) is None
    with pytest.raises(APIError) as e:
        plan(tools=tools(WEATHER, Function("broken", bad)), tool_choice="required")
    assert e.value.status == 400 and e.value.param == "tools.1.function.parameters"
    assert "'broken'" in e.value.message and "nowhere" in e.value.message
