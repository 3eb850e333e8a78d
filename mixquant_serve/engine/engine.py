"""The engine: one model on one device, stepped by its owner (a worker loop or the offline API).

    engine = Engine(model_path=None)               # None: the embedded SmolLM2-135M-Instruct
    outs = engine.generate(["The capital of France is"], SamplingParams(max_tokens=8, temperature=0))

`add_request` / `step` / `abort` are the streaming interface the worker process drives; `step` runs
one batch and returns a ReqOutput increment for every request that gained a token or finished.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from mixquant_serve.config import ConfigError, EngineConfig, ModelConfig
from mixquant_serve.engine.model_runner import ModelRunner
from mixquant_serve.engine.overlap import InFlight, batch_ahead, launch_copy, plain_row, read_tokens
from mixquant_serve.engine.request import Request
from mixquant_serve.engine.scheduler import Batch, Phase, Scheduler
from mixquant_serve.engine.structured import GrammarError, Grammars
from mixquant_serve.kvcache.page_pool import PagePool
from mixquant_serve.kvcache.radix_cache import RadixCache
from mixquant_serve.layers.sampler import Sampler
from mixquant_serve.models.embedded import resolve_model_path
from mixquant_serve.models.registry import check_architecture
from mixquant_serve.protocol.messages import ReqOutput, TokenLogprob
from mixquant_serve.sampling_params import SamplingParams
from mixquant_serve.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("mixquant.engine")

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class RequestError(ValueError):
    """A request the engine refuses; `code` follows OpenAI's error codes."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.param = code, param


@dataclass
class RequestOutput:
    """A finished request, as the offline API returns it."""

    rid: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    cached_tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None


def resolve_config(config: EngineConfig) -> tuple[EngineConfig, ModelConfig]:
    """Fill in the "auto" values and check the model folder; raises ConfigError naming the problem."""
    config.validate()
    config = dataclasses.replace(config, model_path=resolve_model_path(config.model_path))
    mcfg = ModelConfig.from_path(config.model_path)
    check_architecture(mcfg)
    device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = config.dtype if config.dtype != "auto" else "bfloat16"
    ctx = config.context_length or mcfg.max_position_embeddings
    if ctx > mcfg.max_position_embeddings:
        raise ConfigError(f"--context-length {ctx} exceeds the model's max_position_embeddings "
                          f"{mcfg.max_position_embeddings}")
    gpu = device.startswith("cuda")
    backend = config.attention_backend if config.attention_backend != "auto" else (
        "triton" if gpu else "torch_ref")
    running = config.max_running_requests or (256 if gpu else 64)
    overlap = gpu if config.overlap_schedule is None else config.overlap_schedule
    mixed = gpu if config.enable_mixed_chunk is None else config.enable_mixed_chunk
    chunk = config.chunked_prefill_size or (8192 if gpu else 2048)
    no_graphs = config.disable_cuda_graph or not gpu
    piecewise = 0 if no_graphs else min(4096 if config.piecewise_cuda_graph_max_tokens is None
                                        else config.piecewise_cuda_graph_max_tokens, chunk + running)
    return dataclasses.replace(
        config, device=device, dtype=dtype, context_length=ctx, attention_backend=backend, overlap_schedule=overlap,
        enable_mixed_chunk=mixed, max_running_requests=running, chunked_prefill_size=chunk,
        disable_cuda_graph=no_graphs, cuda_graph_max_bs=min(config.cuda_graph_max_bs or running, running),
        piecewise_cuda_graph_max_tokens=piecewise), mcfg


def _mix_phases(cfg: EngineConfig) -> frozenset[Phase]:
    """The prompt phases that run in the decode precision, which decode rows may join (--enable-mixed-chunk)."""
    if not cfg.enable_mixed_chunk:
        return frozenset()
    return frozenset({Phase.TAIL} if cfg.mixed_precision else {Phase.TAIL, Phase.PREFILL})


