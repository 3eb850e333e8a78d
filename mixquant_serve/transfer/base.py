"""The KV transfer interface: a prefill worker pushes pages of its KV storage into a decode worker's pages.

Per transfer (one request), both ends keep a poll state:
    BOOTSTRAPPING  the channel to the peer is being set up (e.g. an NCCL communicator on first contact)
    TRANSFERRING   pages are moving, layer by layer as prefill computes them
    SUCCESS        every byte arrived (receiver) / the receiver acknowledged it (sender)
    FAILED         an error or a timeout; the caller frees the request's pages and fails the request

Timeouts measure silence, not total time: the sender waits at most `timeout_s` for the receiver's
acknowledgement once it has sent the end marker (computing may take longer under load); the receiver
fails a transfer after `timeout_s` without a chunk arriving or a heartbeat from the prefill worker
(the decode worker reports those through `touch`).

Protocol on the transfer stream (prefill -> decode, ordered): KVChunk (one layer's pages for one request;
the bytes follow as frames, or over NCCL), then KVDone (total bytes) or KVFailed. The decode worker
acknowledges with KVAck on the prefill worker's control socket. Page indices are checked on the
receiving side against the pages it allocated for that request; nothing is unpickled.
"""

from __future__ import annotations

import importlib
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import msgspec
import zmq

from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.protocol.messages import TransferPeer


class TransferState(Enum):
    BOOTSTRAPPING = "bootstrapping"
    TRANSFERRING = "transferring"
    SUCCESS = "success"
    FAILED = "failed"


class KVChunk(msgspec.Struct, tag=True, kw_only=True):
    rid: str
    layer: int
    dst_pages: list[int]
    nbytes: int  # K and V together


class KVDone(msgspec.Struct, tag=True, kw_only=True):
    rid: str
    total_bytes: int


class KVFailed(msgspec.Struct, tag=True, kw_only=True):
    rid: str
    error: str


StreamMsg = KVChunk | KVDone | KVFailed
stream_encoder = msgspec.msgpack.Encoder()
stream_decoder = msgspec.msgpack.Decoder(StreamMsg)


@dataclass
class Transfer:
    """One request's transfer as either end sees it."""

    rid: str
    peer: str
    deadline: float
    state: TransferState = TransferState.TRANSFERRING
    nbytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    error: str | None = None
    pages: frozenset[int] = frozenset()  # receiver: the pages this request may write

    @property
    def done(self) -> bool:
        return self.state in (TransferState.SUCCESS, TransferState.FAILED)

    def end(self, state: TransferState, error: str | None = None) -> Transfer:
        self.state, self.error, self.finished = state, error, time.monotonic()
        return self

    @property
    def seconds(self) -> float:
        return (self.finished or time.monotonic()) - self.started


class PushSockets:
    """A sender's PUSH sockets to the decode workers' KV stream endpoints: one per address, made on first use,
    never blocking on close and queueing deep enough for every layer of many requests."""

    def __init__(self) -> None:
        self.ctx = zmq.Context.instance()
        self.sockets: dict[str, zmq.Socket] = {}

    def get(self, address: str) -> zmq.Socket:
        if address not in self.sockets:
            s = self.ctx.socket(zmq.PUSH)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDHWM, 100_000)
            s.connect(address)
            self.sockets[address] = s
        return self.sockets[address]

    def close(self) -> None:
        for s in self.sockets.values():
            s.close(0)


class KVSender(ABC):
    """Prefill side. Calls come from the worker loop: open, send (per layer), close, then poll."""

    def __init__(self, storage: KVStorage, worker_id: str, timeout_s: float) -> None:
        self.storage = storage
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.transfers: dict[str, Transfer] = {}

    # transfers whose completion only shows as a device event need frequent polls (no socket wakes us)
    needs_polling = False

    def open(self, rid: str, peer: TransferPeer) -> Transfer:
        t = Transfer(rid, peer.address, float("inf"))  # no deadline while this worker computes
        self.transfers[rid] = t
        self._connect(t, peer)
        return t

    @abstractmethod
    def _connect(self, t: Transfer, peer: TransferPeer) -> None:
        """Make sure a channel to the peer exists (BOOTSTRAPPING until it does)."""

    @abstractmethod
    def send(self, rid: str, layer: int, src_pages: list[int], dst_pages: list[int]) -> None:
        """Queue one layer's pages; returns before they are delivered."""

    def close(self, rid: str, error: str | None = None) -> None:
        """No more pages for rid: tell the receiver it is complete (or failed); the ack is due in timeout_s."""
        t = self.transfers.get(rid)
        if t is not None and not t.done:
            t.deadline = time.monotonic() + self.timeout_s
            self._close(t, error)

    @abstractmethod
    def _close(self, t: Transfer, error: str | None) -> None:
        """Send the end marker (KVDone, or KVFailed with the error) after everything queued for t."""

    def acknowledge(self, rid: str, ok: bool, error: str | None) -> Transfer | None:
        """The receiver's KVAck arrived (through the worker's control socket)."""
        t = self.transfers.pop(rid, None)
        if t is not None and not t.done:
            t.end(TransferState.SUCCESS if ok else TransferState.FAILED, error)
        return t

    def poll(self) -> list[Transfer]:
        """Transfers that ended since the last poll (timeouts included); removed from the table."""
        now, ended = time.monotonic(), []
        for rid, t in list(self.transfers.items()):
            if not t.done and now > t.deadline:
                t.end(TransferState.FAILED, f"no acknowledgement from decode peer {t.peer} within "
                                            f"{self.timeout_s:.0f} s")
            if t.done:
                ended.append(self.transfers.pop(rid))
        return ended

    def cancel(self, rid: str) -> None:
        if rid in self.transfers:
            self.close(rid, error="cancelled by the prefill worker")
            self.transfers.pop(rid, None)

    def shutdown(self) -> None:
        """Release sockets/communicators."""


