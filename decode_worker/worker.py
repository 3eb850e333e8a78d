"""The decode worker: holds the decode-precision (BF16) model and decodes; prompt KV comes from prefill workers.

Lifecycle of a request here, queue by queue:
  1. waiting      GenerateReq arrived (with the prefill worker the router chose, `prefill_url`).
  2. admitted     the scheduler matched its prompt against the local radix cache (what earlier turns left)
                  and allocated pages for the rest. If the missing tokens are fewer than the request's
                  `local_prefill_max_tokens` (or no prefill worker is named), it prefills them itself in
                  its own precision, like a colocated worker; otherwise:
  3. awaiting_kv  it sends PrefillReq (the missing tokens but the BF16 tail, its page indices, its transfer
                  endpoint) to the prefill worker and waits; the KV arrives layer by layer into those pages.
  4. tail         when the transfer succeeds it computes the last --bf16-tail-tokens prompt tokens itself
                  (tail batches; with K=1 the last prompt token is simply the first decode step), so the
                  tokens nearest the answer and the first sampled token come from its own precision; a
                  turn whose new tokens fit in the tail never leaves the decode worker;
  5. decoding     it joins the decode batch.
  6. finished     its pages go to the radix cache, so the next turn of the conversation needs only the
                  new tokens (a delta transfer).
A transfer that fails or times out fails the request with an error and frees its pages; the prefill
worker learns it through KVAck(ok=False). An aborted request cancels its transfer (AbortPrefill).
"""

from __future__ import annotations

import logging

import zmq

from mixquant_serve.engine.engine import Engine
from mixquant_serve.protocol.channels import PeerLink
from mixquant_serve.protocol.messages import (
    AbortPrefill,
    GenerateReq,
    KVAck,
    PrefillReq,
    ReqOutput,
    WorkerStats,
)
from mixquant_serve.transfer.base import TransferState, create_receiver
from mixquant_serve.worker.loop import Worker

log = logging.getLogger("mixquant.decode")


class DecodeWorker(Worker):
    role = "decode"

    def __init__(self, engine: Engine, address: str, worker_id: str, backend: str, transfer_host: str,
                 transfer_timeout: float, **kwargs) -> None:
        self.receiver = create_receiver(backend, engine.runner.storage, worker_id, transfer_host, transfer_timeout)
        super().__init__(engine, address, worker_id, **kwargs)
        self.peer = self.receiver.peer_info(self.info().kv_layout)
        self.links: dict[str, PeerLink] = {}
        self.source: dict[str, str] = {}  # rid -> prefill worker url, while its KV is on the way
        self.peer_instance: dict[str, str] = {}  # prefill worker url -> its process instance
        self.transfer_counters = dict.fromkeys(("kv_transfers_ok", "kv_transfers_failed", "kv_transfer_seconds"), 0.0)

    def _sockets(self) -> list[zmq.Socket]:
        return [self.sock.sock, self.receiver.socket]

    def _idle_poll_ms(self) -> int:
        busy = self.receiver.needs_polling and self.receiver.expected
        return 1 if busy else super()._idle_poll_ms()

    def _request_options(self, msg: GenerateReq) -> dict:
        return {"remote_prefill": msg.prefill_url, "local_prefill_max_tokens": msg.local_prefill_max_tokens,
                "prefix_reuse": msg.decode_prefix_reuse}

    def _link(self, url: str) -> PeerLink:
        if url not in self.links:
            self.links[url] = PeerLink(url)
        return self.links[url]

    def _after_step(self) -> list[ReqOutput]:
        for req in self.engine.take_remote_admitted():
            self._ask_prefill(req)
        for url, link in self.links.items():
            self._heard_from(url, link.recv_all())
        return [out for t in self.receiver.poll() if (out := self._transfer_ended(t)) is not None]

    def _heard_from(self, url: str, messages: list) -> None:
        """Prefill workers' heartbeats keep their transfers alive; a restarted one lost them."""
        for msg in messages:
            if not isinstance(msg, WorkerStats):
                continue
            known = self.peer_instance.setdefault(url, msg.instance_id)
            if known != msg.instance_id:
                self.peer_instance[url] = msg.instance_id
                self.receiver.fail_from(url, f"prefill worker {url} restarted")
            else:
                self.receiver.touch(url)

    def _ask_prefill(self, req) -> None:
        ps = self.engine.config.page_size
        end_page = -(-req.prefill_target // ps)
        dst = req.pages[req.kv_start // ps : end_page]
        self.receiver.expect(req.rid, dst, req.remote_url)
        self.source[req.rid] = req.remote_url
        self._link(req.remote_url).send(PrefillReq(
            rid=req.rid, token_ids=req.token_ids[: req.prefill_target], start=req.kv_start, dst_pages=dst,
            peer=self.peer))

    def _transfer_ended(self, t) -> ReqOutput | None:
        url = self.source.pop(t.rid, None)
        ok = t.state is TransferState.SUCCESS
        if url is not None:
            self._link(url).send(KVAck(rid=t.rid, ok=ok, error=t.error))
        self.transfer_counters["kv_transfers_ok" if ok else "kv_transfers_failed"] += 1
        self.transfer_counters["kv_transfer_seconds"] += t.seconds
        if ok:
            self.engine.kv_ready(t.rid, t.nbytes)
            return None
        log.warning("KV transfer for %s failed: %s", t.rid, t.error)
        return self.engine.fail(t.rid, f"KV transfer failed: {t.error}", "kv_transfer_failed")

    def _abort(self, rid: str) -> None:
        url = self.source.pop(rid, None)
        if url is not None:
            self.receiver.cancel(rid)
            self._link(url).send(AbortPrefill(rid=rid))
        super()._abort(rid)

    def stats(self):
        s = super().stats()
        s.counters.update(self.transfer_counters)
        return s

    def gauges(self) -> dict[str, float]:
        return {"queue_awaiting_kv": float(len(self.source))}

    def _shutdown(self) -> None:
        for rid, url in list(self.source.items()):
            self._link(url).send(AbortPrefill(rid=rid))
        super()._shutdown()
        self.receiver.shutdown()
        for link in self.links.values():
            link.close()


