"""The request pipeline of the generation endpoints.

read the body (413, 400, 422; http_io) -> check model and features (404, 400; params) -> token ids
(prompts, tools) -> session key (sessions) -> sampling params (400) -> place on a worker, or a decode and a
prefill worker (503; placement) -> fit the context (400) -> Generation: one GenerateReq per choice ->
outputs -> one JSON body, or SSE chunks ending in `data: [DONE]` (responses).
A stream starts only once the first output has come, so a request the worker fails at once still gets a
proper status; later failures become an error event. A request whose worker became unavailable before it
answered anything is placed again (at most MAX_RETRIES times; affinity moves its session); one whose KV
transfer from its prefill worker failed is sent again without a prefill worker (the decode worker prefills).
A client that goes away aborts its choices (Generation.watch). At most --max-pending-requests run at once
(Ticket; 429 beyond).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from router.args import RouterConfig
from router.cache_index import PromptHashes
from router.errors import APIError
from router.generation import ChoiceSpec, ClientDisconnected, Generation
from router.http_io import SSEResponse, read_request
from router.metrics import RouterMetrics
from router.openai_api import ChatCompletionRequest, CompletionRequest, SamplingRequest
from router.params import (
    SamplingDefaults,
    base_params,
    chat_logprobs,
    check_chat,
    check_completion,
    fit_context,
    per_choice,
)
from router.placement import PlacementPolicy, PlacementRequest
from router.processors import create_processor
from router.prompts import encode_chat, encode_prompts, prompt_text
from router.responses import SSE_DONE, ChatFormat, CompletionFormat, Envelope, sse
from router.sessions import conversation_key, explicit_key, prompt_key
from router.workers import WorkerPool

if TYPE_CHECKING:
    from mixquant_serve.tokenizer import Tokenizer

log = logging.getLogger("router.serving")
Format = ChatFormat | CompletionFormat
Handler = Callable[["RouterState", Request, "Ticket"], Awaitable[Response]]
CLIENT_CLOSED = 499  # nginx's status for "client closed the request"; nobody reads it
MAX_RETRIES = 2


@dataclass
class RouterState:
    cfg: RouterConfig
    tokenizer: Tokenizer
    pool: WorkerPool
    policy: PlacementPolicy
    metrics: RouterMetrics
    reasoning: bool = False  # split <think> blocks into reasoning_content
    sampling_defaults: SamplingDefaults = SamplingDefaults()
    pending: int = 0

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.cfg.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves "
                                f"'{self.cfg.model_name}'.", param="model", code="model_not_found")

    def admit(self) -> Ticket:
        if self.pending >= self.cfg.max_pending_requests:
            raise APIError(429, f"too many requests in flight (limit {self.cfg.max_pending_requests}); "
                                "retry later", code="too_many_requests")
        return Ticket(self)


class Ticket:
    """One admitted generation request; release() is idempotent."""

    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.released = False
        state.pending += 1
        state.metrics.inflight.inc()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.state.pending -= 1
            self.state.metrics.inflight.dec()


async def chat_completions(state: RouterState, request: Request) -> Response:
    return await _admitted(state, request, _chat)


async def completions(state: RouterState, request: Request) -> Response:
    return await _admitted(state, request, _completion)


async def _admitted(state: RouterState, request: Request, handler: Handler) -> Response:
    """Hold a ticket while the request runs; a stream takes the ticket and releases it when it ends."""
    ticket = state.admit()
    try:
        response = await handler(state, request, ticket)
    except BaseException:
        ticket.release()
        raise
    if not isinstance(response, SSEResponse):
        ticket.release()
    return response


async def _chat(state: RouterState, request: Request, ticket: Ticket) -> Response:
    req = await read_request(request, ChatCompletionRequest, state.cfg.max_request_bytes)
    state.check_model(req.model)
    check_chat(req)
    prompt = await asyncio.to_thread(encode_chat, state.tokenizer, req, state.cfg.chat_template is not None,
                                     state.cfg.tool_call_constraint)
    env = Envelope(f"chatcmpl-{uuid.uuid4().hex}", state.cfg.model_name, req.include_usage)
    procs = [create_processor(prompt, state.reasoning) for _ in range(req.n)]
    fmt = ChatFormat(env, state.tokenizer, procs, req.logprobs)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    session = (explicit_key(request.headers, req.prompt_cache_key, req.user)
               or conversation_key(prompt.messages))
    job = _Job(req, "/v1/chat/completions", [prompt.ids], "messages", max_tokens, chat_logprobs(req), fmt,
               session, prompt.tools.stop, prompt.tools.grammar)
    return await _run(state, request, job, ticket)


async def _completion(state: RouterState, request: Request, ticket: Ticket) -> Response:
    req = await read_request(request, CompletionRequest, state.cfg.max_request_bytes)
    state.check_model(req.model)
    check_completion(req)
    prompts = await asyncio.to_thread(encode_prompts, state.tokenizer, req.prompt)
    echo = None
    if req.echo:
        echo = [prompt_text(state.tokenizer, req.prompt, i, ids) for i, ids in enumerate(prompts)]
    env = Envelope(f"cmpl-{uuid.uuid4().hex}", state.cfg.model_name, req.include_usage)
    fmt = CompletionFormat(env, state.tokenizer, echo, req.logprobs is not None)
    session = explicit_key(request.headers, req.prompt_cache_key, req.user) or prompt_key(prompts[0])
    job = _Job(req, "/v1/completions", prompts, "prompt", req.max_tokens, req.logprobs, fmt, session)
    return await _run(state, request, job, ticket)


@dataclass
class _Job:
    req: SamplingRequest
    endpoint: str
    prompts: list[list[int]]
    prompt_param: str
    max_tokens: int | None
    logprobs: int | None
    fmt: Format
    session: str
    extra_stop: tuple[str, ...] = ()
    grammar: str | None = None  # tool calls held to the offered functions (router.tool_grammar)
    local_prefill: bool = False  # set after a failed KV transfer: the decode worker prefills everything

    @property
    def rid(self) -> str:
        return self.fmt.env.id


def _start(state: RouterState, request: Request, job: _Job, attempt: int) -> Generation:
    """Place the job, fit its choices to the worker's context and send them."""
    prompt = PromptHashes(job.prompts[0])
    where = PlacementRequest(job.rid, job.prompts[0], job.req.n * len(job.prompts), job.session)
    target = state.policy.choose(state.pool, where, prompt)
    ctx = target.worker.context_length or 0
    base = base_params(job.req, job.max_tokens, job.logprobs, job.extra_stop, state.sampling_defaults,
                       job.grammar)
    n, specs = job.req.n, []
    for p, ids in enumerate(job.prompts):
        fitted = fit_context(base, len(ids), ctx, job.prompt_param)
        specs += [ChoiceSpec(p * n + j, p, ids, cp) for j, cp in enumerate(per_choice(fitted, n))]
    state.metrics.on_placement(target)
    if job.local_prefill:
        target.prefill = None
    for link in (target.worker, target.prefill):
        if link is not None:
            link.cache.expect(prompt)
    rid = job.rid if attempt == 0 else f"{job.rid}-r{attempt}"
    gen = Generation(rid, target, specs, state.metrics.timer(job.endpoint), job.session,
                     state.cfg.local_prefill_max_tokens)
    gen.start()
    gen.watch(request.receive)
    return gen


