"""Tools of a chat request: validation, which template renders them, and how a tool call is forced.

Tools go through the model's own chat template when it has a tools section (or through --chat-template,
which overrides everything); otherwise through tool_template.jinja, our ChatML template in the Hermes style.
`tool_choice` "none" renders no tools and parses no calls; "required" and a named function append the start
of a call to the generation prompt (`<tool_call>\n{"name": "` or the whole name), and the output parser reads
that start as if the model had written it. When only one call may come (a named function,
parallel_tool_calls=false), generation stops at its closing tag.

Constrained decoding (tool_grammar.py): "required" and a named function are always held to a grammar: calls
to offered functions only, with arguments valid against their `parameters`. In "auto" the text is free and
each call the model opens is held the same way; `--tool-call-constraint strict` holds only the functions
marked `strict: true` to their schema in "auto" (the others then take any JSON object as arguments, and
without any strict function "auto" is not constrained at all).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.errors import APIError
from router.openai_api import ChatCompletionRequest
from router.params import response_schema
from router.tool_grammar import (
    ANY_OBJECT,
    ARGS_KEY,
    CALL_CLOSE,
    NAME_START,
    Function,
    auto_grammar,
    grammar_error,
    named_grammar,
    required_grammar,
    schema_error,
)


@functools.cache
def builtin_tool_template() -> str:
    return Path(__file__).with_name("tool_template.jinja").read_text(encoding="utf-8")


@dataclass(frozen=True)
class ToolPlan:
    tools: list[dict[str, Any]] | None  # what the template renders (None: no tools section)
    forced: str = ""  # appended to the generation prompt; the parser reads it as the output's start
    named: str | None = None  # the function tool_choice names
    parse: bool = False  # parse <tool_call> blocks out of the output
    parallel: bool = True
    grammar: str | None = None  # llguidance grammar the output is held to (tool_grammar)

    @property
    def stop(self) -> tuple[str, ...]:
        """Stop strings the plan adds: one call allowed, so nothing after its end is wanted."""
        return (CALL_CLOSE,) if self.parse and not self.parallel else ()


def _bad(message: str, param: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def _check_tools(tools: list[dict[str, Any]]) -> set[str]:
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise _bad("each tool must be {'type': 'function', 'function': {...}}", f"tools.{i}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise _bad("each tool function needs a name", f"tools.{i}.function.name")
        if not isinstance(fn.get("parameters", {}), dict):
            raise _bad("a function's parameters must be a JSON Schema object", f"tools.{i}.function.parameters")
        names.add(fn["name"])
    return names


def _functions(tools: list[dict[str, Any]], only: str | None = None, strict_only: bool = False) -> list[Function]:
    """The functions a grammar holds calls to: all, or the one named; with strict_only the arguments of
    functions not marked strict may be any JSON object. A schema llguidance cannot compile is a 400."""
    fns = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        if only is not None and fn["name"] != only:
            continue
        params = fn.get("parameters") or ANY_OBJECT
        if strict_only and fn.get("strict") is not True:
            params = ANY_OBJECT
        elif (why := schema_error(params)) is not None:
            raise APIError(400, f"function {fn['name']!r}: its parameters schema cannot be used for constrained "
                                f"decoding: {why}", param=f"tools.{i}.function.parameters",
                           code="invalid_function_parameters")
        fns.append(Function(fn["name"], params))
    return fns


def _checked(grammar: str) -> str:
    if (why := grammar_error(grammar)) is not None:
        raise APIError(400, f"the tool-call grammar of these tools cannot be compiled: {why}", param="tools",
                       code="invalid_value")
    return grammar


def _auto_grammar(req: ChatCompletionRequest, tools: list[dict[str, Any]], constraint: str) -> str | None:
    strict_only = constraint == "strict"
    if strict_only and not any(t["function"].get("strict") is True for t in tools):
        return None
    return _checked(auto_grammar(_functions(tools, strict_only=strict_only), response_schema(req)))


def _choice_name(choice: dict[str, Any]) -> str:
    fn = choice.get("function")
    if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}}", "tool_choice")
    return fn["name"]


def plan_tools(req: ChatCompletionRequest, constraint: str = "all") -> ToolPlan:
    """What the template renders, what the prompt is extended with, and the grammar of the output."""
    tools, choice = req.tools or None, req.tool_choice
    if isinstance(choice, str) and choice not in ("none", "auto", "required"):
        raise _bad(f"unknown tool_choice {choice!r}", "tool_choice")
    names = _check_tools(tools) if tools else set()
    if choice == "none" or (choice is None and not tools):
        return ToolPlan(None)
    if not tools:
        raise _bad("tool_choice needs tools", "tool_choice")
    parallel = req.parallel_tool_calls is not False
    if choice == "required":
        grammar = _checked(required_grammar(_functions(tools), parallel))
        return ToolPlan(tools, NAME_START, parse=True, parallel=parallel, grammar=grammar)
    if isinstance(choice, dict):
        name = _choice_name(choice)
        if name not in names:
            raise _bad(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        forced = NAME_START + json.dumps(name)[1:-1] + ARGS_KEY
        grammar = _checked(named_grammar(_functions(tools, only=name)[0]))
        return ToolPlan(tools, forced, named=name, parse=True, parallel=False, grammar=grammar)
    return ToolPlan(tools, parse=True, parallel=parallel, grammar=_auto_grammar(req, tools, constraint))


def uses_tool_messages(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
