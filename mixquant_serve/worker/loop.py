"""The worker event loop: one engine, driven by control messages from one or more routers.

Lifecycle of a request in a colocated worker:
  1. a router sends GenerateReq -> the engine validates it (a refusal is answered at once with an
     error ReqOutput) and queues it as `waiting`;
  2. the scheduler admits it when pages are free (`running`, prefilling in chunks, then decoding);
  3. after every engine step each request that gained a token gets a ReqOutput increment, sent to
     the router that asked for it; the last one has finished=True;
  4. AbortReq (a client went away) removes it wherever it is and frees its pages.
After each step, the newest requests still waiting beyond `max_queued_requests` (the scheduler could not
admit them: KV pages or running slots are short) are refused with error_code "overloaded" (the router
answers 429 with Retry-After), so a backlog stays bounded; a preempted request that has already produced
tokens is never refused. A router that has said Hello and then stays silent for `router_timeout` seconds
is gone (killed, or reconnected under a new socket identity): the requests it sent are aborted, since no
one can receive their outputs.
Between steps the loop drains its sockets; when idle it blocks on them. Every `heartbeat_s` it
broadcasts WorkerStats and the prefix cache's changes (CacheEvents), which the router uses for
health, placement and /metrics. A step that runs longer than a heartbeat (a long prefill chunk on a
slow machine) does not make the worker look dead: while the loop thread is inside a step, a helper
thread repeats the latest WorkerStats every `heartbeat_s`. The control socket is guarded by a lock that
the loop thread gives up only for the duration of a step, so the two never use it at once.
SIGTERM (what Kubernetes and Docker send before stopping a container) drains the worker: it tells its routers
at once that it is draining (they place nothing new there and move its sessions), refuses requests that still
arrive with error_code "worker_unavailable" (the router places them again), finishes what it has in flight, and
exits once nothing is left or `drain_timeout` seconds have passed (what is still running then fails). SIGINT
(Ctrl-C), a second signal, or drain_timeout 0 stop it at once.
The prefill and decode workers extend this loop through the hooks
`_on_message`, `_after_step`, `_sockets` and `_busy`.
"""

from __future__ import annotations

