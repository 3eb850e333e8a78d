"""What benchmarks/load.py accepts as a correct answer: pure checks of one OpenAI response, JSON or SSE.

Each check returns a list of problems (empty: well-formed). A response is well-formed when
- chat JSON: object "chat.completion", `n` choices indexed 0..n-1, each an assistant message with a finish
  reason in FINISH_REASONS, and usage whose total is prompt + completion, completion <= n * max_tokens;
- an SSE stream: every event JSON until exactly one final `[DONE]`, one id, each choice finished exactly
  once, the usage chunk (when asked for) after every finish, no error event;
- tool calls (both forms): an id, type "function", a declared function name, arguments a string; a choice
  that finishes with "tool_calls" has at least one.
An error body is well-formed when it has OpenAI's shape {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import json
from typing import Any

FINISH_REASONS = ("stop", "length", "tool_calls")


def error_shape(body: Any) -> list[str]:
    err = body.get("error") if isinstance(body, dict) else None
    if not isinstance(err, dict):
        return [f"error body is not {{'error': {{...}}}}: {str(body)[:200]}"]
    missing = [k for k in ("message", "type", "param", "code") if k not in err]
    bad = [] if isinstance(err.get("message"), str) and isinstance(err.get("type"), str) else ["message/type"]
    return [f"error body lacks {missing + bad}: {str(body)[:200]}"] if missing or bad else []


def usage_problems(usage: Any, n: int, max_tokens: int) -> list[str]:
    if not isinstance(usage, dict):
        return [f"no usage: {usage!r}"]
    p, c, t = usage.get("prompt_tokens"), usage.get("completion_tokens"), usage.get("total_tokens")
    if not all(isinstance(x, int) for x in (p, c, t)):
        return [f"usage fields are not integers: {usage}"]
    problems = [] if t == p + c else [f"usage total {t} != prompt {p} + completion {c}"]
    if p <= 0:
        problems.append(f"prompt_tokens {p}")
    if not 0 <= c <= n * max_tokens:
        problems.append(f"completion_tokens {c} outside [0, {n} x {max_tokens}]")
    return problems


def tool_call_problems(calls: list[dict[str, Any]], names: set[str]) -> list[str]:
    problems = []
    for call in calls:
        fn = call.get("function") or {}
        if not call.get("id") or call.get("type") != "function":
            problems.append(f"tool call without id or type function: {call}")
        if fn.get("name") not in names:
            problems.append(f"tool call names an undeclared function: {fn.get('name')!r}")
        if not isinstance(fn.get("arguments"), str):
            problems.append(f"tool call arguments are not a string: {fn.get('arguments')!r}")
    return problems


def chat_problems(body: Any, n: int, max_tokens: int, tool_names: set[str]) -> list[str]:
    """A non-streamed chat completion."""
    if not isinstance(body, dict) or body.get("object") != "chat.completion":
        return [f"not a chat.completion: {str(body)[:200]}"]
    choices = body.get("choices") or []
    problems = [] if sorted(c.get("index") for c in choices) == list(range(n)) else [
        f"choice indexes {[c.get('index') for c in choices]} for n={n}"]
    for c in choices:
        msg, reason = c.get("message") or {}, c.get("finish_reason")
        if msg.get("role") != "assistant" or reason not in FINISH_REASONS:
            problems.append(f"choice {c.get('index')}: role {msg.get('role')!r}, finish_reason {reason!r}")
        calls = msg.get("tool_calls") or []
        problems += tool_call_problems(calls, tool_names)
        if reason == "tool_calls" and not calls:
            problems.append(f"choice {c.get('index')} finished with tool_calls but has none")
    return problems + usage_problems(body.get("usage"), n, max_tokens)


class StreamCheck:
    """Feeds SSE `data:` payloads of a streamed chat completion one by one; `problems()` at the end."""

    def __init__(self, n: int, max_tokens: int, tool_names: set[str], want_usage: bool) -> None:
        self.n, self.max_tokens, self.tool_names, self.want_usage = n, max_tokens, tool_names, want_usage
        self.ids: set[str] = set()
        self.finished: dict[int, str] = {}
        self.calls: dict[tuple[int, int], dict[str, Any]] = {}
        self.usage: Any = None
        self.done = False
        self.errors: list[Any] = []
        self.bad: list[str] = []
        self.events = 0

    def feed(self, data: str) -> None:
        self.events += 1
        if self.done:
            self.bad.append(f"event after [DONE]: {data[:100]}")
        elif data == "[DONE]":
            self.done = True
        else:
            try:
                self._chunk(json.loads(data))
            except (ValueError, AttributeError, TypeError) as e:
                self.bad.append(f"undecodable event {data[:100]!r}: {e}")

    def _chunk(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            self.errors.append(chunk)
            return
        if chunk.get("object") != "chat.completion.chunk":
            self.bad.append(f"not a chat.completion.chunk: {str(chunk)[:100]}")
        self.ids.add(chunk.get("id"))
        if chunk.get("usage") is not None:
            if self.usage is not None or len(self.finished) < self.n:
                self.bad.append("usage chunk twice or before every choice finished")
            self.usage = chunk["usage"]
        for c in chunk.get("choices") or []:
            self._choice(c)

    def _choice(self, c: dict[str, Any]) -> None:
        i = c.get("index")
        if not isinstance(i, int) or not 0 <= i < self.n or i in self.finished:
            self.bad.append(f"chunk for choice {i!r} (n={self.n}, finished {sorted(self.finished)})")
            return
        for tc in (c.get("delta") or {}).get("tool_calls") or []:
            call = self.calls.setdefault((i, tc.get("index")), {"id": None, "type": None,
                                                                 "function": {"name": None, "arguments": ""}})
            call["id"] = tc.get("id") or call["id"]
            call["type"] = tc.get("type") or call["type"]
            fn = tc.get("function") or {}
            call["function"]["name"] = fn.get("name") or call["function"]["name"]
            call["function"]["arguments"] += fn.get("arguments") or ""
        if c.get("finish_reason") is not None:
            self.finished[i] = c["finish_reason"]

    def problems(self) -> list[str]:
        out = list(self.bad)
        if not self.done:
            out.append(f"stream ended without [DONE] after {self.events} events")
        if len(self.ids) > 1:
            out.append(f"{len(self.ids)} different ids in one stream")
        if len(self.finished) != self.n or any(r not in FINISH_REASONS for r in self.finished.values()):
            out.append(f"finish reasons {self.finished} for n={self.n}")
        out += tool_call_problems(list(self.calls.values()), self.tool_names)
        for i, reason in self.finished.items():
            if reason == "tool_calls" and not any(k[0] == i for k in self.calls):
                out.append(f"choice {i} finished with tool_calls but streamed none")
        if self.want_usage:
            out += usage_problems(self.usage, self.n, self.max_tokens)
        return out
