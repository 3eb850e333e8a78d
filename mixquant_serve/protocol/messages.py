"""Messages between the router and a worker: msgspec Structs, encoded as msgpack, never pickled.

Router -> worker: Hello, GenerateReq, AbortReq.
Worker -> router: WorkerInfo (answer to Hello), ReqOutputs (after each engine step), WorkerStats (heartbeat).
"""

from __future__ import annotations

import msgspec

from mixquant_serve.sampling_params import SamplingParams


class Hello(msgspec.Struct, tag=True):
    """A router introduces itself; the worker answers with WorkerInfo and then sends it heartbeats."""

    router_id: str


class GenerateReq(msgspec.Struct, tag=True, kw_only=True):
    rid: str
    input_ids: list[int]
    params: SamplingParams
    session_id: str | None = None


class AbortReq(msgspec.Struct, tag=True):
    rid: str


class TokenLogprob(msgspec.Struct, array_like=True):
    """The sampled token's log-probability under the model and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


class ReqOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one request gained in one step. `text` is the detokenized delta (stop strings removed)."""

    rid: str
    token_ids: list[int] = []
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    error_code: str | None = None


class ReqOutputs(msgspec.Struct, tag=True):
    outputs: list[ReqOutput]


class WorkerInfo(msgspec.Struct, tag=True, kw_only=True):
    worker_id: str
    role: str  # "colocated" | "prefill" | "decode"
    model_name: str
    model_path: str
    context_length: int
    page_size: int
    total_pages: int
    max_running_requests: int
    prefill_precision: str
    decode_precision: str
    kv_layout: dict[str, int | str]
    weight_bytes: dict[str, int]


class WorkerStats(msgspec.Struct, tag=True, kw_only=True):
    """Heartbeat: gauges describe now, counters are totals since start."""

    worker_id: str
    num_running: int
    num_waiting: int
    queued_tokens: int
    free_pages: int
    total_pages: int
    cached_pages: int
    counters: dict[str, float] = {}


ToWorker = Hello | GenerateReq | AbortReq
FromWorker = WorkerInfo | ReqOutputs | WorkerStats