import contextlib
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
                 router_url: str | None = None, advertise_host: str | None = None,
                 max_queued_requests: int = 256, router_timeout: float = 60.0, drain_timeout: float = 20.0) -> None:
        self.engine = engine
        self.drain_timeout = drain_timeout
        self.draining = False  # SIGTERM: finishing what is in flight, taking nothing new
        self._drain_deadline = 0.0
        self._drain_announced = False
        self.max_queued_requests = max_queued_requests  # 0: no bound
        self.router_timeout = router_timeout
        self.heard: dict[bytes, float] = {}  # router (a peer that said Hello) -> when it last sent anything
        self._last_drain = 0.0  # when the control socket was last read
        self.orphans_aborted = 0
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
            bf16_kv_proj=cfg.kv_proj_precision is not None,
            kv_layout=dataclasses.asdict(eng.runner.layout), weight_bytes=eng.runner.weight_bytes, pid=os.getpid())

    def stats(self) -> WorkerStats:
        counters = {k: float(v) for k, v in self.engine.counters.items()}
        counters["preemptions"] = float(self.engine.scheduler.num_preemptions)
        counters["orphans_aborted"] = float(self.orphans_aborted)
        counters["bf16_tail_tokens_computed"] = float(self.engine.scheduler.num_tail_tokens)
        return WorkerStats(worker_id=self.worker_id, instance_id=self.instance_id, counters=counters,
                           gauges=self.gauges(), draining=self.stopping or self.draining, **self.engine.stats())

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
                    self._send(self._step() + self._shed())
                else:
                    poller.poll(self._idle_poll_ms())
                self._send(self._after_step())
                self._heartbeat()
                if self.draining:
                    self._drain_tick()
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
        """SIGTERM starts a drain; SIGINT, a second signal or no drain_timeout stop at once. Only flags are set
        here: the loop thread does the rest (a handler that logged or used a socket could deadlock it)."""
        if signum == signal.SIGTERM and not self.draining and self.drain_timeout > 0:
            self.draining = True
            self._drain_deadline = time.monotonic() + self.drain_timeout
        else:
            self.stopping = True

    def _busy(self) -> bool:
        """Work in flight that a drain waits for."""
        return bool(self.engine.requests)

    def _drain_tick(self) -> None:
        if not self._drain_announced:  # routers learn it now, not at the next heartbeat
            self._drain_announced = True
            log.info("worker %s draining: %d requests in flight, at most %.0f s", self.worker_id,
                     len(self.engine.requests), self.drain_timeout)
            self.sock.broadcast(self.stats())
        if not self._busy():
            log.info("worker %s drained", self.worker_id)
            self.stopping = True
        elif time.monotonic() >= self._drain_deadline:
            log.warning("worker %s: drain timeout (%.0f s) with work in flight", self.worker_id, self.drain_timeout)
            self.stopping = True

    def _handle(self, messages: list) -> None:
        now = time.monotonic()
        if now - self._last_drain > 2 * self.heartbeat_s:  # this loop was away (a long step, SIGSTOP): what
            self.heard = dict.fromkeys(self.heard, now)  # routers sent meanwhile may still be on its way in
        self._last_drain = now
        for peer, msg in messages:
            if isinstance(msg, Hello) or peer in self.heard:
                self.heard[peer] = now
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
        if self.draining:  # the router places it again
            self._send([_refusal(msg, f"worker {self.worker_id} is shutting down", "worker_unavailable")])
            return
        try:
            self.engine.add_request(msg.rid, msg.input_ids, msg.params, **self._request_options(msg))
        except InvalidSamplingParams as e:
            self._send([_refusal(msg, str(e), "invalid_request")])
        except RequestError as e:
            self._send([_refusal(msg, str(e), e.code, e.param)])

    def _shed(self) -> list[ReqOutput]:
        """Refuse the newest waiting requests beyond max_queued_requests (see the module docstring)."""
        waiting = self.engine.scheduler.waiting
        excess = len(waiting) - self.max_queued_requests
        if not self.max_queued_requests or excess <= 0:
            return []
        # only a router's requests (a prefill worker's jobs come from decode workers, which time them out)
        shed = [r for r in reversed(waiting) if not r.output_ids and r.rid in self.owner][:excess]
        for req in shed:
            self.engine.abort(req.rid)
        why = (f"the worker is out of KV cache space and {self.max_queued_requests} requests already wait for "
               "it; retry later")
        return [ReqOutput(rid=r.rid, finished=True, finish_reason="error", error=why, error_code="overloaded",
                          prompt_tokens=r.num_prompt_tokens) for r in shed]

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
            self._forget_silent_routers()

    def _forget_silent_routers(self) -> None:
        """Abort what routers silent for router_timeout sent (their outputs can reach no one) and forget them.
        Silence counts up to the last read of the socket, not to now, and not across a stretch in which the
        loop read nothing (after a long step or a stop, the greetings sent meanwhile are still unread)."""
        for peer in [p for p, t in self.heard.items() if self._last_drain - t > self.router_timeout]:
            orphans = [rid for rid, owner in self.owner.items() if owner == peer]
            for rid in orphans:
                self._abort(rid)
                self.owner.pop(rid, None)
            self.orphans_aborted += len(orphans)
            silent = self._last_drain - self.heard.pop(peer)
            self.sock.peers.discard(peer)
            self.snapshot_sent.discard(peer)
            log.warning("a router silent for %.0f s is gone: aborted its %d requests", silent, len(orphans))

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
    """Announces the worker to a router's registration socket: every second until that router says Hello,
    then every REANNOUNCE_S seconds, so that a router restarted at the same address (which knows no
    workers) finds it again. A registration of a known worker changes nothing on the router."""

    REANNOUNCE_S = 5.0

    def __init__(self, router_url: str, url: str, role: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 4)  # while no router listens, keep a few, not an hour's worth
        self.sock.connect(router_url)
        self.message = encode(Register(url=url, role=role))
        self.done = False
        self.next = 0.0

    def heard(self) -> None:
        if not self.done:
            self.next = time.monotonic() + self.REANNOUNCE_S
        self.done = True

    def tick(self, now: float) -> None:
        if now >= self.next:
            self.next = now + (self.REANNOUNCE_S if self.done else 1.0)
            with contextlib.suppress(zmq.Again):  # the queue to an absent router is full
                self.sock.send(self.message, zmq.NOBLOCK)

    def close(self) -> None:
        self.sock.close(0)


def _refusal(msg: GenerateReq, message: str, code: str, param: str | None = None) -> ReqOutput:
    return ReqOutput(rid=msg.rid, finished=True, finish_reason="error", error=message, error_code=code,
                     error_param=param, prompt_tokens=len(msg.input_ids))
