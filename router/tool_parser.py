"""`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks in streamed text -> OpenAI tool_calls.

Text outside the blocks streams as content at once, except an end that may still begin `<tool_call>` and
whitespace that may turn out to only separate calls. A block becomes one tool_calls delta when its closing
tag arrives (or at the end, if the model stopped inside it): `{"index", "id": "call_<hex>", "type":
"function", "function": {"name", "arguments": JSON string}}`. A block whose JSON is broken beyond its name
keeps the raw arguments text (OpenAI's arguments need not be valid JSON); one without a name stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from router.postprocess import Delta, OutputProcessor, merge, partial_tag
from router.tools import CALL_CLOSE, CALL_OPEN

_NAMED = re.compile(r'\{\s*"name"\s*:\s*"([^"]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(.*)$', re.S)


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _raw_arguments(rest: str) -> str:
    """Arguments text after `"arguments": `, less the call object's own closing brace."""
    rest = rest.strip()
    if rest.endswith("}") and _loads(rest[:-1]) is not None:
        return rest[:-1].rstrip()
    if _loads(rest) is not None:
        return rest
    return rest[:-1].rstrip() if rest.endswith("}") else rest


def parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as a JSON string) of one block's text, or None if it names no function."""
    obj = _loads(body.strip())
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        args = obj.get("arguments", obj.get("parameters", {}))
        return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    m = _NAMED.match(body.strip())
    return (m[1], _raw_arguments(m[2])) if m else None


class ToolCallParser(OutputProcessor):
    def __init__(self, inner: OutputProcessor, primed: str = "", parallel: bool = True) -> None:
        self.inner = inner  # receives the content between blocks
        self.parallel = parallel
        self.buf = ""
        self.in_call = False
        self.calls = 0
        self.held_space = ""  # trailing whitespace of the content: dropped if a call follows
        if primed:
            self.feed(primed)

    def feed(self, text: str) -> Delta:
        self.buf += text
        content, calls = [], []
        while True:
            if not self.in_call:
                at = self.buf.find(CALL_OPEN)
                if at < 0:
                    keep = partial_tag(self.buf, CALL_OPEN)
                    content.append(self._text(self.buf[: len(self.buf) - keep]))
                    self.buf = self.buf[len(self.buf) - keep :]
                    break
                content.append(self._text(self.buf[:at]))
                self.buf, self.in_call = self.buf[at + len(CALL_OPEN) :], True
            else:
                end = self.buf.find(CALL_CLOSE)
                if end < 0:
                    break
                body, self.buf, self.in_call = self.buf[:end], self.buf[end + len(CALL_CLOSE) :], False
                self._block(body, content, calls)
        return self._delta("".join(content), calls)

    def _text(self, text: str) -> str:
        """Content to send now: all but its trailing whitespace, which waits for what follows."""
        text = self.held_space + text
        cut = len(text.rstrip())
        self.held_space = text[cut:]
        return text[:cut]

    def _block(self, body: str, content: list[str], calls: list[dict[str, Any]]) -> None:
        parsed = parse_call(body)
        if parsed is None:
            content.append(self._text(CALL_OPEN + body + CALL_CLOSE))
            return
        self.held_space = ""
        if self.parallel or self.calls == 0:
            name, args = parsed
            calls.append({"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                          "function": {"name": name, "arguments": args}})
            self.calls += 1

    def _delta(self, content: str, calls: list[dict[str, Any]]) -> Delta:
        delta = self.inner.feed(content) if content else {}
        return {**delta, "tool_calls": calls} if calls else delta

    def finish(self, finish_reason: str) -> tuple[Delta, str]:
        """Flush; a block cut short still counts if it names a function (a cut by length stays "length")."""
        content, calls = [], []
        cut_short = self.in_call
        if self.in_call:
            body = self.buf.rstrip()
            body = body[: len(body) - partial_tag(body, CALL_CLOSE)]
            if parse_call(body) is None:  # stopped inside a block that names nothing
                content.append(self._text(CALL_OPEN + self.buf))
            else:
                self._block(body, content, calls)
        else:
            content.append(self._text(self.buf))
        if not self.calls:
            content.append(self.held_space)
        self.buf, self.in_call, self.held_space = "", False, ""
        delta = self._delta("".join(content), calls)
        rest, reason = self.inner.finish(finish_reason)
        if self.calls and not (cut_short and reason == "length"):
            reason = "tool_calls"
        return merge(delta, rest), reason
