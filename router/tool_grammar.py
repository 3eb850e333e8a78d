"""Grammars (llguidance, Lark syntax) that hold tool calls to the offered functions and their schemas.

The call format is the Hermes one our prompts teach (tool_template.jinja; Qwen's templates use it too):
`<tool_call>\n{"name": "NAME", "arguments": {...}}\n</tool_call>`, calls separated by a newline.
Arguments are JSON with ", " and ": " separators and no other whitespace, so that a weak model cannot
spend its tokens on blank space; a schema's own "x-guidance" options win.

- named:    the prompt already ends with `<tool_call>\n{"name": "NAME", "arguments": ` (tools.py); the
            grammar is the rest of that one call;
- required: the prompt ends with `<tool_call>\n{"name": "`; the grammar is the rest of a call to any
            offered function, then (parallel_tool_calls) any number of further whole calls;
- auto:     free text until the model writes `<tool_call>` (a lazy lexeme: the text ends at the first
            one), then the call is held to the grammar until its closing tag, then free text again. With a
            `response_format` schema the answer is either that JSON document or one or more calls.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
NAME_START = CALL_OPEN + '\n{"name": "'  # what the model writes before a function's name
ARGS_KEY = '", "arguments": '  # between the name and its arguments
CALL_END = "}\n" + CALL_CLOSE
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict[str, Any]  # the JSON Schema its arguments are held to


def _lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text)


def _schema(parameters: dict[str, Any]) -> str:
    style = {**JSON_STYLE, **(parameters.get("x-guidance") or {})}
    return json.dumps({**parameters, "x-guidance": style})


def _function_rules(fns: Sequence[Function]) -> list[str]:
    """`fn`: a function's name (JSON-escaped), the arguments key and arguments that fit its schema."""
    rules = [f"fn_{i}: {_lit(json.dumps(f.name)[1:-1] + ARGS_KEY)} %json {_schema(f.parameters)}"
             for i, f in enumerate(fns)]
    return [*rules, "fn: " + " | ".join(f"fn_{i}" for i in range(len(fns)))]


def _grammar(*rules: str) -> str:
    return "\n".join(["%llguidance {}", *rules]) + "\n"


def named_grammar(fn: Function) -> str:
    return _grammar(f"start: %json {_schema(fn.parameters)} {_lit(CALL_END)}")


def required_grammar(fns: Sequence[Function], parallel: bool) -> str:
    more = f" ({_lit(chr(10) + NAME_START)} fn {_lit(CALL_END)})*" if parallel else ""
    return _grammar(f"start: fn {_lit(CALL_END)}{more}", *_function_rules(fns))


def auto_grammar(fns: Sequence[Function], text_schema: str | None = None) -> str:
    if text_schema is not None:  # response_format: the JSON answer, or calls only
        return _grammar("start: answer | call (\"\\n\" call)*", f"answer: %json {text_schema}",
                        f"call: {_lit(NAME_START)} fn {_lit(CALL_END)}", *_function_rules(fns))
    return _grammar("start: call* tail", "tail: TEXT", "TEXT: /(.|\\n)*/",
                    f"head[lazy]: TEXT {_lit(CALL_OPEN)}",
                    f"call: head {_lit(NAME_START[len(CALL_OPEN):])} fn {_lit(CALL_END)}", *_function_rules(fns))


def schema_error(parameters: dict[str, Any]) -> str | None:
    """What llguidance says about a parameters schema it cannot compile; None if it compiles."""
    return _schema_error(json.dumps(parameters, sort_keys=True))


@functools.lru_cache(maxsize=256)
def _schema_error(text: str) -> str | None:
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_schema(json.loads(text)))
    except ValueError as e:
        return str(e)
    return llguidance.LLMatcher.validate_grammar(grammar) or None


def grammar_error(grammar: str) -> str | None:
    import llguidance

    return llguidance.LLMatcher.validate_grammar(grammar) or None
