"""Tools of a chat request: validation, which template renders them, and how a tool call is forced.

Tools go through the model's own chat template when it has a tools section (or through --chat-template,
which overrides everything); otherwise through tool_template.jinja, our ChatML template in the Hermes style.
`tool_choice` "none" renders no tools; "required" and a named function append the start of a call to the
generation prompt (`<tool_call>\n{"name": "` or the whole name), and the output parser reads that start
as if the model had written it. When only one call may come (a named function, parallel_tool_calls=false),
generation stops at its closing tag.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from router.errors import APIError
from router.openai_api import ChatCompletionRequest

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


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
        names.add(fn["name"])
    return names


def _choice_name(choice: dict[str, Any]) -> str:
    fn = choice.get("function")
    if choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise _bad("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                   "{'name': ...}}", "tool_choice")
    return fn["name"]


def plan_tools(req: ChatCompletionRequest) -> ToolPlan:
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
        return ToolPlan(tools, CALL_OPEN + '\n{"name": "', parse=True, parallel=parallel)
    if isinstance(choice, dict):
        name = _choice_name(choice)
        if name not in names:
            raise _bad(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        forced = CALL_OPEN + '\n{"name": "' + name + '", "arguments": '
        return ToolPlan(tools, forced, named=name, parse=True, parallel=False)
    return ToolPlan(tools, parse=True, parallel=parallel)


def uses_tool_messages(messages: list[dict[str, Any]]) -> bool:
    return any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)
