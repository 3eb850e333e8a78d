"""The worker event loop: one engine, driven by control messages from one or more routers.

Lifecycle of a request in a colocated worker:
  1. a router sends GenerateReq -> the engine validates it (a refusal is answered at once with an
     error ReqOutput) and queues it as `waiting`;
  2. the scheduler admits it when pages are free (`running`, prefilling in chunks, then decoding);
  3. after every engine step each request that gained a token gets a ReqOutput increment, sent to
     the router that asked for it; the last one has finished=True;
  4. AbortReq (a client went away) removes it wherever it is and frees its pages.
Between steps the loop drains its sockets; when idle it blocks on them. Every `heartbeat_s` it
broadcasts WorkerStats and the prefix cache's changes (CacheEvents), which the router uses for
health, placement and /metrics. A step that runs longer than a heartbeat (a long prefill chunk on a
slow machine) does not make the worker look dead: while the loop thread is inside a step, a helper
thread repeats the latest WorkerStats every `heartbeat_s`. The control socket is guarded by a lock that
the loop thread gives up only for the duration of a step, so the two never use it at once.
The prefill and decode workers extend this loop through the hooks
`_on_message`, `_after_step` and `_sockets`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Sequence

import zmq

from mixquant_serve.engine.engine import Engine, RequestError
from mixquant_serve.protocol.block_hash import chain_hashes
from mixquant_serve.protocol.channels import WorkerSocket, encode
from mixquant_serve.protocol.messages import (
    AbortReq,
    CacheEvents,
    GenerateReq,
    Hello,
    Register,
    ReqOutput,
    ReqOutputs,
    WorkerInfo,
    WorkerStats,
)
from mixquant_serve.sampling_params import InvalidSamplingParams

log = logging.getLogger("mixquant.worker")


class Worker:
    role = "colocated"

    def __init__(self, engine: Engine, address: str, worker_id: str, heartbeat_s: float = 0.5,
                 router_url: str | None = None, advertise_host: str | None = None) -> None:
        self.engine = engine
        self.worker_id = worker_id
        self.instance_id = uuid.uuid4().hex
        self.sock = WorkerSocket(address)
        self.address = self.sock.address
        port = self.address.rsplit(":", 1)[1]
        self.advertise_url = f"tcp://{advertise_host}:{port}" if advertise_host else self.address
        self.heartbeat_s = heartbeat_s
        self.owner: dict[str, bytes] = {}  # rid -> the router that sent it
        self.stopping = False
        self._next_beat = 0.0
        self.cached: set[int] = set()
        self.snapshot_sent: set[bytes] = set()
        self._inserted: list[int] = []
        self._evicted: list[int] = []
        if engine.cache is not None:
            engine.cache.listener = self._on_cache_change
        self.registrar = _Registrar(router_url, self.advertise_url, self.role) if router_url else None
        self._sock_lock = threading.Lock()  # held by the loop thread except while it runs a step
        self._step_started: float | None = None
        self._last_stats: WorkerStats | None = None
        self._last_beat = 0.0  # when WorkerStats last went out, from either thread
        self._beats_stop = threading.Event()

    # -- what the router sees ---------------------------------------------------------------------
    def info(self) -> WorkerInfo:
        cfg, eng = self.engine.config, self.engine
        return WorkerInfo(
            worker_id=self.worker_id, instance_id=self.instance_id, role=self.role,
            model_name=cfg.served_model_name or "", model_path=cfg.model_path,
            context_length=cfg.context_length, page_size=cfg.page_size, total_pages=eng.pool.capacity,
            max_running_requests=cfg.max_running_requests, prefill_precision=cfg.prefill_precision,
            decode_precision=cfg.decode_precision, bf16_tail_tokens=cfg.bf16_tail_tokens,
            kv_layout=dataclasses.asdict(eng.runner.layout), weight_bytes=eng.runner.weight_bytes, pid=os.getpid())

    def stats(self) -> WorkerStats:
        counters = {k: float(v) for k, v in self.engine.counters.items()}
        counters["preemptions"] = float(self.engine.scheduler.num_preemptions)
        counters["bf16_tail_tokens_computed"] = float(self.engine.scheduler.num_tail_tokens)
        return WorkerStats(worker_id=self.worker_id, instance_id=self.instance_id, counters=counters,
                           gauges=self.gauges(), draining=self.stopping, **self.engine.stats())

    def gauges(self) -> dict[str, float]:
        return {}

    def _on_cache_change(self, kind: str, tokens: Sequence[int], num_pages: int) -> None:
        hashes = chain_hashes(tokens, self.engine.config.page_size)[-num_pages:]
        if kind == "insert":
            self.cached.update(hashes)
            self._inserted += hashes
        else:
            self.cached.difference_update(hashes)
            self._evicted += hashes

    def _cache_events(self, snapshot: bool) -> CacheEvents:
        inserted = sorted(self.cached) if snapshot else self._inserted
        events = CacheEvents(worker_id=self.worker_id, page_size=self.engine.config.page_size,
                             inserted=inserted, evicted=[] if snapshot else self._evicted, snapshot=snapshot)
        if not snapshot:
            self._inserted, self._evicted = [], []
        return events

    # -- the loop ---------------------------------------------------------------------------------
    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        poller = zmq.Poller()
        for s in self._sockets():
            poller.register(s, zmq.POLLIN)
        self._sock_lock.acquire()
        beats = threading.Thread(target=self._beat_during_steps, daemon=True, name="step-heartbeats")
        beats.start()
        try:
            while not self.stopping:
                self._handle(self.sock.recv_all())
                if self.engine.has_work:
                    self._send(self._step())
                else:
                    poller.poll(self._idle_poll_ms())
                self._send(self._after_step())
                self._heartbeat()
        finally:
            self._beats_stop.set()
            try:
                self._shutdown()
            finally:
                self._sock_lock.release()
                beats.join(timeout=5)

    def _step(self) -> list[ReqOutput]:
        """One engine step, with the control socket left to the step-heartbeat thread meanwhile."""
        self._step_started = time.monotonic()
        self._sock_lock.release()
        try:
            return self.engine.step()
        finally:
            self._sock_lock.acquire()
            self._step_started = None

    def _beat_during_steps(self) -> None:
        """While the loop thread is in a step, repeat the latest WorkerStats whenever a heartbeat is due
        (checked four times a heartbeat, so the router never waits much longer than one)."""
        while not self._beats_stop.wait(self.heartbeat_s / 4):
            if self._step_started is None or self._last_stats is None:
                continue
            if time.monotonic() - self._last_beat < self.heartbeat_s:
                continue
            if not self._sock_lock.acquire(blocking=False):  # the step just ended: the loop beats itself
                continue
            try:
                if self._step_started is not None:
                    self.sock.broadcast(self._last_stats)
                    self._last_beat = time.monotonic()
            except zmq.ZMQError as e:
                log.warning("step heartbeat not sent: %s", e)
            finally:
                self._sock_lock.release()

    def _sockets(self) -> list[zmq.Socket]:
        return [self.sock.sock]

    def _idle_poll_ms(self) -> int:
        """How long an idle loop may block on its sockets (transfers that finish as GPU events need polls)."""
        return int(self.heartbeat_s * 1000)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stopping = True

    def _handle(self, messages: list) -> None:
        for peer, msg in messages:
            if isinstance(msg, GenerateReq):
                self._add(peer, msg)
            elif isinstance(msg, AbortReq):
                self._abort(msg.rid)
            elif isinstance(msg, Hello):
                self.sock.send(peer, self.info())
                if peer not in self.snapshot_sent:  # later changes reach it with the heartbeats
                    self.snapshot_sent.add(peer)
                    self.sock.send(peer, self._cache_events(snapshot=True))
                if self.registrar:
                    self.registrar.heard()
            else:
                self._on_message(peer, msg)

    def _on_message(self, peer: bytes, msg: object) -> None:
        log.warning("%s worker ignores %s", self.role, type(msg).__name__)

    def _after_step(self) -> list[ReqOutput]:
        return []

    def _add(self, peer: bytes, msg: GenerateReq) -> None:
        self.owner[msg.rid] = peer
        try:
            self.engine.add_request(msg.rid, msg.input_ids, msg.params, **self._request_options(msg))
        except InvalidSamplingParams as e:
            self._send([_refusal(msg, str(e), "invalid_request")])
        except RequestError as e:
            self._send([_refusal(msg, str(e), e.code, e.param)])

    def _request_options(self, msg: GenerateReq) -> dict:
        return {}

    def _abort(self, rid: str) -> None:
        if (out := self.engine.abort(rid)) is not None:
            self._send([out])

    def _send(self, outputs: list[ReqOutput]) -> None:
        by_peer: dict[bytes, list[ReqOutput]] = defaultdict(list)
        for out in outputs:
            peer = self.owner.pop(out.rid, None) if out.finished else self.owner.get(out.rid)
            if peer is not None:
                by_peer[peer].append(out)
        for peer, outs in by_peer.items():
            self.sock.send(peer, ReqOutputs(outs))

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if now >= self._next_beat:
            self._next_beat = now + self.heartbeat_s
            self._last_stats = self.stats()
            self.sock.broadcast(self._last_stats)
            self._last_beat = now
            if self._inserted or self._evicted:
                self.sock.broadcast(self._cache_events(snapshot=False))
            if self.registrar:
                self.registrar.tick(now)

    def _shutdown(self) -> None:
        outs = [ReqOutput(rid=rid, finished=True, finish_reason="error", error="worker shut down",
                          error_code="worker_unavailable")
                for rid in list(self.engine.requests) if self.engine.abort(rid) is not None]
        self._send(outs)
        self.sock.broadcast(self.stats())  # draining=True: routers stop placing work here
        self.sock.close()
        if self.registrar:
            self.registrar.close()
        log.info("worker %s stopped (%d requests failed on shutdown)", self.worker_id, len(outs))


class _Registrar:
    """Announces the worker to a router's registration socket until that router says Hello."""

    def __init__(self, router_url: str, url: str, role: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(router_url)
        self.message = encode(Register(url=url, role=role))
        self.done = False
        self.next = 0.0

    def heard(self) -> None:
        self.done = True

    def tick(self, now: float) -> None:
        if not self.done and now >= self.next:
            self.next = now + 1.0
            self.sock.send(self.message, zmq.NOBLOCK)

    def close(self) -> None:
        self.sock.close(0)


def _refusal(msg: GenerateReq, message: str, code: str, param: str | None = None) -> ReqOutput:
    return ReqOutput(rid=msg.rid, finished=True, finish_reason="error", error=message, error_code=code,
                     error_param=param, prompt_tokens=len(msg.input_ids))
