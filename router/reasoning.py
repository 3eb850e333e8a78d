"""Reasoning of models that think in `<think>...</think>` before answering (Qwen3 style).

The thinking streams as `reasoning_content`, the rest goes on to the next processor as content. A prompt
that already opens `<think>` (templates that force thinking) starts the output inside the reasoning;
otherwise the output is reasoning only if it begins with `<think>`. Whitespace right inside the tags and
between `</think>` and the answer is dropped, as chat templates put it back when they render the turn.
"""

from __future__ import annotations

from router.postprocess import Delta, OutputProcessor, merge, partial_tag

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def prompt_opens_thinking(prompt_text: str) -> bool:
    tail = prompt_text.rstrip()
    return tail.endswith(THINK_OPEN)


def template_thinks(template: object) -> bool:
    return THINK_OPEN in str(template or "")


class ThinkSplitter(OutputProcessor):
    def __init__(self, inner: OutputProcessor, open_in_prompt: bool = False) -> None:
        self.inner = inner
        self.state = "reasoning" if open_in_prompt else "start"  # -> "reasoning" -> "answer", or "content"
        self.buf = ""
        self.reasoning_started = False

    def feed(self, text: str) -> Delta:
        self.buf += text
        out: Delta = {}
        if self.state == "start":
            self._start()
        if self.state == "reasoning":
            out = self._reasoning()
        if self.state == "answer" and self.buf.strip():
            self.state, self.buf = "content", self.buf.lstrip()
        if self.state == "content" and self.buf:
            out = merge(out, self.inner.feed(self.buf))
            self.buf = ""
        return out

    def _start(self) -> None:
        head = self.buf.lstrip()
        if head.startswith(THINK_OPEN):
            self.state, self.buf = "reasoning", head[len(THINK_OPEN) :]
        elif not THINK_OPEN.startswith(head):  # cannot become <think> any more
            self.state = "content"

    def _reasoning(self) -> Delta:
        if not self.reasoning_started:
            self.buf = self.buf.lstrip()
        end = self.buf.find(THINK_CLOSE)
        if end >= 0:
            text, self.buf, self.state = self.buf[:end].rstrip(), self.buf[end + len(THINK_CLOSE) :], "answer"
        else:
            cut = len(self.buf) - partial_tag(self.buf, THINK_CLOSE)
            cut = len(self.buf[:cut].rstrip())  # trailing whitespace may sit right before </think>
            text, self.buf = self.buf[:cut], self.buf[cut:]
        if not text:
            return {}
        self.reasoning_started = True
        return {"reasoning_content": text}

    def finish(self, finish_reason: str) -> tuple[Delta, str]:
        out: Delta = {}
        if self.state == "reasoning" and self.buf.strip():
            out = {"reasoning_content": self.buf.rstrip()}
        elif self.state in ("start", "content") and self.buf:
            out = self.inner.feed(self.buf)
        self.buf = ""
        rest, reason = self.inner.finish(finish_reason)
        return merge(out, rest), reason
