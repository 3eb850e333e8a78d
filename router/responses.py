"""OpenAI response bodies and stream chunks for chat and legacy completions, logprobs included."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from mixquant_serve.protocol.messages import ReqOutput, TokenLogprob
from router.generation import ChoiceState, Generation
from router.postprocess import OutputProcessor, final_message, merge

if TYPE_CHECKING:
    from mixquant_serve.tokenizer import Tokenizer

Body = dict[str, Any]
_json = msgspec.json.Encoder()


def sse(body: Body) -> bytes:
    return b"data: " + _json.encode(body) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


@dataclass
class Envelope:
    """What every body and chunk of one request repeats."""

    id: str
    model: str
    include_usage: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def body(self, obj: str, choices: list[Body], usage: Body | None, stream: bool) -> Body:
        out: Body = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                     "choices": choices}
        if not stream or self.include_usage:
            out["usage"] = usage
        return out


class _TokenText:
    """Token strings and bytes of a batch of logprobs, looked up in one tokenizer call each."""

    def __init__(self, tok: Tokenizer, lps: list[TokenLogprob]) -> None:
        ids = list(dict.fromkeys([lp.token_id for lp in lps] + [t for lp in lps for t, _ in lp.top]))
        self.text = dict(zip(ids, tok.token_strings(ids), strict=True))
        self.raw = dict(zip(ids, tok.token_bytes(ids), strict=True))

    def entry(self, token_id: int, logprob: float) -> Body:
        return {"token": self.text[token_id], "logprob": logprob, "bytes": list(self.raw[token_id])}


def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> Body:
    names = _TokenText(tok, lps)
    content = []
    for lp in lps:
        entry = names.entry(lp.token_id, lp.logprob)
        entry["top_logprobs"] = [names.entry(t, v) for t, v in lp.top]
        content.append(entry)
    return {"content": content}


def legacy_logprobs(tok: Tokenizer, lps: list[TokenLogprob], offset: int) -> tuple[Body, int]:
    """The completions format; `offset` is where the first token starts in the choice's text."""
    names = _TokenText(tok, lps)
    tokens, offsets = [], []
    for lp in lps:
        offsets.append(offset)
        tokens.append(names.text[lp.token_id])
        offset += len(tokens[-1])
    body = {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{names.text[t]: v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }
    return body, offset


class ChatFormat:
    object_full = "chat.completion"
    object_chunk = "chat.completion.chunk"

    def __init__(self, env: Envelope, tok: Tokenizer, processors: list[OutputProcessor], logprobs: bool
                 ) -> None:
        self.env = env
        self.tok = tok
        self.processors = processors
        self.logprobs = logprobs

    def opening(self, gen: Generation) -> list[Body]:
        return [self._chunk(st.index, {"role": "assistant", "content": ""}, None, None) for st in gen.choices]

    def chunk(self, st: ChoiceState, out: ReqOutput) -> Body | None:
        proc = self.processors[st.index]
        delta = proc.feed(out.text)
        lp = chat_logprobs(self.tok, out.logprobs) if self.logprobs and out.logprobs else None
        if out.finished:
            rest, reason = proc.finish(st.finish_reason or "stop")
            return self._chunk(st.index, merge(delta, rest), reason, lp)
        return self._chunk(st.index, delta, None, lp) if delta or lp else None

    def _chunk(self, index: int, delta: Body, reason: str | None, lp: Body | None) -> Body:
        choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
        return self.env.body(self.object_chunk, [choice], None, stream=True)

    def response(self, gen: Generation) -> Body:
        choices = []
        for st in gen.choices:
            proc = self.processors[st.index]
            delta = proc.feed("".join(st.text))
            rest, reason = proc.finish(st.finish_reason or "stop")
            lp = chat_logprobs(self.tok, st.logprobs) if self.logprobs else None
            choices.append({"index": st.index, "message": final_message(merge(delta, rest)), "logprobs": lp,
                            "finish_reason": reason})
        return self.env.body(self.object_full, choices, gen.usage(), stream=False)

    def usage_chunk(self, gen: Generation) -> Body:
        return self.env.body(self.object_chunk, [], gen.usage(), stream=True)


class CompletionFormat:
    object_full = object_chunk = "text_completion"

    def __init__(self, env: Envelope, tok: Tokenizer, echo: list[str] | None, logprobs: bool) -> None:
        self.env = env
        self.tok = tok
        self.echo = echo  # per prompt: the text to put before the completion
        self.logprobs = logprobs
        self.offsets: dict[int, int] = {}  # choice index -> text offset of its next token
        self.started: set[int] = set()

    def opening(self, gen: Generation) -> list[Body]:
        return []

    def chunk(self, st: ChoiceState, out: ReqOutput) -> Body | None:
        text = out.text
        if st.index not in self.started:
            self.started.add(st.index)
            text = self._prefix(st) + text
        lp = None
        if self.logprobs and out.logprobs:
            offset = self.offsets.get(st.index, 0)
            lp, self.offsets[st.index] = legacy_logprobs(self.tok, out.logprobs, offset)
        if not (text or lp or out.finished):
            return None
        reason = (st.finish_reason or "stop") if out.finished else None
        choice = {"index": st.index, "text": text, "logprobs": lp, "finish_reason": reason}
        return self.env.body(self.object_chunk, [choice], None, stream=True)

    def _prefix(self, st: ChoiceState) -> str:
        return self.echo[st.spec.prompt_index] if self.echo else ""

    def response(self, gen: Generation) -> Body:
        choices = []
        for st in gen.choices:
            lp = legacy_logprobs(self.tok, st.logprobs, 0)[0] if self.logprobs else None
            choices.append({"index": st.index, "text": self._prefix(st) + "".join(st.text), "logprobs": lp,
                            "finish_reason": st.finish_reason or "stop"})
        return self.env.body(self.object_full, choices, gen.usage(), stream=False)

    def usage_chunk(self, gen: Generation) -> Body:
        return self.env.body(self.object_chunk, [], gen.usage(), stream=True)
