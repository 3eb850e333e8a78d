"""Tool-call and reasoning parsers: streamed in pieces of every size they give what one whole text gives."""

from __future__ import annotations

import json

import pytest

from router.openai_api import ChatCompletionRequest
from router.postprocess import PlainText, final_message, merge
from router.reasoning import ThinkSplitter, prompt_opens_thinking
from router.tool_parser import ToolCallParser, parse_call
from router.tools import plan_tools

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2]}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def run(make, text: str, piece: int, reason: str = "stop") -> tuple[dict, str, list[dict]]:
    """Feed `text` in pieces of `piece` characters; the merged message, the finish reason, every delta."""
    proc = make()
    deltas = [proc.feed(text[i : i + piece]) for i in range(0, len(text), piece)]
    rest, reason = proc.finish(reason)
    deltas.append(rest)
    merged: dict = {}
    for d in deltas:
        merge(merged, d)
    return merged, reason, [d for d in deltas if d]


def tools_parser(**kw):
    return lambda: ToolCallParser(PlainText(), **kw)


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_text_then_a_call(piece: int) -> None:
    text = "Let me check. " + CALL
    merged, reason, deltas = run(tools_parser(), text, piece)
    assert reason == "tool_calls" and merged["content"] == "Let me check."
    (call,) = merged["tool_calls"]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich", "days": [1, 2]}
    assert not any("<" in d.get("content", "") for d in deltas)  # no piece of a tag leaks into content
    calls_at = next(i for i, d in enumerate(deltas) if "tool_calls" in d)
    assert all("tool_calls" not in d for d in deltas[:calls_at])


@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_two_calls_get_indices_and_whitespace_between_them_is_not_content(piece: int) -> None:
    second = CALL.replace("get_weather", "now").replace('{"city": "Zürich", "days": [1, 2]}', "{}")
    merged, reason, _ = run(tools_parser(), "\n" + CALL + "\n" + second + "\n", piece)
    assert [c["index"] for c in merged["tool_calls"]] == [0, 1]
    assert [c["function"]["name"] for c in merged["tool_calls"]] == ["get_weather", "now"]
    assert merged["tool_calls"][1]["function"]["arguments"] == "{}"
    assert "content" not in merged and reason == "tool_calls"
    assert final_message(merged)["content"] is None
    assert "index" not in final_message(merged)["tool_calls"][0]
    one, _, _ = run(tools_parser(parallel=False), CALL + second, piece)
    assert [c["function"]["name"] for c in one["tool_calls"]] == ["get_weather"]


def test_plain_text_and_lookalikes_stay_content() -> None:
    for text in ("No tools needed, 3 < 4.", "a <tool_ b", "<tool_call>not json</tool_call> ok"):
        for piece in (1, 4, 100):
            merged, reason, _ = run(tools_parser(), text, piece)
            assert merged.get("content") == text and reason == "stop" and "tool_calls" not in merged


def test_unclosed_call_at_the_end_still_counts() -> None:
    merged, reason, _ = run(tools_parser(), CALL.removesuffix("\n</tool_call>"), 3, reason="stop")
    assert merged["tool_calls"][0]["function"]["name"] == "get_weather" and reason == "tool_calls"
    merged, reason, _ = run(tools_parser(), '<tool_call>{"name": "f", "arguments": {"a": 1}}\n</tool_c', 3,
                            reason="length")
    assert merged["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"a": 1}'}
    assert reason == "length"
    merged, reason, _ = run(tools_parser(), "<tool_call>\n{\"na", 3, reason="length")
    assert merged["content"] == "<tool_call>\n{\"na" and reason == "length"


def test_forced_prefix_is_read_as_output() -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    plan = plan_tools(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                            tool_choice=named))
    assert plan.forced == '<tool_call>\n{"name": "get_weather", "arguments": '
    merged, reason, _ = run(tools_parser(primed=plan.forced), '{"city": "Paris"}}\n</tool_call>', 2)
    assert merged["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # broken JSON in the arguments keeps its raw text: OpenAI's arguments need not be valid JSON
    merged, _, _ = run(tools_parser(primed=plan.forced), '{"city": Paris}}', 2)
    assert merged["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": Paris}'}
    required = plan_tools(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], tools=TOOLS,
                                                tool_choice="required"))
    merged, _, _ = run(tools_parser(primed=required.forced), 'get_weather", "arguments": {}}</tool_call>', 4)
    assert merged["tool_calls"][0]["function"]["name"] == "get_weather"