def _retryable(e: APIError, attempt: int) -> bool:
    """Nothing has reached the client yet here, so a request whose worker went away may start over."""
    return e.code in ("worker_unavailable", "kv_transfer_failed") and attempt < MAX_RETRIES


async def _run(state: RouterState, request: Request, job: _Job, ticket: Ticket) -> Response:
    attempt, failure = 0, None
    while True:
        try:
            gen = _start(state, request, job, attempt)
        except APIError:
            if failure is not None:  # nowhere to go again: report what happened first
                raise failure from None
            raise
        streaming = False
        try:
            if not job.req.stream:
                return await _collect(gen, job.fmt)
            first = await gen.next()
            streaming = True
            return SSEResponse(_stream(gen, job.fmt, first), on_close=[gen.close, ticket.release])
        except ClientDisconnected:
            log.info("%s: client went away; aborted", job.rid)
            return Response(status_code=CLIENT_CLOSED)
        except APIError as e:
            log.warning("%s failed on worker %s: %s", job.rid, gen.link.worker_id, e.message)
            if not _retryable(e, attempt):
                raise
            attempt, failure = attempt + 1, e
            job.local_prefill = job.local_prefill or e.code == "kv_transfer_failed"
            state.metrics.retries.inc()
        finally:
            if not streaming:
                gen.close()


async def _collect(gen: Generation, fmt: Format) -> Response:
    while not gen.done:
        await gen.next()
    return JSONResponse(fmt.response(gen))


async def _stream(gen: Generation, fmt: Format, first: tuple[Any, Any]) -> AsyncIterator[bytes]:
    for body in fmt.opening(gen):
        yield sse(body)
    st, out = first
    while True:
        body = fmt.chunk(st, out)
        if body is not None:
            yield sse(body)
        if gen.done:
            break
        try:
            st, out = await gen.next()
        except APIError as e:
            log.warning("%s failed mid-stream: %s", gen.rid, e.message)
            yield sse(e.body())
            yield SSE_DONE
            return
        except ClientDisconnected:
            log.info("%s: client went away mid-stream; aborted", gen.rid)
            return
    if fmt.env.include_usage:
        yield sse(fmt.usage_chunk(gen))
    yield SSE_DONE