class KVReceiver(ABC):
    """Decode side: accepts pages for the requests it expects and writes them into its KV storage."""

    def __init__(self, storage: KVStorage, worker_id: str, host: str, timeout_s: float) -> None:
        self.storage = storage
        self.worker_id = worker_id
        self.timeout_s = timeout_s
        self.expected: dict[str, Transfer] = {}
        layout = storage.layout
        self.page_bytes = KVStorage.bytes_per_page(layout) // layout.num_layers  # K+V of one page, one layer

    @property
    @abstractmethod
    def address(self) -> str:
        """Where senders connect."""

    @property
    @abstractmethod
    def socket(self) -> Any:
        """A ZMQ socket the worker loop can poll for readiness."""

    def peer_info(self, kv_layout: dict[str, int | str]) -> TransferPeer:
        return TransferPeer(worker_id=self.worker_id, backend=self.name, address=self.address, kv_layout=kv_layout)

    name = "base"
    needs_polling = False

    def expect(self, rid: str, pages: list[int], source: str) -> None:
        self.expected[rid] = Transfer(rid, source, time.monotonic() + self.timeout_s, pages=frozenset(pages))

    def touch(self, source: str) -> None:
        """The prefill worker `source` is alive: its transfers get another timeout_s."""
        deadline = time.monotonic() + self.timeout_s
        for t in self.expected.values():
            if t.peer == source and not t.done:
                t.deadline = max(t.deadline, deadline)

    def fail_from(self, source: str, error: str) -> None:
        for t in self.expected.values():
            if t.peer == source and not t.done:
                t.end(TransferState.FAILED, error)

    def cancel(self, rid: str) -> None:
        self.expected.pop(rid, None)

    @abstractmethod
    def _drain(self) -> None:
        """Read everything that arrived and apply it (ending transfers that completed or broke)."""

    def poll(self) -> list[Transfer]:
        """Apply what arrived; transfers that ended (success, failure, timeout), removed from the table."""
        self._drain()
        now, ended = time.monotonic(), []
        for rid, t in list(self.expected.items()):
            if not t.done and now > t.deadline:
                t.end(TransferState.FAILED, f"KV transfer from {t.peer} timed out: nothing heard for "
                                            f"{self.timeout_s:.0f} s")
            if t.done:
                ended.append(self.expected.pop(rid))
        return ended

    def check_chunk(self, t: Transfer, chunk: KVChunk) -> str | None:
        """Why a chunk must be refused, or None."""
        if not 0 <= chunk.layer < self.storage.layout.num_layers:
            return f"layer {chunk.layer} out of range"
        if not set(chunk.dst_pages) <= t.pages:
            return "page indices outside the pages allocated for this request"
        if chunk.nbytes != len(chunk.dst_pages) * self.page_bytes:
            return f"chunk of {chunk.nbytes} bytes for {len(chunk.dst_pages)} pages"
        return None

    def shutdown(self) -> None:
        """Release sockets/communicators."""


_BACKENDS = {
    "tcp": ("mixquant_serve.transfer.tcp", "TcpSender", "TcpReceiver"),
    "nccl": ("mixquant_serve.transfer.nccl", "NcclSender", "NcclReceiver"),
}


def create_sender(backend: str, storage: KVStorage, worker_id: str, timeout_s: float) -> KVSender:
    module, sender, _ = _entry(backend)
    return getattr(importlib.import_module(module), sender)(storage, worker_id, timeout_s)


def create_receiver(backend: str, storage: KVStorage, worker_id: str, host: str, timeout_s: float) -> KVReceiver:
    module, _, receiver = _entry(backend)
    return getattr(importlib.import_module(module), receiver)(storage, worker_id, host, timeout_s)


def _entry(backend: str) -> tuple[str, str, str]:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown transfer backend {backend!r}; known: {sorted(_BACKENDS)}")
    return _BACKENDS[backend]
