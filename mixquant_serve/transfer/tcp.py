"""KV transfer over ZMQ/TCP from (CPU) memory: for machines without GPUs, tests and the embedded demo.

Each message is [KVChunk header, K bytes, V bytes]: the pages of one layer of one request, gathered into
contiguous buffers on the sender and scattered into the allocated pages on the receiver.
"""

from __future__ import annotations

import logging
import time
import warnings

import msgspec
import torch
import zmq

from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.protocol.messages import TransferPeer
from mixquant_serve.transfer.base import (
    KVChunk,
    KVDone,
    KVFailed,
    KVReceiver,
    KVSender,
    PushSockets,
    Transfer,
    TransferState,
    stream_decoder,
    stream_encoder,
)

log = logging.getLogger("mixquant.transfer")


def _as_buffer(t: torch.Tensor):
    return t.detach().to("cpu").contiguous().view(torch.uint8).numpy()


class TcpSender(KVSender):
    def __init__(self, storage: KVStorage, worker_id: str, timeout_s: float) -> None:
        super().__init__(storage, worker_id, timeout_s)
        self.streams = PushSockets()

    def _connect(self, t: Transfer, peer: TransferPeer) -> None:
        self.streams.get(peer.address)
        t.state = TransferState.TRANSFERRING

    def _push(self, t: Transfer, frames: list) -> None:
        try:
            self.streams.get(t.peer).send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            t.end(TransferState.FAILED, f"decode peer {t.peer} is not taking data")

    def send(self, rid: str, layer: int, src_pages: list[int], dst_pages: list[int]) -> None:
        t = self.transfers.get(rid)
        if t is None or t.done or not src_pages:
            return
        idx = torch.tensor(src_pages, device=self.storage.k[layer].device)
        k, v = _as_buffer(self.storage.k[layer][idx]), _as_buffer(self.storage.v[layer][idx])
        header = KVChunk(rid=rid, layer=layer, dst_pages=dst_pages, nbytes=k.nbytes + v.nbytes)
        self._push(t, [stream_encoder.encode(header), k, v])
        t.nbytes += k.nbytes + v.nbytes

    def _close(self, t: Transfer, error: str | None) -> None:
        msg = KVFailed(rid=t.rid, error=error) if error else KVDone(rid=t.rid, total_bytes=t.nbytes)
        self._push(t, [stream_encoder.encode(msg)])

    def shutdown(self) -> None:
        self.streams.close()


class TcpReceiver(KVReceiver):
    name = "tcp"

    def __init__(self, storage: KVStorage, worker_id: str, host: str, timeout_s: float) -> None:
        super().__init__(storage, worker_id, host, timeout_s)
        self._sock = zmq.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.bind(f"tcp://{host}:*")
        self._address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        layout = storage.layout
        self.page_shape = (layout.page_size, layout.num_kv_heads, layout.head_dim)

    @property
    def address(self) -> str:
        return self._address

    @property
    def socket(self) -> zmq.Socket:
        return self._sock

    def _drain(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = stream_decoder.decode(frames[0].buffer)
            except msgspec.DecodeError as e:
                log.warning("dropped an undecodable KV stream message: %s", e)
                continue
            t = self.expected.get(msg.rid)
            if t is None or t.done:
                continue  # late data of a request that was aborted or already failed
            if isinstance(msg, KVChunk):
                self._apply(t, msg, frames[1:])
            elif isinstance(msg, KVDone):
                if msg.total_bytes == t.nbytes:
                    t.end(TransferState.SUCCESS)
                else:
                    t.end(TransferState.FAILED, f"incomplete KV: {t.nbytes} of {msg.total_bytes} bytes arrived")
            elif isinstance(msg, KVFailed):
                t.end(TransferState.FAILED, f"prefill worker {t.peer} failed: {msg.error}")

    def _apply(self, t: Transfer, chunk: KVChunk, payload: list) -> None:
        why = self.check_chunk(t, chunk)
        if why is None and (len(payload) != 2 or any(len(f.buffer) * 2 != chunk.nbytes for f in payload)):
            why = "payload size does not match its header (one K and one V frame of half the bytes each)"
        if why is not None:
            t.end(TransferState.FAILED, f"refused a KV chunk from {t.peer}: {why}")
            return
        dst = torch.tensor(chunk.dst_pages, device=self.storage.k[chunk.layer].device)
        for cache, frame in zip((self.storage.k[chunk.layer], self.storage.v[chunk.layer]), payload, strict=True):
            with warnings.catch_warnings():  # the frame is read-only; it is copied into the cache at once
                warnings.simplefilter("ignore", UserWarning)
                raw = torch.frombuffer(frame.buffer, dtype=torch.uint8)
            cache[dst] = raw.view(cache.dtype).view(len(chunk.dst_pages), *self.page_shape).to(cache.device)
        t.nbytes += chunk.nbytes
        t.deadline = time.monotonic() + self.timeout_s  # progress

    def shutdown(self) -> None:
        self._sock.close(0)
