"""A request inside the engine. State lives in a few counters; everything else is derived from them.

    token_ids      prompt + output so far
    num_computed   tokens whose KV is in the request's pages (a reused prefix counts)
    pages          page table: pages[i] holds positions [i*page_size, (i+1)*page_size)

The KV of the newest token is computed by the step that feeds it, so a decoding request always has
num_computed == num_tokens - 1 before its step.

Mix-Quant (sample_in_prefill False): the prompt runs in three parts, each derived from the counters:
    [0, prefill_target)                 prefill precision (on a prefill worker when disaggregated)
    [prefill_target, num_tokens - 1)    the BF16 tail: the decode precision, as extend batches
    the newest token                    a decode step (or the tail batch's last token), which samples
so the last `bf16_tail` prompt tokens, and every sampled distribution, come from the decode precision.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from mixquant_serve.protocol.messages import TokenLogprob
from mixquant_serve.sampling_params import SamplingParams
from mixquant_serve.tokenizer import IncrementalDetokenizer

_created = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    stop_token_set: frozenset[int]
    detok: IncrementalDetokenizer | None = None
    # Mix-Quant: when prefill and decode precisions differ, the last `bf16_tail` prompt tokens (at least
    # the one before the first sample) run in the decode precision, so prefill stops that many tokens short.
    sample_in_prefill: bool = True
    bf16_tail: int = 1
    arrival: float = field(default_factory=time.monotonic)
    seq: int = field(default_factory=_created.__next__)
    status: Status = Status.WAITING
    token_ids: list[int] = field(init=False)
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob | None] = field(default_factory=list)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0
    cached_tokens: int = 0
    admitted_once: bool = False
    finish_reason: str | None = None
    error: str | None = None
    generator: torch.Generator | None = None
    # output not yet reported: (first new token index, text delta)
    reported_tokens: int = 0
    pending_text: str = ""
    stop_string_hit: bool = False
    # disaggregation: a prefill worker computes all of prompt_ids and stops (prefill_only); a decode
    # worker may wait for the KV of [kv_start, prefill_target) from remote_url (awaiting_kv)
    prefill_only: bool = False
    remote_url: str | None = None
    local_prefill_max_tokens: int = 0
    awaiting_kv: bool = False
    kv_start: int = 0
    prefix_reuse: bool = True  # False: ignore the radix cache at admission (compute or receive everything)
    matcher: object | None = None  # structured output: the grammar state (engine.structured)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_ids)
        if self.params.seed is not None:
            self.generator = torch.Generator().manual_seed(self.params.seed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def prefill_target(self) -> int:
        """How many tokens' KV prefill computes before the request decodes.

        The whole prompt when prefill samples the first token; with Mix-Quant, all but the last
        `bf16_tail` prompt tokens (the decode precision computes those); after a token is sampled (a
        recompute after preemption) all but the newest token, which the decode step feeds. Once a
        token is sampled the target no longer moves with the output.
        """
        if self.prefill_only or (self.sample_in_prefill and not self.output_ids):
            return self.num_tokens
        if not self.output_ids:
            return max(0, self.num_tokens - self.bf16_tail)
        return self.num_tokens - 1

    @property
    def age(self) -> tuple[float, int]:
        """Scheduling order: arrival time, ties broken by creation order."""
        return self.arrival, self.seq

    @property
    def in_prefill(self) -> bool:
        return self.num_computed < self.prefill_target

    @property
    def in_tail(self) -> bool:
        """Past the prefill target with more than the newest token left: the BF16 tail computes them."""
        return self.prefill_target <= self.num_computed < self.num_tokens - 1

    @property
    def decoding(self) -> bool:
        """Ready for a decode step: prefill and tail have computed all but the newest token's KV."""
        return not self.in_prefill and not self.in_tail

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def append(self, token: int, logprob: TokenLogprob | None) -> None:
        self.token_ids.append(token)
        self.output_ids.append(token)
        self.logprobs.append(logprob)
        if self.matcher is not None:
            self.matcher.consume_token(token)
        if self.detok is not None:
            text, stopped = self.detok.add([token])
            self.pending_text += text
            if stopped:
                self.finish_reason, self.stop_string_hit = "stop", True
                return
        if self.finish_reason is None:
            self.finish_reason = self._stop_reason(token)

    def _stop_reason(self, token: int) -> str | None:
        if token in self.stop_token_set and len(self.output_ids) > self.params.min_tokens:
            return "stop"
        if self.matcher is not None and self.matcher.is_stopped():  # the document is complete
            return "stop"
        if len(self.output_ids) >= self.max_new_tokens:
            return "length"
        return None

    def reset_for_recompute(self) -> None:
        """Preempted: its pages are gone; it will prefill prompt + output again."""
        self.pages = []
        self.num_computed = 0
        self.status = Status.WAITING
