"""`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks in streamed text -> OpenAI tool_calls.

Text outside the blocks streams as content at once, except an end that may still begin `<tool_call>` and
whitespace that may turn out to only separate calls. Inside a block, as OpenAI streams: once `{"name":
"NAME", "arguments": ` has arrived, one delta `{"index", "id": "call_<hex>", "type": "function",
"function": {"name", "arguments": ""}}`, then `{"index", "function": {"arguments": more}}` deltas as the
arguments text grows (holding back what may be the call object's closing brace). The deltas of a call always
add up to its final arguments: the raw text the model wrote, less that brace (OpenAI's arguments need not be
valid JSON when the model's is broken). A block in another shape becomes one whole delta when it closes (or
at the end, if the model stopped inside it); one that names no function stays content.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from router.postprocess import Delta, OutputProcessor, merge, partial_tag
from router.tool_grammar import CALL_CLOSE, CALL_OPEN

# a call's head up to its arguments, when they are an object (a JSON string is decoded at the end instead)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"([^"\\]+)"\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)')
_TAIL = re.compile(r"\s*\}?\s*$")  # what may still be the end of the call object after its arguments


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
    if m := _HEAD.match(body):
        return m[1], _raw_arguments(body[m.end():])
    obj = _loads(body.strip())
    if isinstance(obj, dict) and isinstance(obj.get("name"), str):
        args = obj.get("arguments", obj.get("parameters", {}))
        return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return None


def _add(calls: list[dict[str, Any]], entry: dict[str, Any]) -> None:
    """Append a tool_calls delta, folding it into the previous one of the same call."""
    if calls and calls[-1]["index"] == entry["index"]:
        calls[-1]["function"]["arguments"] += entry["function"]["arguments"]
    else:
        calls.append(entry)


class ToolCallParser(OutputProcessor):
    def __init__(self, inner: OutputProcessor, primed: str = "", parallel: bool = True) -> None:
        self.inner = inner  # receives the content between blocks
        self.parallel = parallel
        self.buf = ""
        self.in_call = False
        self.calls = 0
        self.held_space = ""  # trailing whitespace of the content: dropped if a call follows
        self.head_end: int | None = None  # where the open block's arguments start, once its head is sent
        self.sent_args = ""  # arguments of the open block streamed so far
        self.primed: Delta = self._feed(primed) if primed else {}  # sent with the first real delta

    def feed(self, text: str) -> Delta:
        delta = self._feed(text)
        if self.primed:
            delta, self.primed = merge(self.primed, delta), {}
        return delta

    def _feed(self, text: str) -> Delta:
        self.buf += text
        content: list[str] = []
        calls: list[dict[str, Any]] = []
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
                    self._stream(self.buf[: len(self.buf) - partial_tag(self.buf, CALL_CLOSE)], calls)
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

    @property
    def _wanted(self) -> bool:
        return self.parallel or self.calls == 0

    def _stream(self, partial: str, calls: list[dict[str, Any]]) -> None:
        """The open block so far: its head once complete, then the arguments that surely belong to it."""
        if self.head_end is None:
            m = _HEAD.match(partial)
            if m is None or not self._wanted:
                return
            self.head_end = m.end()
            self.held_space = ""
            _add(calls, {"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                         "function": {"name": m[1], "arguments": ""}})
        args = partial[self.head_end :].lstrip()
        args = args[: _TAIL.search(args).start()]
        if len(args) > len(self.sent_args):
            _add(calls, {"index": self.calls, "function": {"arguments": args[len(self.sent_args) :]}})
            self.sent_args = args

    def _block(self, body: str, content: list[str], calls: list[dict[str, Any]]) -> None:
        """A block ended (closing tag, or the end of the output): send what is left of its call."""
        parsed = parse_call(body)
        if parsed is None:
            content.append(self._text(CALL_OPEN + body + CALL_CLOSE))
            return
        self.held_space = ""
        name, args = parsed
        if self.head_end is not None:
            rest = args[len(self.sent_args) :] if args.startswith(self.sent_args) else ""
            _add(calls, {"index": self.calls, "function": {"arguments": rest}})
            self.calls += 1
        elif self._wanted:
            _add(calls, {"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                         "function": {"name": name, "arguments": args}})
            self.calls += 1
        self.head_end, self.sent_args = None, ""

    def _delta(self, content: str, calls: list[dict[str, Any]]) -> Delta:
        delta = self.inner.feed(content) if content else {}
        calls = [c for c in calls if "id" in c or c["function"]["arguments"]]
        return {**delta, "tool_calls": calls} if calls else delta

    def finish(self, finish_reason: str) -> tuple[Delta, str]:
        """Flush; a block cut short still counts if it names a function (a cut by length stays "length")."""
        content: list[str] = []
        calls: list[dict[str, Any]] = []
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
        if self.primed:
            delta, self.primed = merge(self.primed, delta), {}
        rest, reason = self.inner.finish(finish_reason)
        if self.calls and not (cut_short and reason == "length"):
            reason = "tool_calls"
        return merge(delta, rest), reason
