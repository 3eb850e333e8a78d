"""Per-choice output processors of chat completions: text deltas in, assistant-message fields out.

A processor may hold text back, split it into fields and rewrite the finish reason. The chain for one
choice: ThinkSplitter (`<think>...</think>` -> reasoning_content, when the model thinks) feeding
ToolCallParser (`<tool_call>` blocks -> tool_calls, when the request has tools) or PlainText. The
non-streaming answer is built from the same deltas, so both modes agree.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

Delta = dict[str, Any]


class OutputProcessor(ABC):
    @abstractmethod
    def feed(self, text: str) -> Delta:
        """A text delta from the engine; the message fields to send now (maybe none)."""

    def finish(self, finish_reason: str) -> tuple[Delta, str]:
        """Flush anything held back; return it and the finish reason to report."""
        return {}, finish_reason


class PlainText(OutputProcessor):
    def feed(self, text: str) -> Delta:
        return {"content": text} if text else {}


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag` (text to hold back)."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def merge(into: Delta, delta: Delta) -> Delta:
    """Accumulate deltas into one message: strings are joined, lists extended (tool-call deltas of one call,
    same index, are folded into it), other values replaced."""
    for key, value in delta.items():
        if isinstance(value, str) and isinstance(into.get(key), str):
            into[key] += value
        elif key == "tool_calls" and isinstance(into.get(key), list):
            into[key] = _merge_calls(into[key], value)
        elif isinstance(value, list) and isinstance(into.get(key), list):
            into[key] = into[key] + value
        else:
            into[key] = value
    return into


def _merge_calls(calls: list[Delta], more: list[Delta]) -> list[Delta]:
    by_index = {c["index"]: {**c, "function": dict(c["function"])} for c in calls}
    for c in more:
        if (old := by_index.get(c["index"])) is None:
            by_index[c["index"]] = {**c, "function": dict(c["function"])}
        else:
            old["function"]["arguments"] = old["function"].get("arguments", "") + c["function"].get("arguments", "")
            old.update({k: v for k, v in c.items() if k not in ("function", "index")})
            old["function"].update({k: v for k, v in c["function"].items() if k != "arguments"})
    return list(by_index.values())


def final_message(delta: Delta) -> Delta:
    """A whole message from merged deltas: tool calls lose their stream index, content may be null."""
    message = {"role": "assistant", "content": delta.get("content") or None, **{
        k: v for k, v in delta.items() if k not in ("role", "content", "tool_calls")}}
    if delta.get("tool_calls"):
        message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in delta["tool_calls"]]
    elif message["content"] is None:
        message["content"] = ""
    return message
