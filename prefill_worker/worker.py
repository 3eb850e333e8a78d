"""The prefill worker: holds the prefill-precision (NVFP4 by default) model and its own radix prefix cache;
computes prompt KV for decode workers and pushes it into their pages.

Lifecycle of a request here, queue by queue (the gauges in /metrics carry these names):
  1. bootstrapping  PrefillReq arrived from a decode worker (tokens, where they start, its page indices,
                    its transfer endpoint and KV layout). A layout that differs from ours is refused
                    at once, naming the mismatch. The channel to that decode worker is set up on first
                    contact (for NCCL, a two-rank communicator) and reused.
  2. waiting        queued in the engine's scheduler until pages are free (prefix pages from earlier
                    turns are reused from the local radix cache).
  3. computing      prefill runs in chunks; after each layer of each chunk the pages it completed are
                    pushed to the decode worker (transfer overlaps compute). Pages the decode worker
                    lacks but this worker had cached are pushed with the first chunk.
  4. transferring   computed; the end marker is sent and the request's pages stay held until the decode
                    worker acknowledges (KVAck) or the transfer times out.
  5. done / failed  pages go to the radix cache (the next turn reuses them) and are released.
AbortPrefill (the decode side gave up) drops the request wherever it is.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mixquant_serve.config import KVLayout
from mixquant_serve.engine.engine import Engine, RequestError
from mixquant_serve.engine.request import Status
from mixquant_serve.engine.scheduler import Batch
from mixquant_serve.protocol.messages import AbortPrefill, KVAck, PrefillReq, ReqOutput
from mixquant_serve.sampling_params import SamplingParams
from mixquant_serve.transfer.base import Transfer, TransferState, create_sender
from mixquant_serve.worker.loop import Worker

log = logging.getLogger("mixquant.prefill")

_NO_SAMPLING = SamplingParams(max_tokens=1)


@dataclass
class _Job:
    rid: str
    start: int  # the decode worker holds positions [0, start)
    dst_pages: list[int]
    sent_upto: int  # positions [start, sent_upto) are pushed for every layer
    computed: bool = False


class PrefillWorker(Worker):
    role = "prefill"

    def __init__(self, engine: Engine, address: str, worker_id: str, backend: str, transfer_timeout: float,
                 **kwargs) -> None:
        super().__init__(engine, address, worker_id, **kwargs)
        self.sender = create_sender(backend, engine.runner.storage, worker_id, transfer_timeout)
        self.layout = engine.runner.layout
        self.jobs: dict[str, _Job] = {}
        engine.kv_hook = self._layer_done
        cfg = engine.config
        if cfg.wants_bf16_kv_proj and cfg.kv_proj_precision is None:
            log.warning("--bf16-kv-proj: this prefill worker holds no BF16 weights (prefill %s, decode %s), so the "
                        "prompt's K/V projections run in %s; start it with --decode-precision bf16 to hold them "
                        "(mixquant-serve launch does)", cfg.prefill_precision, cfg.decode_precision,
                        cfg.prefill_precision)
        self.transfer_counters = dict.fromkeys(
            ("kv_bytes_sent", "kv_transfers_ok", "kv_transfers_failed", "kv_transfer_seconds"), 0.0)

    def _idle_poll_ms(self) -> int:
        busy = self.sender.needs_polling and self.sender.transfers
        return 1 if busy else super()._idle_poll_ms()

    # -- control messages from decode workers ---------------------------------------------------
    def _on_message(self, peer: bytes, msg: object) -> None:
        if isinstance(msg, PrefillReq):
            self._start(msg)
        elif isinstance(msg, AbortPrefill):
            self._drop(msg.rid, "aborted by the decode worker")
        elif isinstance(msg, KVAck):
            if (t := self.sender.acknowledge(msg.rid, msg.ok, msg.error)) is not None:
                self._ended(t)
        else:
            super()._on_message(peer, msg)

    def _busy(self) -> bool:
        return bool(self.jobs) or super()._busy()

    def _start(self, msg: PrefillReq) -> None:
        transfer = self.sender.open(msg.rid, msg.peer)
        ps = self.layout.page_size
        problem = self.layout.mismatch(KVLayout(**msg.peer.kv_layout))
        if self.draining:  # the decode worker's request fails over (the router places it again)
            problem = f"prefill worker {self.worker_id} is shutting down"
        if problem is None and (msg.start % ps or len(msg.dst_pages) != -(-(len(msg.token_ids) - msg.start) // ps)):
            problem = f"{len(msg.dst_pages)} destination pages do not fit tokens [{msg.start}, {len(msg.token_ids)})"
        if problem is None:
            try:
                self.engine.add_request(msg.rid, msg.token_ids, _NO_SAMPLING, prefill_only=True)
            except RequestError as e:
                problem = str(e)
        if problem is not None:
            log.warning("refusing prefill %s: %s", msg.rid, problem)
            self.sender.close(msg.rid, error=problem if self.draining else f"KV layout or request mismatch: {problem}")
            transfer.end(TransferState.FAILED, problem)
            return
        self.jobs[msg.rid] = _Job(msg.rid, msg.start, msg.dst_pages, msg.start)

    # -- pushing KV as it is computed ------------------------------------------------------------
    def _layer_done(self, batch: Batch, layer: int) -> None:
        for req, n in zip(batch.reqs, batch.lengths, strict=True):
            job = self.jobs.get(req.rid)
            if job is None:
                continue
            hi = req.num_computed + n
            self._push(req.pages, job, layer, job.sent_upto, hi)
            if layer == self.layout.num_layers - 1:  # a partly filled last page goes again with the next chunk
                job.sent_upto = hi if hi == req.prefill_target else hi // self.layout.page_size * self.layout.page_size

    def _push(self, pages: list[int], job: _Job, layer: int, lo: int, hi: int) -> None:
        ps = self.layout.page_size
        first, end = lo // ps, -(-hi // ps)
        if end <= first:
            return
        base = job.start // ps
        self.sender.send(job.rid, layer, pages[first:end], job.dst_pages[first - base : end - base])

    def _after_step(self) -> list[ReqOutput]:
        for req in self.engine.take_prefilled():
            job = self.jobs.get(req.rid)
            if job is None:
                self.engine.release_prefilled(req.rid)
                continue
            job.computed = True
            if job.sent_upto < req.prefill_target:  # nothing was computed: it all came from the cache
                for layer in range(self.layout.num_layers):
                    self._push(req.pages, job, layer, job.sent_upto, req.prefill_target)
            self.sender.close(req.rid)
        for t in self.sender.poll():
            self._ended(t)
        return []

    def _ended(self, t: Transfer) -> None:
        ok = t.state is TransferState.SUCCESS
        self.transfer_counters["kv_transfers_ok" if ok else "kv_transfers_failed"] += 1
        self.transfer_counters["kv_bytes_sent"] += t.nbytes
        self.transfer_counters["kv_transfer_seconds"] += t.seconds
        if not ok:
            log.warning("KV transfer %s to %s failed: %s", t.rid, t.peer, t.error)
        self._drop(t.rid, None)

    def _drop(self, rid: str, reason: str | None) -> None:
        job = self.jobs.pop(rid, None)
        if reason is not None:
            self.sender.cancel(rid)
        if job is not None and job.computed:
            self.engine.release_prefilled(rid)
        elif rid in self.engine.requests:
            self.engine.abort(rid)

    # -- metrics --------------------------------------------------------------------------------
    def stats(self):
        s = super().stats()
        s.counters.update(self.transfer_counters)
        return s

    def gauges(self) -> dict[str, float]:
        states = dict.fromkeys(("bootstrapping", "waiting", "computing", "transferring"), 0)
        for rid, job in self.jobs.items():
            states[self._state(rid, job)] += 1
        return {f"queue_{k}": float(v) for k, v in states.items()}

    def _state(self, rid: str, job: _Job) -> str:
        t = self.sender.transfers.get(rid)
        if t is not None and t.state is TransferState.BOOTSTRAPPING:
            return "bootstrapping"
        if job.computed:
            return "transferring"
        req = self.engine.requests.get(rid)
        return "computing" if req is not None and req.status is Status.RUNNING else "waiting"

    def _shutdown(self) -> None:
        for rid in list(self.jobs):
            self.sender.close(rid, error="prefill worker shut down")
        super()._shutdown()
        self.sender.shutdown()
