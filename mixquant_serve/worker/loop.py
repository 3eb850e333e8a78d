"""The worker event loop: one engine, driven by control messages from one or more routers.

Lifecycle of a request in this process:
  1. a router sends GenerateReq -> the engine validates it (a refusal is answered at once with an
     error ReqOutput) and queues it as `waiting`;
  2. the scheduler admits it when pages are free (`running`, prefilling in chunks, then decoding);
  3. after every engine step each request that gained a token gets a ReqOutput increment, sent to
     the router that asked for it; the last one has finished=True;
  4. AbortReq (a client went away) removes it wherever it is and frees its pages.
Between steps the loop drains the control socket; when idle it blocks on it. Every
`heartbeat_s` it broadcasts WorkerStats, which the router uses for health, placement and /metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from collections import defaultdict

from mixquant_serve.engine.engine import Engine, RequestError
from mixquant_serve.protocol.channels import WorkerSocket
from mixquant_serve.protocol.messages import (
    AbortReq, GenerateReq, Hello, ReqOutput, ReqOutputs, WorkerInfo, WorkerStats,
)
from mixquant_serve.sampling_params import InvalidSamplingParams

log = logging.getLogger("mixquant.worker")


class Worker:
    role = "colocated"

    def __init__(self, engine: Engine, address: str, worker_id: str, heartbeat_s: float = 0.5) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.sock = WorkerSocket(address)
        self.address = self.sock.address
        self.heartbeat_s = heartbeat_s
        self.owner: dict[str, bytes] = {}  # rid -> the router that sent it
        self.stopping = False
        self._next_beat = 0.0

    def info(self) -> WorkerInfo:
        cfg, eng = self.engine.config, self.engine
        return WorkerInfo(
            worker_id=self.worker_id, role=self.role, model_name=cfg.served_model_name or "",
            model_path=cfg.model_path, context_length=cfg.context_length, page_size=cfg.page_size,
            total_pages=eng.pool.capacity, max_running_requests=cfg.max_running_requests,
            prefill_precision=cfg.prefill_precision, decode_precision=cfg.decode_precision,
            kv_layout=dataclasses.asdict(eng.runner.layout), weight_bytes=eng.runner.weight_bytes)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        try:
            while not self.stopping:
                self._handle(self.sock.recv_all())
                if self.engine.has_work:
                    self._send(self.engine.step())
                else:
                    self.sock.poll(int(self.heartbeat_s * 1000))
                self._heartbeat()
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _handle(self, messages: list) -> None:
        for peer, msg in messages:
            if isinstance(msg, GenerateReq):
                self._add(peer, msg)
            elif isinstance(msg, AbortReq):
                if (out := self.engine.abort(msg.rid)) is not None:
                    self._send([out])
            elif isinstance(msg, Hello):
                self.sock.send(peer, self.info())

    def _add(self, peer: bytes, msg: GenerateReq) -> None:
        self.owner[msg.rid] = peer
        try:
            self.engine.add_request(msg.rid, msg.input_ids, msg.params)
        except InvalidSamplingParams as e:
            self._send([_refusal(msg, str(e), "invalid_request")])
        except RequestError as e:
            self._send([_refusal(msg, str(e), e.code)])

    def _send(self, outputs: list[ReqOutput]) -> None:
        by_peer: dict[bytes, list[ReqOutput]] = defaultdict(list)
        for out in outputs:
            peer = self.owner.pop(out.rid, None) if out.finished else self.owner.get(out.rid)
            if peer is not None:
                by_peer[peer].append(out)
        for peer, outs in by_peer.items():
            self.sock.send(peer, ReqOutputs(outs))

    def stats(self) -> WorkerStats:
        s = self.engine.stats()
        counters = {k: float(v) for k, v in self.engine.counters.items()}
        counters["preemptions"] = float(self.engine.scheduler.num_preemptions)
        return WorkerStats(worker_id=self.worker_id, counters=counters, **s)

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat_s
            self.sock.broadcast(self.stats())

    def _shutdown(self) -> None:
        outs = [ReqOutput(rid=rid, finished=True, finish_reason="error", error="worker shut down",
                          error_code="worker_unavailable")
                for rid in list(self.engine.requests) if self.engine.abort(rid) is not None]
        self._send(outs)
        self.sock.close()
        log.info("worker %s stopped (%d requests failed on shutdown)", self.worker_id, len(outs))


def _refusal(msg: GenerateReq, message: str, code: str) -> ReqOutput:
    return ReqOutput(rid=msg.rid, finished=True, finish_reason="error", error=message, error_code=code,
                     prompt_tokens=len(msg.input_ids))
