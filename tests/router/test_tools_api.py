"""Tool calling and reasoning through the real router and the official openai client (scripted replies)."""

from __future__ import annotations

import json

import pytest
from conftest import RouterProcess

from mixquant_serve.tokenizer import Tokenizer
from router.tools import builtin_tool_template

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Weather in Paris?"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'

QWEN3_STYLE = """\
{%- if tools %}{{- '<|im_start|>system\\nQWEN TOOLS:' }}
    {%- for t in tools %}{{- '\\n' ~ (t | tojson) }}{%- endfor %}{{- '<|im_end|>\\n' }}
{%- endif %}
{%- for m in messages %}
    {%- if m.role == 'tool' %}
        {{- '<|im_start|>user\\n<tool_response>\\n' ~ m.content ~ '\\n</tool_response><|im_end|>\\n' }}
    {%- elif m.role != 'system' or not tools %}
        {{- '<|im_start|>' ~ m.role ~ '\\n' ~ (m.content or '') ~ '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


def set_reply(api, text: str) -> None:
    for w in api.workers:
        w.reply = text


def sent(api, rid: str):
    return next(g for w in api.workers for g in w.generate_reqs() if g.rid == rid)


def test_tool_call_non_streaming_with_the_builtin_template(api, tokenizer: Tokenizer) -> None:
    assert not tokenizer.template_supports_tools  # SmolLM2's template has no tools section
    set_reply(api, CALL)
    r = api.router.client().chat.completions.create(model=api.model, messages=ASK, tools=TOOLS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    expected = tokenizer.apply_chat_template(ASK, tools=TOOLS, chat_template=builtin_tool_template())
    assert sent(api, r.id).input_ids == tokenizer.encode(expected, add_special_tokens=False)
    assert "<tools>" in expected and '"get_weather"' in expected and "You are an agent." in expected


def test_tool_call_streaming(api) -> None:
    set_reply(api, "Checking. " + CALL)
    chunks = list(api.router.client().chat.completions.create(model=api.model, messages=ASK, tools=TOOLS,
                                                              stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert content == "Checking." and len(deltas) > 1  # as OpenAI streams: the name first, then arguments
    d = deltas[0]
    assert d.index == 0 and d.id.startswith("call_") and d.type == "function"
    assert d.function.name == "get_weather"  # its arguments: "" or what came with the name
    assert all(x.index == 0 and x.id is None and x.function.name is None for x in deltas[1:])
    assert json.loads("".join(x.function.arguments for x in deltas)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    first_call = next(i for i, c in enumerate(chunks) if c.choices[0].delta.tool_calls)
    assert any(c.choices[0].delta.content for c in chunks[:first_call])  # content streamed before the call


def test_forced_calls_extend_the_generation_prompt(api, tokenizer: Tokenizer) -> None:
    client = api.router.client()
    set_reply(api, '{"city": "Paris"}}\n</tool_call>\nAnd some chatter after the call.')
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=api.model, messages=ASK, tools=TOOLS, tool_choice=named,
                                       stop=["zzz"])
    assert r.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.content is None
    assert sent(api, r.id).params.stop == ("zzz", "</tool_call>")  # one call only: stop at its end
    prompt = tokenizer.decode(sent(api, r.id).input_ids, skip_special_tokens=False)
    assert prompt.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')
    set_reply(api, 'get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    chunks = list(client.chat.completions.create(model=api.model, messages=ASK, tools=TOOLS,
                                                 tool_choice="required", stream=True))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert json.loads("".join(c.function.arguments for c in calls)) == {"city": "Oslo"}
    prompt = tokenizer.decode(sent(api, chunks[0].id).input_ids, skip_special_tokens=False)
    assert prompt.endswith('<tool_call>\n{"name": "') and sent(api, chunks[0].id).params.stop == ()


def test_tool_choice_none_renders_without_tools(api, tokenizer: Tokenizer) -> None:
    set_reply(api, "No tool today. " + CALL)
    r = api.router.client().chat.completions.create(model=api.model, messages=ASK, tools=TOOLS,
                                                    tool_choice="none")
    assert sent(api, r.id).input_ids == tokenizer.encode_chat(ASK)
    assert r.choices[0].message.content.startswith("No tool today.") and not r.choices[0].message.tool_calls


def test_tool_results_and_assistant_calls_in_the_history(api, tokenizer: Tokenizer) -> None:
    set_reply(api, "It is sunny in Paris.")
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "sunny"}'},
    ]
    r = api.router.client().chat.completions.create(model=api.model, messages=history, tools=TOOLS)
    assert r.choices[0].message.content == "It is sunny in Paris." and r.choices[0].finish_reason == "stop"
    prompt = tokenizer.decode(sent(api, r.id).input_ids, skip_special_tokens=False)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert '<tool_response>\n{"sky": "sunny"}\n</tool_response>' in prompt


@pytest.fixture(scope="module")
def qwen_router(cluster, tokenizer_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("tpl") / "qwen3.jinja"
    path.write_text(QWEN3_STYLE)
    router = RouterProcess(tokenizer_dir, [w.address for w in cluster.workers],
                           path.parent / "router.log", "--chat-template", str(path),
                           "--served-model-name", "q")
    try:
        yield router.wait_ready()
    finally:
        router.stop()


def test_qwen3_style_template_tools_and_reasoning(api, qwen_router, tokenizer: Tokenizer) -> None:
    client = qwen_router.client()
    set_reply(api, "<think>\nThe user wants weather.\n</think>\n\n" + CALL)
    r = client.chat.completions.create(model="q", messages=ASK, tools=TOOLS)
    msg = r.choices[0].message
    assert msg.reasoning_content == "The user wants weather." and msg.content is None
    assert msg.tool_calls[0].function.name == "get_weather" and r.choices[0].finish_reason == "tool_calls"
    prompt = tokenizer.decode(sent(api, r.id).input_ids, skip_special_tokens=False)
    assert prompt.startswith("<|im_start|>system\nQWEN TOOLS:") and "<tools>" not in prompt
    chunks = list(client.chat.completions.create(model="q", messages=ASK, tools=TOOLS, stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert reasoning == "The user wants weather." and calls[0].function.name == "get_weather"
    assert not any(c.choices[0].delta.content for c in chunks)
    set_reply(api, "<think>\nSimple.\n</think>\n\nParis is sunny.")
    r = client.chat.completions.create(model="q", messages=ASK)
    msg = r.choices[0].message
    assert (msg.reasoning_content, msg.content) == ("Simple.", "Paris is sunny.")