def test_parse_call_variants() -> None:
    assert parse_call('{"name": "f", "arguments": "{\\"a\\": 1}"}') == ("f", '{"a": 1}')
    assert parse_call('{"name": "f", "parameters": {"a": 1}}') == ("f", '{"a": 1}')
    assert parse_call('{"name": "f"}') == ("f", "{}")
    assert parse_call('{"arguments": {}}') is None and parse_call("hello") is None


def test_tool_plans() -> None:
    def plan(**kw):
        return plan_tools(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **kw))

    assert plan().tools is None and not plan().parse
    none = plan(tools=TOOLS, tool_choice="none")
    assert none.tools is None and not none.parse
    auto = plan(tools=TOOLS)
    assert auto.tools == TOOLS and auto.parse and auto.forced == ""
    assert not plan(tools=TOOLS, parallel_tool_calls=False).parallel


THOUGHT = "<think>\nFirst, the user wants weather.\nSo call it.\n</think>\n\n"


@pytest.mark.parametrize("piece", [1, 2, 3, 9, 1000])
def test_reasoning_splits_from_content(piece: int) -> None:
    merged, reason, _ = run(lambda: ThinkSplitter(PlainText()), THOUGHT + "It is sunny.", piece)
    assert merged == {"reasoning_content": "First, the user wants weather.\nSo call it.",
                      "content": "It is sunny."}
    merged, _, _ = run(lambda: ThinkSplitter(PlainText(), open_in_prompt=True),
                       THOUGHT.removeprefix("<think>") + "Hi", piece)
    assert merged == {"reasoning_content": "First, the user wants weather.\nSo call it.", "content": "Hi"}


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_reasoning_then_tool_call_and_no_reasoning(piece: int) -> None:
    merged, reason, _ = run(lambda: ThinkSplitter(ToolCallParser(PlainText())), THOUGHT + CALL, piece)
    assert merged["reasoning_content"].startswith("First") and "content" not in merged
    assert merged["tool_calls"][0]["function"]["name"] == "get_weather" and reason == "tool_calls"
    merged, _, _ = run(lambda: ThinkSplitter(PlainText()), "  <thin k> is not a tag", piece)
    assert merged == {"content": "  <thin k> is not a tag"}
    merged, reason, _ = run(lambda: ThinkSplitter(PlainText()), "<think>\nstill thinking", piece, "length")
    assert merged == {"reasoning_content": "still thinking"} and reason == "length"


def test_prompt_opens_thinking() -> None:
    assert prompt_opens_thinking("<|im_start|>assistant\n<think>\n")
    assert not prompt_opens_thinking("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# ------------------------------------------------------------------------------ property: split anywhere
_FRAGMENTS = ["Let me check.", " ", "\n", "<tool_call>", "</tool_call>", "<think>", "</think>", "<", "<tool",
              "</", "call>", '{"name": "get_weather", "arguments": {"city": "Zürich"}}', '{"name": "f"}',
              '{"arguments": 1}', "{", "}", '"', "Zürich", "ü", "It is sunny.", "<tool_call>\n", "\n</tool_call>"]


def _without_ids(merged: dict) -> dict:
    calls = [{k: v for k, v in c.items() if k != "id"} for c in merged.get("tool_calls", [])]
    return {**merged, **({"tool_calls": calls} if calls else {})}


def _split_runs(make, text: str, cuts: list[int], reason: str) -> tuple[dict, str]:
    proc, merged = make(), {}
    bounds = [0, *sorted({c % (len(text) + 1) for c in cuts}), len(text)]
    for a, b in zip(bounds, bounds[1:], strict=False):
        merge(merged, proc.feed(text[a:b]))
    rest, reason = proc.finish(reason)
    merge(merged, rest)
    return _without_ids(merged), reason


def test_any_split_of_any_output_parses_as_the_whole_text() -> None:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    makers = {"tools": tools_parser(), "think": lambda: ThinkSplitter(PlainText()),
              "think+tools": lambda: ThinkSplitter(ToolCallParser(PlainText())),
              "opened think+tools": lambda: ThinkSplitter(ToolCallParser(PlainText()), open_in_prompt=True)}

    @settings(max_examples=400, deadline=None, derandomize=True, database=None)
    @given(parts=st.lists(st.sampled_from(_FRAGMENTS), max_size=12), cuts=st.lists(st.integers(0, 400), max_size=8),
           kind=st.sampled_from(sorted(makers)), reason=st.sampled_from(["stop", "length"]))
    def check(parts, cuts, kind, reason):
        text = "".join(parts)
        whole = _split_runs(makers[kind], text, [], reason)
        assert _split_runs(makers[kind], text, cuts, reason) == whole, (text, cuts)
        assert _split_runs(makers[kind], text, list(range(len(text))), reason) == whole, text  # one char at a time

    check()
