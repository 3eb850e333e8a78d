"""Overlapped decode: the next decode step is launched before the host reads the current step's tokens.

Without it every decode step ends in a device-to-host sync (the sampled token ids), and the GPU idles while
the host appends tokens, detokenizes, checks stop conditions, schedules and plans the next batch. Here, as
in SGLang's overlap scheduler, a decode step's tokens stay on the device: they are the next step's input
ids (copied device to device), while their host copy arrives asynchronously and is read one step later.

    step k:   launch forward(k) -> sample on device -> async copy to host
    step k+1: launch forward(k+1) on the same requests, ids = tokens(k) on the device,
              then wait for tokens(k) and apply them (append, detokenize, stop, finish)

The step launched ahead assumes that every request continues. A request that finished at step k (a stop
token, max_tokens, a stop string) has one extra token computed at k+1: correct KV for its last token,
which is dropped with the request, and a sampled token that is discarded. Only plain decode rows run ahead
(sampling without penalties, logprobs, min_tokens or a grammar, whose next step needs the host's view of
the tokens); anything else, a waiting request, a prefill chunk or a BF16 tail drains the pipeline first. The KV pages
of the step ahead are allocated before it launches, without preempting anything.
"""

from __future__ import annotations

from collections.abc import Container
from typing import NamedTuple

import torch

from mixquant_serve.engine.request import Request
from mixquant_serve.engine.scheduler import Batch, Phase, Scheduler
from mixquant_serve.layers.sampler import uses_penalties


class InFlight(NamedTuple):
    batch: Batch
    tokens: torch.Tensor  # [B] sampled ids on the device: the next step's input
    host: torch.Tensor  # [B] their copy on the host (pinned on CUDA), valid once `ready` has passed
    ready: torch.cuda.Event | None
    void: frozenset[str]  # rids whose row is discarded: they finished before this step was read


def plain_row(req: Request) -> bool:
    """Whether a decode row may run ahead: its sampling needs nothing the host learns from the last token."""
    p = req.params
    return (req.matcher is None and p.logprobs is None and not uses_penalties(p)
            and len(req.output_ids) + 1 >= p.min_tokens)


def launch_copy(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """Start copying device tokens to the host; returns the host tensor and the event to wait on."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def read_tokens(flight: InFlight) -> list[int]:
    if flight.ready is not None:
        flight.ready.synchronize()
    return flight.host.tolist()


def batch_ahead(scheduler: Scheduler, prev: InFlight, live: Container[str]) -> Batch | None:
    """The decode batch that continues `prev` (its rows still live), or None when the pipeline must drain
    first: other work waits, another request decodes too, a row is not plain, or a page for the next token
    cannot be had without preempting."""
    # requests waiting for a prefill worker's KV cannot run yet: they do not stop the pipeline
    ready = [r for r in scheduler.running if not r.awaiting_kv]
    if scheduler.waiting or not all(r.decoding for r in ready):
        return None
    alive = [r for r in prev.batch.reqs if r.rid in live and r.rid not in prev.void]
    if len(alive) != len(ready):
        return None
    # a request whose token in flight is its last allowed one (max_tokens) stops there: no step ahead for it
    reqs = [r for r in alive if len(r.output_ids) + 1 < r.max_new_tokens]
    if not reqs or not all(plain_row(r) for r in reqs):
        return None
    if not all(scheduler.reserve_pages(r, r.num_computed + 1) for r in reqs):
        return None
    return Batch(Phase.DECODE, list(reqs), [1] * len(reqs), [True] * len(reqs))
