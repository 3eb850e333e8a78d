"""One HTTP request's generation: its choices (one GenerateReq each) placed on one worker, outputs merged.

In disaggregated serving every GenerateReq goes to the decode worker with the url of the prefill worker
that placement paired with it; that prefill worker counts the request as its load until the first output
(the prompt's KV has arrived by then) or the end.

`next()` hands out (choice, increment) pairs in arrival order and raises when the worker failed a choice
(APIError) or the client went away (ClientDisconnected). `close()` is synchronous and idempotent: it aborts
every choice still running, so it is safe in any finally, cancelled task or not.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from mixquant_serve.protocol.messages import GenerateReq, ReqOutput, TokenLogprob
from mixquant_serve.sampling_params import SamplingParams
from router.errors import worker_error
from router.metrics import TokenTimer
from router.placement import Target


class ClientDisconnected(Exception):
    """The HTTP client went away; the request's choices have been aborted."""


@dataclass(frozen=True)
class ChoiceSpec:
    index: int
    prompt_index: int
    input_ids: list[int]
    params: SamplingParams


@dataclass
class ChoiceState:
    spec: ChoiceSpec
    rid: str
    token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def index(self) -> int:
        return self.spec.index

    def update(self, out: ReqOutput) -> None:
        self.token_ids += out.token_ids
        if out.text:
            self.text.append(out.text)
        if out.logprobs:
            self.logprobs += out.logprobs
        self.prompt_tokens = out.prompt_tokens or self.prompt_tokens or len(self.spec.input_ids)
        self.cached_tokens = max(self.cached_tokens, out.cached_tokens)
        self.completion_tokens = max(self.completion_tokens, out.completion_tokens, len(self.token_ids))
        if out.finished:
            self.finish_reason = out.finish_reason or "stop"


class Generation:
    def __init__(self, rid: str, target: Target, choices: list[ChoiceSpec], timer: TokenTimer,
                 session_id: str | None = None, local_prefill_max_tokens: int | None = None) -> None:
        self.rid = rid
        self.target = target
        self.link = target.worker
        self.prefill = target.prefill
        self.decode_prefix_reuse = target.decode_prefix_reuse
        self.timer = timer
        self.session_id = session_id
        self.local_prefill_max_tokens = local_prefill_max_tokens if self.link.role == "decode" else None
        many = len(choices) > 1
        rids = [f"{rid}-{c.index}" if many else rid for c in choices]
        self.states = {r: ChoiceState(c, r) for r, c in zip(rids, choices, strict=True)}
        self.queue: asyncio.Queue[ReqOutput | None] = asyncio.Queue()
        self.watcher: asyncio.Task | None = None
        self.unfinished = len(choices)

    @property
    def choices(self) -> list[ChoiceState]:
        return list(self.states.values())

    @property
    def done(self) -> bool:
        return self.unfinished == 0

    def start(self) -> None:
        prefill_url = self.prefill.url if self.prefill else None
        for rid, st in self.states.items():
            req = GenerateReq(rid=rid, input_ids=st.spec.input_ids, params=st.spec.params,
                              session_id=self.session_id, prefill_url=prefill_url,
                              local_prefill_max_tokens=self.local_prefill_max_tokens,
                              decode_prefix_reuse=self.decode_prefix_reuse or prefill_url is None)
            if self.prefill is not None:
                self.prefill.prefilling.add(rid)
                self.prefill.prefills_assigned += 1
            self.link.submit(req, self)

    def deliver(self, out: ReqOutput) -> None:
        self.queue.put_nowait(out)

    def watch(self, receive: Receive) -> None:
        """Cancel this generation as soon as the ASGI connection reports a disconnect."""
        self.watcher = asyncio.create_task(_watch_disconnect(receive, self.cancel))

    def cancel(self) -> None:
        self.close()
        self.queue.put_nowait(None)

    def close(self) -> None:
        for rid, st in self.states.items():
            if self.prefill is not None:
                self.prefill.prefilling.discard(rid)
            if st.finish_reason is None:
                self.link.abort(rid)
        if self.watcher is not None and self.watcher is not asyncio.current_task():
            self.watcher.cancel()

    async def next(self) -> tuple[ChoiceState, ReqOutput]:
        out = await self.queue.get()
        if out is None:
            raise ClientDisconnected()
        st = self.states[out.rid]
        st.update(out)
        if self.prefill is not None:
            self.prefill.prefilling.discard(out.rid)
        self.timer.on_tokens(out.rid, len(out.token_ids))
        if out.finished:
            self.unfinished -= 1
            if out.error or out.finish_reason in ("error", "abort"):
                self.close()
                code = out.error_code or ("aborted" if out.finish_reason == "abort" else None)
                raise worker_error(out.error or "the worker aborted the request", code, out.error_param)
            if self.done:
                self.timer.on_usage(**self.usage_counts())
        return st, out

    def usage_counts(self) -> dict[str, int]:
        prompt: dict[int, int] = {}
        cached: dict[int, int] = {}
        for st in self.states.values():
            p = st.spec.prompt_index
            prompt[p] = max(prompt.get(p, 0), st.prompt_tokens or len(st.spec.input_ids))
            cached[p] = max(cached.get(p, 0), st.cached_tokens)
        completion = sum(st.completion_tokens for st in self.states.values())
        return {"prompt": sum(prompt.values()), "cached": sum(cached.values()), "completion": completion}

    def usage(self) -> dict[str, Any]:
        c = self.usage_counts()
        return {
            "prompt_tokens": c["prompt"],
            "completion_tokens": c["completion"],
            "total_tokens": c["prompt"] + c["completion"],
            "prompt_tokens_details": {"cached_tokens": c["cached"]},
        }


Receive = Callable[[], Awaitable[dict[str, Any]]]


async def _watch_disconnect(receive: Receive, on_disconnect: Callable[[], None]) -> None:
    with contextlib.suppress(asyncio.CancelledError):
        while (await receive())["type"] != "http.disconnect":
            pass
        on_disconnect()
