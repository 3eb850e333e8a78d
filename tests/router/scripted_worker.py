"""A scripted worker for router tests: the real protocol on a real ZMQ ROUTER socket, in a thread.

It answers Hello with WorkerInfo and a CacheEvents snapshot, sends WorkerStats heartbeats (with the
CacheEvents of what it cached since) and turns each GenerateReq into a deterministic reply: the words of
REPLY, rotated by the request's seed (or the text of `reply`, when a test sets one), one token per step,
detokenized with the project's IncrementalDetokenizer (so stop strings work), stopping at max_tokens
("length") or at the end of the reply ("stop"). Its "prefix cache" holds the full pages of every prompt it
saw (`remember` adds more); cached_tokens reports the longest cached prefix. Everything it receives is
recorded. Tests steer it through `mode`: "run", "stall" (heartbeats but no tokens), "silent" (sends
nothing at all), "dead" (socket closed); `draining`; `restart()` (a new instance on the same socket).
With `router_url` it registers there (Register every 0.2 s until a Hello arrives).
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from mixquant_serve.protocol.block_hash import cached_prefix_pages, chain_hashes
from mixquant_serve.protocol.channels import WorkerSocket, encode
from mixquant_serve.protocol.messages import (
    AbortReq,
    CacheEvents,
    GenerateReq,
    Hello,
    Register,
    ReqOutput,
    ReqOutputs,
    TokenLogprob,
    ToWorker,
    WorkerInfo,
    WorkerStats,
)
from mixquant_serve.tokenizer import IncrementalDetokenizer, Tokenizer

PAGE = 16
REPLY = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


def reply_words(seed: int | None) -> list[str]:
    k = (seed or 0) % len(REPLY)
    return list(REPLY[k:] + REPLY[:k])


def reply_ids(tokenizer: Tokenizer, seed: int | None) -> list[int]:
    return tokenizer.encode(" " + " ".join(reply_words(seed)), add_special_tokens=False)


def reply_text(tokenizer: Tokenizer, seed: int | None, tokens: int) -> str:
    """What the worker streams for a request with this seed, cut after `tokens` tokens."""
    return tokenizer.decode(reply_ids(tokenizer, seed)[:tokens])


@dataclass
class _Running:
    peer: bytes
    req: GenerateReq
    reply: list[int]
    detok: IncrementalDetokenizer
    cached: int
    produced: int = 0
    sent_counts: bool = False


@dataclass
class Failure:
    after_tokens: int
    message: str
    code: str


@dataclass
class ScriptedWorker:
    tokenizer: Tokenizer
    worker_id: str
    context_length: int = 512
    heartbeat_s: float = 0.2
    step_s: float = 0.01
    mode: str = "run"
    fail: Failure | None = None
    fail_remote: Failure | None = None  # fails only requests that name a prefill worker
    counters: dict[str, float] = field(default_factory=lambda: {"prefill.tokens": 0.0, "decode-steps": 0.0})
    received: list[ToWorker] = field(default_factory=list)
    bind: str = "tcp://127.0.0.1:0"
    address: str = ""
    role: str = "colocated"
    reply: str | None = None
    draining: bool = False
    router_url: str | None = None
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    waiting: int = 0  # reported as num_waiting (overload tests)
    busy: int = 0  # added to num_running (load tests)

    def start(self) -> ScriptedWorker:
        self._running: dict[str, _Running] = {}
        self.cached: set[int] = set()
        self._inserted: list[int] = []
        self._heard = False
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.worker_id, daemon=True)
        self._thread.start()
        self._ready.wait(5)
        return self

    def stop(self) -> None:
        self.mode = "dead"
        self._thread.join(5)

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def generate_reqs(self) -> list[GenerateReq]:
        return [m for m in list(self.received) if isinstance(m, GenerateReq)]

    def aborted(self) -> set[str]:
        return {m.rid for m in list(self.received) if isinstance(m, AbortReq)}

    def remember(self, tokens: Sequence[int]) -> None:
        """Cache the full pages of `tokens` (reported with the next heartbeat)."""
        with self._lock:
            new = [h for h in chain_hashes(tokens, PAGE) if h not in self.cached]
            self.cached.update(new)
            self._inserted += new

    def restart(self) -> None:
        """Become a new instance on the same socket: empty cache, new instance_id, running requests lost."""
        self.instance_id = uuid.uuid4().hex
        self._running.clear()
        with self._lock:
            self.cached.clear()
            self._inserted = []

    def _loop(self) -> None:
        sock = WorkerSocket(self.bind)
        self.address = sock.address
        registrar = self._registrar()
        self._ready.set()
        next_beat = 0.0
        while self.mode != "dead":
            if sock.poll(int(self.step_s * 1000)):
                for peer, msg in sock.recv_all():
                    self.received.append(msg)
                    if self.mode != "silent":
                        self._handle(sock, peer, msg)
            if self.mode in ("silent",):
                continue
            if time.monotonic() >= next_beat:
                self._beat(sock, registrar)
                next_beat = time.monotonic() + self.heartbeat_s
            if self.mode == "run":
                self._step(sock)
        sock.close()
        if registrar is not None:
            registrar.close(0)

    def _registrar(self) -> zmq.Socket | None:
        if self.router_url is None:
            return None
        reg = zmq.Context.instance().socket(zmq.DEALER)
        reg.setsockopt(zmq.LINGER, 0)
        reg.connect(self.router_url)
        return reg

    def _beat(self, sock: WorkerSocket, registrar: zmq.Socket | None) -> None:
        sock.broadcast(self._stats())
        with self._lock:
            inserted, self._inserted = self._inserted, []
        if inserted:
            sock.broadcast(CacheEvents(worker_id=self.worker_id, page_size=PAGE, inserted=inserted))
        if registrar is not None and not self._heard:
            registrar.send(encode(Register(url=self.address, role=self.role)), zmq.NOBLOCK)

    def _handle(self, sock: WorkerSocket, peer: bytes, msg: ToWorker) -> None:
        if isinstance(msg, Hello):
            self._heard = True
            sock.send(peer, self._info())
            with self._lock:
                snapshot = sorted(self.cached)
            sock.send(peer, CacheEvents(worker_id=self.worker_id, page_size=PAGE, inserted=snapshot,
                                        snapshot=True))
        elif isinstance(msg, AbortReq):
            if self._running.pop(msg.rid, None) is not None:
                out = ReqOutput(rid=msg.rid, finished=True, finish_reason="abort")
                sock.send(peer, ReqOutputs([out]))
        elif isinstance(msg, GenerateReq):
            self._admit(peer, msg)

    def _admit(self, peer: bytes, req: GenerateReq) -> None:
        if self.reply is not None:
            reply = self.tokenizer.encode(self.reply, add_special_tokens=False)
        else:
            reply = reply_ids(self.tokenizer, req.params.seed)
        cached = cached_prefix_pages(req.input_ids, PAGE, self.cached) * PAGE
        self.remember(req.input_ids)
        detok = IncrementalDetokenizer(self.tokenizer, req.input_ids, req.params.skip_special_tokens,
                                       req.params.stop)
        self._running[req.rid] = _Running(peer, req, reply, detok, cached)
        self.counters["prefill.tokens"] += len(req.input_ids)

    def _step(self, sock: WorkerSocket) -> None:
        for rid, run in list(self._running.items()):
            out = self._advance(run)
            if out.finished:
                self._running.pop(rid, None)
            sock.send(run.peer, ReqOutputs([out]))
        self.counters["decode-steps"] += 1

    def _advance(self, run: _Running) -> ReqOutput:
        params, rid = run.req.params, run.req.rid
        fail = self.fail or (self.fail_remote if run.req.prefill_url else None)
        if fail is not None and run.produced >= fail.after_tokens:
            return ReqOutput(rid=rid, finished=True, finish_reason="error", error=fail.message,
                             error_code=fail.code)
        token = run.reply[run.produced % len(run.reply)]
        run.produced += 1
        text, stopped = run.detok.add([token])
        limit = params.max_tokens or self.context_length
        done_reply = run.produced >= len(run.reply) and not params.ignore_eos
        finished = stopped or done_reply or run.produced >= limit
        if finished and not stopped:
            text += run.detok.flush()
        reason = "stop" if stopped or (done_reply and run.produced < limit) else "length"
        out = ReqOutput(rid=rid, token_ids=[token], text=text, finished=finished,
                        finish_reason=reason if finished else None, completion_tokens=run.produced,
                        logprobs=self._logprobs(token, params.logprobs))
        if not run.sent_counts:
            out.prompt_tokens, out.cached_tokens, run.sent_counts = len(run.req.input_ids), run.cached, True
        return out

    def _logprobs(self, token: int, k: int | None) -> list[TokenLogprob] | None:
        if k is None:
            return None
        top = [(token, -0.25)] + [(token + i, -0.25 - i) for i in range(1, k)]
        return [TokenLogprob(token, -0.25, top[:k])]

    def _info(self) -> WorkerInfo:
        precision = "nvfp4" if self.role == "prefill" else "bf16"
        return WorkerInfo(worker_id=self.worker_id, instance_id=self.instance_id, role=self.role,
                          model_name="scripted", model_path="", context_length=self.context_length,
                          page_size=PAGE, total_pages=64, max_running_requests=64,
                          prefill_precision=precision, decode_precision="bf16",
                          kv_layout={"page_size": PAGE, "dtype": "bfloat16"}, weight_bytes={"bf16": 0},
                          pid=os.getpid())

    def _stats(self) -> WorkerStats:
        queued = sum(len(r.req.input_ids) for r in self._running.values())
        return WorkerStats(worker_id=self.worker_id, instance_id=self.instance_id,
                           num_running=len(self._running) + self.busy, num_waiting=self.waiting,
                           queued_tokens=queued,
                           free_pages=64 - len(self._running), total_pages=64, cached_pages=len(self.cached),
                           counters=dict(self.counters), gauges={"queue.depth": float(self.waiting)},
                           draining=self.draining)
