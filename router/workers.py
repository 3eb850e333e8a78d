"""The router's links to its workers: one DEALER each, health from heartbeats, outputs to their requests.

Each link runs four tasks: `_send_loop` drains the outbox into the socket (so that callers never await
a socket, even when cancelled), `_recv_loop` files every message (WorkerInfo, WorkerStats, CacheEvents,
ReqOutputs), `_hello_loop` introduces the router (every second while the worker is not healthy, every few
seconds otherwise, so that a restarted worker learns of it again) and `_monitor_loop` notices a dropped
TCP connection (a killed worker) at once. The pool's `_watch_loop` marks a link unhealthy when it has been
silent for `timeout` seconds and fails the requests in flight on it at once; links added by registration
are dropped after a long silence. A worker whose instance_id changes has restarted: what the router knew
of its cache is dropped and what was in flight on the old process is failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any, NamedTuple, Protocol

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from mixquant_serve.protocol.channels import RouterSocket
from mixquant_serve.protocol.messages import (
    AbortReq,
    CacheEvents,
    FromWorker,
    GenerateReq,
    Hello,
    ReqOutput,
    ReqOutputs,
    ToWorker,
    WorkerInfo,
    WorkerStats,
)
from router.cache_index import CacheIndex

log = logging.getLogger("router.workers")

HELLO_UNTIL_HEARD_S = 1.0  # while a worker has not answered (or has gone silent)
HELLO_EVERY_S = 3.0
ROLES = ("colocated", "prefill", "decode")
SERVING_ROLES = ("colocated", "decode")  # workers that receive GenerateReq and answer with tokens


class Readiness(NamedTuple):
    """Whether the workers the router can place work on now form the topology it was configured for."""

    prefill: int  # healthy, not draining prefill workers
    decode: int  # healthy, not draining workers that decode (decode or colocated)
    need_prefill: int
    need_decode: int

    @property
    def ready(self) -> bool:
        return self.prefill >= self.need_prefill and self.decode >= self.need_decode

    def reason(self) -> str:
        short = [f"{have} of {need} {role} workers" for role, have, need in
                 (("decode", self.decode, self.need_decode), ("prefill", self.prefill, self.need_prefill))
                 if have < need]
        return "ready" if not short else "not ready: healthy " + ", ".join(short)


class OutputSink(Protocol):
    def deliver(self, out: ReqOutput) -> None: ...


class WorkerLink:
    def __init__(self, ctx: zmq.asyncio.Context, url: str, router_id: str, timeout: float,
                 role: str = "colocated", static: bool = True) -> None:
        self.url = url
        self.router_id = router_id
        self.timeout = timeout
        self.role_hint = role
        self.static = static
        self.sock = RouterSocket(ctx, url)
        self.info: WorkerInfo | None = None
        self.stats: WorkerStats | None = None
        self.cache = CacheIndex()
        self.added = time.monotonic()
        self.last_seen: float | None = None
        self.healthy = False
        self.inflight: dict[str, OutputSink] = {}
        self.prefilling: set[str] = set()  # requests whose prompt this (prefill) worker has yet to hand over
        self.routed = 0  # GenerateReqs sent here
        self.prefills_assigned = 0  # GenerateReqs that named this worker as their prefill worker
        self.restarts = 0
        self.outbox: asyncio.Queue[ToWorker] = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []

    @property
    def worker_id(self) -> str:
        return self.info.worker_id if self.info else self.url

    @property
    def role(self) -> str:
        return self.info.role if self.info else self.role_hint

    @property
    def draining(self) -> bool:
        return bool(self.stats and self.stats.draining)

    @property
    def context_length(self) -> int | None:
        return self.info.context_length if self.info else None

    @property
    def assigned(self) -> int:
        """Requests the router has handed this worker that it has not finished with."""
        return len(self.inflight) + len(self.prefilling)

    def start(self) -> None:
        loops = (self._send_loop(), self._recv_loop(), self._hello_loop(), self._monitor_loop())
        self.tasks = [asyncio.create_task(c, name=f"{c.__name__}:{self.url}") for c in loops]

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.sock.close()

    def post(self, msg: ToWorker) -> None:
        self.outbox.put_nowait(msg)

    def submit(self, req: GenerateReq, sink: OutputSink) -> None:
        self.inflight[req.rid] = sink
        self.routed += 1
        self.post(req)

    def abort(self, rid: str) -> None:
        """Forget `rid` and tell the worker to free it; safe to call from a finally in a cancelled task."""
        if self.inflight.pop(rid, None) is not None:
            self.post(AbortReq(rid))

    async def _send_loop(self) -> None:
        while True:
            msg = await self.outbox.get()
            try:
                await self.sock.send(msg)
            except zmq.ZMQError as e:
                log.warning("send to %s failed: %s", self.url, e)

    async def _hello_loop(self) -> None:
        while True:
            if self.outbox.qsize() < 8:  # a dead peer must not pile up greetings
                self.post(Hello(self.router_id))
            await asyncio.sleep(HELLO_EVERY_S if self.healthy else HELLO_UNTIL_HEARD_S)

    async def _recv_loop(self) -> None:
        while True:
            try:
                msg = await self.sock.recv()
            except msgspec.DecodeError as e:
                log.warning("dropped an undecodable message from %s: %s", self.url, e)
                continue
            self.handle(msg)

    async def _monitor_loop(self) -> None:
        mon = self.sock.sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            while True:
                event = parse_monitor_message(await mon.recv_multipart())
                if event["event"] == zmq.EVENT_DISCONNECTED and self.healthy:
                    self.fail_all("the connection to it closed")
        finally:
            with contextlib.suppress(zmq.ZMQError):
                self.sock.sock.disable_monitor()
            mon.close(0)

    def handle(self, msg: FromWorker) -> None:
        self.last_seen = time.monotonic()
        if isinstance(msg, ReqOutputs):
            self._route(msg.outputs)
        elif isinstance(msg, WorkerStats):
            self._check_instance(msg.instance_id)
            self.stats = msg
        elif isinstance(msg, CacheEvents):
            self.cache.apply(msg)
        elif isinstance(msg, WorkerInfo):
            self._on_info(msg)
        if not self.healthy and self.info is not None:
            self.healthy = True
            log.info("worker %s (%s) at %s is healthy", self.worker_id, self.role, self.url)

    def _on_info(self, msg: WorkerInfo) -> None:
        self._check_instance(msg.instance_id)
        if self.info is None or self.info.worker_id != msg.worker_id:
            log.info("worker %s at %s: %s, context %d, prefill %s, decode %s", msg.worker_id, self.url,
                     msg.role, msg.context_length, msg.prefill_precision, msg.decode_precision)
        if msg.role != self.role_hint and msg.role in ROLES:
            log.info("worker %s at %s reports role %s (announced as %s)", msg.worker_id, self.url, msg.role,
                     self.role_hint)
        self.info = msg

    def _check_instance(self, instance_id: str) -> None:
        if self.info is None or self.info.instance_id == instance_id:
            return
        self.restarts += 1
        log.warning("worker %s at %s restarted (instance %s -> %s)", self.worker_id, self.url,
                    self.info.instance_id[:8], instance_id[:8])
        self.cache.clear()
        self.stats = None
        self.info = msgspec.structs.replace(self.info, instance_id=instance_id)
        self._fail_inflight(f"worker {self.worker_id} restarted", abort=False)
        self.post(Hello(self.router_id))  # its WorkerInfo and cache snapshot, without waiting for the next

    def _route(self, outputs: list[ReqOutput]) -> None:
        for out in outputs:
            sink = self.inflight.pop(out.rid, None) if out.finished else self.inflight.get(out.rid)
            if sink is not None:
                sink.deliver(out)

    def check(self, now: float) -> None:
        """Turn unhealthy after `timeout` seconds of silence and fail what is in flight here."""
        if not self.healthy or self.last_seen is None or now - self.last_seen <= self.timeout:
            return
        self.fail_all(f"no heartbeat for {now - self.last_seen:.1f} s")

    def fail_all(self, why: str) -> None:
        self.healthy = False
        log.warning("worker %s at %s is unhealthy (%s); failing %d requests", self.worker_id, self.url, why,
                    len(self.inflight))
        self._fail_inflight(f"worker {self.worker_id} stopped responding ({why})", abort=True)

    def _fail_inflight(self, message: str, abort: bool) -> None:
        for rid in list(self.inflight):
            sink = self.inflight.pop(rid)
            if abort:
                self.post(AbortReq(rid))
            sink.deliver(ReqOutput(rid=rid, finished=True, finish_reason="error", error=message,
                                   error_code="worker_unavailable"))

    def snapshot(self, sessions: int = 0) -> dict[str, Any]:
        age = None if self.last_seen is None else round(time.monotonic() - self.last_seen, 3)
        info, stats = self.info, self.stats
        return {
            "url": self.url,
            "worker_id": self.worker_id,
            "role": self.role,
            "registered": not self.static,
            "healthy": self.healthy,
            "draining": self.draining,
            "precision": ({"prefill": info.prefill_precision, "decode": info.decode_precision}
                          if info else None),
            "bf16_tail_tokens": info.bf16_tail_tokens if info else None,
            "bf16_kv_proj": info.bf16_kv_proj if info else None,
            "load": {"running": stats.num_running, "waiting": stats.num_waiting,
                     "queued_tokens": stats.queued_tokens, "free_pages": stats.free_pages,
                     "assigned": self.assigned} if stats else {"assigned": self.assigned},
            "sessions": sessions,
            "cached_pages_known": len(self.cache),
            "routed": self.routed,
            "prefills_assigned": self.prefills_assigned,
            "restarts": self.restarts,
            "seconds_since_heard": age,
            "inflight": len(self.inflight),
            "info": msgspec.to_builtins(info) if info else None,
            "stats": msgspec.to_builtins(stats) if stats else None,
        }


class WorkerPool:
    def __init__(self, workers: list[tuple[str, str]], timeout: float) -> None:
        self.router_id = f"router-{uuid.uuid4().hex[:12]}"
        self.static = list(workers)
        self.timeout = timeout
        self.drop_after = max(60.0, 10 * timeout)  # silence after which a registered worker is forgotten
        self.by_url: dict[str, WorkerLink] = {}
        self.ctx: zmq.asyncio.Context | None = None
        self._watch: asyncio.Task | None = None

    @property
    def links(self) -> list[WorkerLink]:
        return list(self.by_url.values())

    async def start(self) -> None:
        self.ctx = zmq.asyncio.Context()
        for url, role in self.static:
            self.add(url, role, static=True)
        self._watch = asyncio.create_task(self._watch_loop(), name="watch_workers")

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for link in self.links:
            await link.stop()
        if self.ctx is not None:
            self.ctx.term()

    def add(self, url: str, role: str, static: bool = False) -> WorkerLink:
        """A link to `url` (a registration for a known url only refreshes it)."""
        assert self.ctx is not None, "the pool is not started"
        link = self.by_url.get(url)
        if link is None:
            link = self.by_url[url] = WorkerLink(self.ctx, url, self.router_id, self.timeout, role, static)
            link.start()
            log.info("added %s worker %s (%s)", role, url, "static" if static else "registered")
        elif not link.healthy:
            link.post(Hello(self.router_id))
        return link

    async def _watch_loop(self) -> None:
        period = min(0.25, self.timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for link in self.links:
                link.check(now)
                if not link.static and now - (link.last_seen or link.added) > self.drop_after:
                    log.warning("forgetting registered worker %s: silent for %.0f s", link.url,
                                self.drop_after)
                    del self.by_url[link.url]
                    await link.stop()

    def healthy(self, roles: tuple[str, ...] = ROLES) -> list[WorkerLink]:
        return [link for link in self.by_url.values() if link.healthy and link.role in roles]

    def eligible(self, roles: tuple[str, ...]) -> list[WorkerLink]:
        """Healthy, not draining, of one of `roles`: where new work may go."""
        return [link for link in self.healthy(roles) if not link.draining]

    def get(self, url: str | None) -> WorkerLink | None:
        return self.by_url.get(url) if url else None

    @property
    def alive(self) -> bool:
        """The pool's health watch still runs (it is what turns silent workers unhealthy)."""
        return self._watch is not None and not self._watch.done()

    def readiness(self, min_prefill: int, min_decode: int) -> Readiness:
        """min_prefill -1: auto, one prefill worker once the pool knows any (named or registered, healthy or not)."""
        knows_prefill = any(link.role == "prefill" for link in self.by_url.values())
        need_prefill = min_prefill if min_prefill >= 0 else int(knows_prefill)
        return Readiness(len(self.eligible(("prefill",))), len(self.eligible(SERVING_ROLES)), need_prefill,
                         min_decode)

    @property
    def disaggregated(self) -> bool:
        return any(link.role in ("prefill", "decode") for link in self.by_url.values())

    @property
    def context_length(self) -> int | None:
        """The smallest context length any serving worker reported (healthy ones first)."""
        serving = [w for w in self.links if w.role in SERVING_ROLES]
        lengths = [w.context_length for w in self.healthy(SERVING_ROLES) or serving if w.context_length]
        return min(lengths) if lengths else None