class Engine:
    def __init__(self, model_path: str | None = None, *, config: EngineConfig | None = None, **kwargs) -> None:
        """Either a model path and EngineConfig fields as keywords, or a whole EngineConfig."""
        config = config or EngineConfig(model_path=model_path or "", **kwargs)
        self.config, self.model_config = resolve_config(config)
        cfg = self.config
        torch.manual_seed(cfg.seed)
        self.tokenizer = Tokenizer.from_path(cfg.tokenizer_path or cfg.model_path)
        self.runner = ModelRunner(cfg, self.model_config, torch.device(cfg.device), _DTYPES[cfg.dtype])
        self.pool = PagePool(self.runner.storage.num_pages, cfg.page_size)
        self.cache = RadixCache(self.pool) if cfg.enable_prefix_caching else None
        self.scheduler = Scheduler(self.pool, self.cache, cfg.max_running_requests, cfg.chunked_prefill_size,
                                   _mix_phases(cfg))
        self.sampler = Sampler()
        self.grammars = Grammars(self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids)
        self.requests: dict[str, Request] = {}
        self._flight: InFlight | None = None  # a decode step whose tokens are still on the device
        # called after each layer of a prefill batch wrote its KV (a prefill worker pushes it out)
        self.kv_hook: Callable[[Batch, int], None] | None = None
        self.eos_ids = frozenset(self.model_config.eos_token_ids)
        self.counters = dict.fromkeys(
            ("prompt_tokens", "cached_tokens", "computed_prefill_tokens", "generated_tokens",
             "requests_finished", "requests_aborted", "requests_failed", "kv_bytes_received",
             "remote_prefill_tokens"), 0)
        log.info("engine ready: %s on %s, prefill=%s decode=%s (BF16 tail %d tokens, K/V projections in %s), "
                 "%d KV pages of %d tokens, weights %s", self.model_config.architecture, cfg.device,
                 cfg.prefill_precision, cfg.decode_precision, cfg.bf16_tail_tokens,
                 cfg.kv_proj_precision or cfg.prefill_precision,
                 self.pool.capacity, cfg.page_size, self.weight_summary())
        log.info("engine settings: attention=%s, chunked prefill %d tokens, up to %d running requests, "
                 "context %d, decode CUDA graphs %s, prompt-batch (piecewise) CUDA graphs %s, overlapped decode %s, "
                 "decode rows mixed into %s, FP8 GEMM accumulation %s",
                 cfg.attention_backend, cfg.chunked_prefill_size, cfg.max_running_requests, cfg.context_length,
                 "off" if cfg.disable_cuda_graph else f"up to batch {cfg.cuda_graph_max_bs}",
                 f"up to {cfg.piecewise_cuda_graph_max_tokens} tokens" if cfg.piecewise_cuda_graph_max_tokens
                 else "off",
                 "on" if cfg.overlap_schedule else "off",
                 " and ".join(sorted(f"{p.value} batches" for p in self.scheduler.mix_phases)) or "nothing",
                 "fast" if cfg.fp8_fast_accum and cfg.device.startswith("cuda") else "float32")

    # -- streaming interface ----------------------------------------------------------------------
    def add_request(self, rid: str, prompt_ids: Sequence[int], params: SamplingParams, *,
                    prefill_only: bool = False, remote_prefill: str | None = None,
                    local_prefill_max_tokens: int | None = None, prefix_reuse: bool = True,
                    bf16_tail_tokens: int | None = None) -> None:
        """Queue a request. prefill_only: compute the KV of all prompt_ids and stop (a prefill worker).
        remote_prefill: the prefill worker whose KV this request should wait for (a decode worker), unless
        it lacks fewer than local_prefill_max_tokens tokens, which it then prefills itself.
        bf16_tail_tokens: this request's BF16 tail (default: the engine's --bf16-tail-tokens)."""
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use", param="rid")
        params.validate()
        n, ctx = len(prompt_ids), self.config.context_length
        if n == 0:
            raise RequestError("the prompt is empty", param="prompt")
        if bad := [t for t in prompt_ids if not 0 <= t < self.model_config.vocab_size][:1]:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary", param="prompt")
        if n >= ctx or (not prefill_only and (params.max_tokens or 0) + n > ctx):
            raise RequestError(
                f"this model's context length is {ctx} tokens; the prompt has {n} and max_tokens asks "
                f"for {params.max_tokens}", code="context_length_exceeded", param="max_tokens")
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids)
        detok = None if prefill_only else IncrementalDetokenizer(self.tokenizer, prompt_ids,
                                                                 params.skip_special_tokens, params.stop)
        sample_in_prefill = not (self.config.mixed_precision or prefill_only or remote_prefill)
        tail = self.config.bf16_tail_tokens if bf16_tail_tokens is None else bf16_tail_tokens
        if tail < 1:
            raise RequestError(f"bf16_tail_tokens must be at least 1, got {tail}", param="bf16_tail_tokens")
        req = Request(rid, list(prompt_ids), params, max_new_tokens=0 if prefill_only else min(
                          params.max_tokens or ctx, ctx - n),
                      stop_token_set=stop_ids, detok=detok, sample_in_prefill=sample_in_prefill, bf16_tail=tail,
                      prefill_only=prefill_only, remote_url=remote_prefill,
                      local_prefill_max_tokens=local_prefill_max_tokens or 0, prefix_reuse=prefix_reuse)
        if not prefill_only:
            try:
                req.matcher = self.grammars.matcher(params)
            except GrammarError as e:
                raise RequestError(str(e), param=e.param) from None
        self.requests[rid] = req
        self.scheduler.add(req)
        self.counters["prompt_tokens"] += n

    def abort(self, rid: str) -> ReqOutput | None:
        req = self.requests.pop(rid, None)
        if req is None:
            return None
        self.scheduler.remove(rid)
        self.counters["requests_aborted"] += 1
        return ReqOutput(rid=rid, finished=True, finish_reason="abort", prompt_tokens=req.num_prompt_tokens,
                         cached_tokens=req.cached_tokens, completion_tokens=len(req.output_ids))

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or self._flight is not None

    def step(self) -> list[ReqOutput]:
        if self._flight is not None:
            return self._step_ahead()
        batch = self.scheduler.next_batch()
        if batch is None:
            return []
        cfg = self.config
        precision = cfg.prefill_precision if batch.phase is Phase.PREFILL else cfg.decode_precision
        hook = self.kv_hook if batch.phase is Phase.PREFILL and self.kv_hook is not None else None
        kv = cfg.kv_proj_precision if batch.phase is Phase.PREFILL else None
        try:
            logits = self.runner.forward(batch, precision, None if hook is None else lambda i: hook(batch, i),
                                         kv_precision=kv)
            self.scheduler.commit(batch)
            if batch.phase is Phase.PREFILL:
                self.counters["computed_prefill_tokens"] += batch.num_prompt_tokens
            elif batch.phase is Phase.DECODE and self.config.overlap_schedule and all(map(plain_row, batch.reqs)):
                self._flight = self._launch_sampling(batch, logits)
                return []
            return self._sample(batch, logits)
        except Exception as e:  # a bug or device fault must not take the other requests down
            return self._fail_step(batch.reqs, e)

    def _fail_step(self, reqs: Sequence[Request], error: Exception) -> list[ReqOutput]:
        log.exception("step failed; failing its %d requests", len(reqs))
        return [self._fail(req, f"internal error: {error}", "internal_error") for req in reqs
                if req.rid in self.requests]

    # -- overlapped decode (engine/overlap.py) ------------------------------------------------------
    def _launch_sampling(self, batch: Batch, logits: torch.Tensor) -> InFlight:
        tokens = self.sampler.sample_on_device(logits, batch.reqs)
        host, ready = launch_copy(tokens)
        return InFlight(batch, tokens, host, ready, frozenset())

    def _step_ahead(self) -> list[ReqOutput]:
        """Launch the decode step after the one in flight, then apply the tokens of the one in flight."""
        prev, self._flight = self._flight, None
        batch = batch_ahead(self.scheduler, prev, self.requests)
        try:
            nxt = None
            if batch is not None:
                kept = {r.rid for r in batch.reqs}
                rows = [i for i, r in enumerate(prev.batch.reqs) if r.rid in kept]
                ids = prev.tokens if len(rows) == len(prev.batch.reqs) else prev.tokens[
                    torch.tensor(rows, device=prev.tokens.device)]
                logits = self.runner.forward(batch, self.config.decode_precision, input_ids=ids)
                self.scheduler.commit(batch)
                nxt = self._launch_sampling(batch, logits)
            outputs = self._apply_flight(prev)
        except Exception as e:
            return self._fail_step(prev.batch.reqs, e)
        if nxt is not None:  # rows that finished just now were computed ahead for nothing
            void = frozenset(r.rid for r in batch.reqs if r.rid not in self.requests)
            self._flight = nxt._replace(void=void) if len(void) < len(batch.reqs) else None
        return outputs

    def _apply_flight(self, flight: InFlight) -> list[ReqOutput]:
        outputs = []
        for req, token in zip(flight.batch.reqs, read_tokens(flight), strict=True):
            if req.rid in flight.void or req.rid not in self.requests:  # finished earlier, or aborted
                continue
            outputs.append(self._apply_token(req, token, None))
        return outputs

    def _sample(self, batch: Batch, logits: torch.Tensor | None) -> list[ReqOutput]:
        reqs = [r for r, s in zip(batch.reqs, batch.sample, strict=True) if s]
        if not reqs:
            return []
        if constrained := [(i, r.matcher) for i, r in enumerate(reqs) if r.matcher is not None]:
            self.grammars.apply(logits, constrained)
        result = self.sampler(logits, reqs)
        return [self._apply_token(req, token, lp)
                for req, token, lp in zip(reqs, result.token_ids, result.logprobs, strict=True)]

    def _apply_token(self, req: Request, token: int, logprob: TokenLogprob | None) -> ReqOutput:
        first = len(req.output_ids)
        req.append(token, logprob)
        self.counters["generated_tokens"] += 1
        if req.finish_reason is not None:
            self._finish(req)
        return self._increment(req, first)

    def _increment(self, req: Request, first: int) -> ReqOutput:
        if first == 0:
            self.counters["cached_tokens"] += req.cached_tokens
        text, req.pending_text = req.pending_text, ""
        lps = req.logprobs[first:] if req.params.logprobs is not None else None
        return ReqOutput(rid=req.rid, token_ids=req.output_ids[first:], text=text, logprobs=lps,
                         finished=req.finished, finish_reason=req.finish_reason,
                         prompt_tokens=req.num_prompt_tokens, cached_tokens=req.cached_tokens,
                         completion_tokens=len(req.output_ids))

    def _finish(self, req: Request) -> None:
        if req.detok is not None and not req.stop_string_hit:
            req.pending_text += req.detok.flush()
        self.scheduler.finish(req)
        self.requests.pop(req.rid, None)
        self.counters["requests_finished"] += 1

    def _fail(self, req: Request, message: str, code: str) -> ReqOutput:
        self.scheduler.remove(req.rid)
        self.requests.pop(req.rid, None)
        self.counters["requests_failed"] += 1
        return ReqOutput(rid=req.rid, finished=True, finish_reason="error", error=message,
                         error_code=code, prompt_tokens=req.num_prompt_tokens,
                         completion_tokens=len(req.output_ids))

    # -- disaggregation --------------------------------------------------------------------------
    def take_prefilled(self) -> list[Request]:
        """Prefill-only requests whose KV is complete; they keep their pages until release_prefilled."""
        return self.scheduler.take_prefilled()

    def release_prefilled(self, rid: str) -> None:
        if self.requests.pop(rid, None) is not None:
            self.scheduler.release_parked(rid)
            self.counters["requests_finished"] += 1

    def take_remote_admitted(self) -> list[Request]:
        """Requests admitted with pages allocated that now wait for a prefill worker's KV."""
        return self.scheduler.take_remote()

    def kv_ready(self, rid: str, nbytes: int) -> None:
        req = self.requests.get(rid)
        if req is not None:
            self.scheduler.kv_ready(req)
            self.counters["kv_bytes_received"] += nbytes
            self.counters["remote_prefill_tokens"] += req.prefill_target - req.kv_start

    def fail(self, rid: str, message: str, code: str) -> ReqOutput | None:
        req = self.requests.get(rid)
        return None if req is None else self._fail(req, message, code)

    # -- introspection ----------------------------------------------------------------------------
    def weight_summary(self) -> str:
        return ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in self.runner.weight_bytes.items())

    def stats(self) -> dict[str, int]:
        sched = self.scheduler
        return {
            "num_running": len(sched.running), "num_waiting": len(sched.waiting),
            "queued_tokens": sched.queued_tokens, "free_pages": self.pool.num_free,
            "total_pages": self.pool.capacity, "cached_pages": self.cache.num_pages if self.cache else 0,
        }

    # -- offline API ------------------------------------------------------------------------------
    def generate(self, prompts: str | Sequence[str] | Sequence[Sequence[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Run prompts (text or token ids) to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = list(params) if isinstance(params, Sequence) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        results: dict[str, RequestOutput] = {}
        order = []
        try:
            for prompt, p in zip(prompts, params, strict=True):
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                rid = uuid.uuid4().hex
                self.add_request(rid, ids, p)
                results[rid] = RequestOutput(rid, ids)
                order.append(rid)
        except ValueError:  # one prompt refused: withdraw the ones queued before it
            for rid in order:
                self.abort(rid)
            raise
        while any(results[r].finish_reason is None for r in order):
            if not self.has_work:
                raise RuntimeError("engine idle with unfinished requests")
            for out in self.step():
                res = results[out.rid]
                res.token_ids += out.token_ids
                res.text += out.text
                res.logprobs += out.logprobs or []
                if out.finished:
                    res.finish_reason, res.cached_tokens, res.error = out.finish_reason, out.cached_tokens, out.error
        return [results[r] for r in order]
