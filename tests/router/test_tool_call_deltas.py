"""Streamed tool calls: the name comes first, then argument deltas that add up to the final arguments."""

from __future__ import annotations

import pytest

from router.postprocess import PlainText
from router.tool_parser import ToolCallParser

ARGS = ['{"q": "a } b", "n": {"m": [1, {}]}}', "{}", '{"s": "\\"}\\n"}']


def stream(text: str, piece: int, reason: str = "stop", primed: str = "") -> tuple[list[dict], str]:
    proc = ToolCallParser(PlainText(), primed=primed)
    deltas = [proc.feed(text[i : i + piece]) for i in range(0, len(text), piece)]
    rest, reason = proc.finish(reason)
    return [c for d in [*deltas, rest] for c in d.get("tool_calls", [])], reason


def assemble(calls: list[dict]) -> dict[int, tuple[str, str]]:
    out: dict[int, list[str]] = {}
    for c in calls:
        if c["index"] not in out:
            assert c["id"].startswith("call_") and c["function"]["name"], "the first delta names the call"
            out[c["index"]] = [c["function"]["name"], ""]
        else:
            assert "id" not in c and "name" not in c["function"]
        out[c["index"]][1] += c["function"]["arguments"]
    return {i: tuple(v) for i, v in out.items()}


@pytest.mark.parametrize("piece", [1, 2, 5, 1000])
@pytest.mark.parametrize("args", ARGS)
def test_argument_deltas_add_up(piece: int, args: str) -> None:
    text = '<tool_call>\n{"name": "f", "arguments": ' + args + "}\n</tool_call>\n" + \
        '<tool_call>\n{"name": "g", "arguments": ' + args + "}\n</tool_call>"
    calls, reason = stream(text, piece)
    assert assemble(calls) == {0: ("f", args), 1: ("g", args)} and reason == "tool_calls"
    if piece == 1:
        assert len([c for c in calls if c["index"] == 0]) > 1  # streamed, not sent whole at the end


@pytest.mark.parametrize("piece", [1, 3, 1000])
def test_primed_named_call_and_cut_short(piece: int) -> None:
    primed = '<tool_call>\n{"name": "get_weather", "arguments": '
    calls, reason = stream('{"city": "Paris"}}\n</tool_call>', piece, primed=primed)
    assert assemble(calls) == {0: ("get_weather", '{"city": "Paris"}')} and reason == "tool_calls"
    calls, reason = stream('{"city": "Par', piece, "length", primed=primed)
    assert assemble(calls) == {0: ("get_weather", '{"city": "Par')} and reason == "length"


def test_string_arguments_are_decoded_whole() -> None:
    calls, _ = stream('<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', 1)
    assert assemble(calls) == {0: ("f", '{"a": 1}')} and len(calls) == 1
