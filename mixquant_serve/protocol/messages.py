"""Messages between the router and a worker: msgspec Structs, encoded as msgpack, never pickled.

Router -> worker: Hello, GenerateReq, AbortReq.
Worker -> router: WorkerInfo (answer to Hello), ReqOutputs (after each engine step), WorkerStats (heartbeat).

Disaggregation (decode worker -> prefill worker, on the prefill worker's control socket):
PrefillReq (compute this KV and push it into these pages of mine), AbortPrefill, KVAck (all of it arrived).
The KV bytes themselves travel on the transfer backend's own channel, never through the router.
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
    # disaggregated serving: the prefill worker the decode worker should use, and the delta (tokens it
    # lacks) below which it prefills locally in its own precision instead (None: always remote)
    prefill_url: str | None = None
    local_prefill_max_tokens: int | None = None
    # False: the decode worker ignores its own prefix cache and takes the whole prompt's KV from the prefill
    # worker (what the Mix-Quant reference proxy does; the round-robin baseline of the benchmarks)
    decode_prefix_reuse: bool = True


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
    error_param: str | None = None  # the request field at fault, for the API's `param`


class ReqOutputs(msgspec.Struct, tag=True):
    outputs: list[ReqOutput]


class WorkerInfo(msgspec.Struct, tag=True, kw_only=True):
    worker_id: str
    instance_id: str  # new on every process start: a change means the worker restarted
    role: str  # "colocated" | "prefill" | "decode"
    model_name: str
    model_path: str
    context_length: int
    page_size: int
    total_pages: int
    max_running_requests: int
    prefill_precision: str
    decode_precision: str
    bf16_tail_tokens: int = 1  # Mix-Quant: prompt tokens at the end computed in the decode precision (1: older workers)
    bf16_kv_proj: bool = False  # Mix-Quant: prefill's k/v projections in the decode precision (False: older workers)
    kv_layout: dict[str, int | str]
    weight_bytes: dict[str, int]
    pid: int = 0


class WorkerStats(msgspec.Struct, tag=True, kw_only=True):
    """Heartbeat: gauges describe now, counters are totals since start."""

    worker_id: str
    instance_id: str
    num_running: int
    num_waiting: int
    queued_tokens: int
    free_pages: int
    total_pages: int
    cached_pages: int
    counters: dict[str, float] = {}
    gauges: dict[str, float] = {}  # e.g. queue depths per state of a prefill or decode worker
    draining: bool = False  # shutting down: place nothing new here


class CacheEvents(msgspec.Struct, tag=True, kw_only=True):
    """What the worker's prefix cache gained and lost, as chained page hashes (protocol.block_hash).

    `snapshot=True` replaces everything the router knew of this worker (sent after each Hello).
    """

    worker_id: str
    page_size: int
    inserted: list[int] = []
    evicted: list[int] = []
    snapshot: bool = False


class Register(msgspec.Struct, tag=True, kw_only=True):
    """Worker -> router's registration socket, repeated until the router's Hello arrives."""

    url: str  # the worker's control address as the router should connect to it
    role: str


class TransferPeer(msgspec.Struct, kw_only=True):
    """Where and how a decode worker receives KV: checked by the prefill worker before it sends."""

    worker_id: str
    backend: str  # "tcp" | "nccl"
    address: str  # the decode worker's transfer endpoint (ZMQ), e.g. tcp://10.0.0.5:6001
    kv_layout: dict[str, int | str]
    nccl_device: int | None = None


class PrefillReq(msgspec.Struct, tag=True, kw_only=True):
    """Compute the KV of token_ids[start:] and push it into dst_pages of the decode worker.

    `start` is page-aligned: the decode worker already holds positions [0, start). dst_pages[i] receives
    positions [start + i*page_size, start + (i+1)*page_size).
    """

    rid: str
    token_ids: list[int]
    start: int
    dst_pages: list[int]
    peer: TransferPeer
    session_id: str | None = None


class AbortPrefill(msgspec.Struct, tag=True):
    rid: str


class KVAck(msgspec.Struct, tag=True):
    """The decode worker received (ok) or gave up on (not ok) a request's KV."""

    rid: str
    ok: bool
    error: str | None = None


ToWorker = Hello | GenerateReq | AbortReq | PrefillReq | AbortPrefill | KVAck
FromWorker = WorkerInfo | ReqOutputs | WorkerStats | CacheEvents
