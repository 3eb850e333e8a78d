"""KV transfer GPU to GPU through NCCL; the control messages ride the tcp backend's ZMQ PUSH -> PULL stream.

Every stream message is two frames, [message, link id]. A link is a two-rank NCCL communicator between one
prefill worker (rank 0) and one decode worker (rank 1), made on first contact and reused:

    prefill (NcclSender)                         decode (NcclReceiver)
    NcclHello(link, unique_id)      ------>      ncclCommInitRank in a thread (both sides BOOTSTRAPPING;
                                                 sends and receives wait in the link's queue meanwhile)
    KVChunk(rid, layer, dst_pages)  ------>      ncclRecv into a staging buffer, in header order
    gather -> staging, ncclSend                  once received: scatter into dst_pages (if accepted)
    KVDone(total) | KVFailed        ------>      SUCCESS when every receive and scatter of rid completed

Each link has its own CUDA stream, so a dead peer stalls only its link. Nothing on the worker's loop thread
waits for a peer: completions are CUDA events polled with query(); an operation that has not completed
within the timeout aborts the communicator (ncclCommAbort, in a thread) and the next transfer to that
peer bootstraps a new one. A chunk the receiver refuses is still received, so the stream stays matched,
but never written. Scatters start only after their receive completed, so a failed transfer's pages can be
reused at once: nothing still in flight will write them.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import msgspec
import torch
import zmq

from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.protocol.messages import TransferPeer
from mixquant_serve.transfer import nccl_lib
from mixquant_serve.transfer.base import (
    KVChunk,
    KVDone,
    KVFailed,
    KVReceiver,
    KVSender,
    PushSockets,
    Transfer,
    TransferState,
    stream_encoder,
)

log = logging.getLogger("mixquant.transfer")


class NcclHello(msgspec.Struct, tag=True, kw_only=True):
    """First message of a link: the receiver joins the communicator as rank 1."""

    link: str
    unique_id: bytes  # ncclUniqueId of the two-rank communicator; the sender is rank 0
    sender: str  # the prefill worker's id: a new hello from it replaces its older links


NcclStreamMsg = KVChunk | KVDone | KVFailed | NcclHello
_decoder = msgspec.msgpack.Decoder(NcclStreamMsg)


def encode_frames(msg: NcclStreamMsg, link: str) -> list[bytes]:
    return [stream_encoder.encode(msg), link.encode()]


def decode_frames(frames: list) -> tuple[NcclStreamMsg, str] | None:
    """The message and the id of the link it belongs to; None (logged) for anything malformed."""
    if len(frames) != 2:
        log.warning("dropped a KV stream message of %d frames (the nccl backend sends 2)", len(frames))
        return None
    try:
        return _decoder.decode(bytes(frames[0])), bytes(frames[1]).decode()
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        log.warning("dropped an undecodable KV stream message: %s", e)
        return None


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """`device` as the current device; free when it already is (the worker's case: one device per process)."""
    return contextlib.nullcontext() if torch.cuda.current_device() == device.index else torch.cuda.device(device)


def cuda_device(storage: KVStorage) -> torch.device:
    device = storage.k[0].device if storage.k else torch.device("cpu")
    if device.type != "cuda":
        raise ValueError(f"the nccl transfer backend moves KV between GPUs, but this KV storage is on "
                         f"{device}; use the tcp backend for KV in CPU memory")
    return device


@dataclass
class _Op:
    """One NCCL send/receive or scatter in flight; `keep` holds its tensors until `event` has passed."""

    rid: str
    event: torch.cuda.Event
    nbytes: int
    keep: tuple
    chunk: KVChunk | None = None
    accepted: bool = False
    posted: float = field(default_factory=time.monotonic)


class _Link:
    """A two-rank communicator with one peer, its CUDA stream, its queued and in-flight operations."""

    def __init__(self, link_id: str, peer: str, device: torch.device, rank: int, unique_id: bytes) -> None:
        self.id, self.peer, self.device, self.rank = link_id, peer, device, rank
        self.lib = nccl_lib.load()
        self.stream = torch.cuda.Stream(device)
        self.comm: int | None = None
        self.ready = self.dead = False
        self.error: str | None = None
        self.started = time.monotonic()
        self.queued: list = []  # work for the communicator, in stream order
        self.inflight: deque[_Op] = deque()
        self._lock = threading.Lock()
        self.thread = threading.Thread(target=self._bootstrap, args=(unique_id,), daemon=True,
                                       name=f"nccl-init-{link_id[:8]}")
        self.thread.start()

    def _bootstrap(self, unique_id: bytes) -> None:
        try:
            torch.cuda.set_device(self.device)
            comm = self.lib.comm_init_rank(2, unique_id, self.rank)
        except Exception as e:  # noqa: BLE001 - reported through the link's error
            self.error = f"ncclCommInitRank: {e}"
            return
        with self._lock:
            if not self.dead:
                self.comm = comm
        if self.comm is None:
            _abort(self.lib, comm, [], self.stream)
            return
        try:  # connects the point-to-point channels now, so no later ncclSend/ncclRecv waits for the peer
            buf = torch.empty(1, dtype=torch.uint8, device=self.device)
            self.post(buf.data_ptr(), 1)
            self.stream.synchronize()
        except Exception as e:  # noqa: BLE001
            self.error = f"first exchange on the new communicator: {e}"
            return
        self.ready = True

    @property
    def usable(self) -> bool:
        return self.ready and not self.dead

    def post(self, ptr: int, nbytes: int) -> None:
        """ncclSend (rank 0) or ncclRecv (rank 1) on this link's stream; never races an abort."""
        with self._lock:
            if self.comm is None:
                raise nccl_lib.NcclError("ncclSend/ncclRecv", 5, "the communicator was aborted")
            op = self.lib.send if self.rank == 0 else self.lib.recv
            op(ptr, nbytes, 1 - self.rank, self.comm, self.stream.cuda_stream)

    def stalled(self, now: float, timeout_s: float) -> bool:
        try:
            return now - self.inflight[0].posted > timeout_s
        except IndexError:
            return False

    def completed(self) -> list[_Op]:
        """Operations finished since the last call (one stream: they finish in order)."""
        done = []
        while self.inflight and self.inflight[0].event.query():
            done.append(self.inflight.popleft())
        return done

    def fault(self, now: float, timeout_s: float) -> str | None:
        """Why this link must be given up, or None."""
        if self.error or self.dead:
            return self.error or "aborted"
        if not self.ready:
            late = now - self.started > timeout_s
            return f"no NCCL communicator within {timeout_s:.0f} s" if late else None
        if self.stalled(now, timeout_s):
            return stall_message(timeout_s)
        if not self.inflight:
            return None
        with self._lock:
            err = self.lib.async_error(self.comm) if self.comm is not None else None
        return str(err) if err else None

    def abort(self, reason: str) -> threading.Thread | None:
        """Give the communicator up: ncclCommAbort runs in a thread that keeps the in-flight tensors alive."""
        with self._lock:
            if self.dead:
                return None
            self.dead, self.error = True, self.error or reason
            comm, self.comm = self.comm, None
        ops, self.inflight, self.queued = list(self.inflight), deque(), []
        if comm is None:
            return None
        t = threading.Thread(target=_abort, args=(self.lib, comm, ops, self.stream), daemon=True,
                             name=f"nccl-abort-{self.id[:8]}")
        t.start()
        return t


def stall_message(timeout_s: float) -> str:
    return f"an NCCL operation has not completed within {timeout_s:.0f} s"


class _Watchdog:
    """Aborts links whose oldest operation is older than the timeout. It is a thread of its own so that it
    also fires while the worker's loop thread is blocked, e.g. in a device synchronization that waits behind
    the stuck NCCL kernel; the loop does the bookkeeping (failing the link's transfers) when it comes back."""

    def __init__(self, links: dict[str, _Link], timeout_s: float) -> None:
        self.links, self.timeout_s = links, timeout_s
        self.stop = threading.Event()
        threading.Thread(target=self._run, daemon=True, name="nccl-watchdog").start()

    def _run(self) -> None:
        while not self.stop.wait(min(1.0, self.timeout_s / 4)):
            now = time.monotonic()
            for link in list(self.links.values()):
                if link.usable and link.stalled(now, self.timeout_s):
                    link.abort(stall_message(self.timeout_s))


def _abort(lib: nccl_lib.Nccl, comm: int, ops: list[_Op], stream: torch.cuda.Stream) -> None:
    try:
        lib.comm_abort(comm)
        stream.synchronize()  # aborted kernels return; only then may the staging buffers be reused
    except Exception as e:  # noqa: BLE001
        log.warning("aborting an NCCL communicator: %s", e)
    ops.clear()


class _Pages:
    """K and V pages of one layer, moved through one staging buffer of shape [2, pages, *page_shape]."""

    def __init__(self, storage: KVStorage) -> None:
        self.storage = storage
        self.page_shape = tuple(storage.k[0].shape[1:])
        self.dtype = storage.k[0].dtype
        self.device = storage.k[0].device
        self._last: tuple[tuple[int, ...], torch.Tensor, torch.Tensor] | None = None

    def index(self, pages: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Page indices on the GPU (copied on the current stream) and the pinned host copy to keep alive.

        A request sends the same pages for every layer, so the last index is reused (one stream uses it)."""
        key = tuple(pages)
        if self._last is None or self._last[0] != key:
            host = torch.tensor(pages, dtype=torch.int64).pin_memory()
            self._last = key, host.to(self.device, non_blocking=True), host
        return self._last[1], self._last[2]

    def gather(self, layer: int, pages: list[int]) -> tuple[torch.Tensor, tuple]:
        idx, host = self.index(pages)
        stage = torch.empty((2, len(pages), *self.page_shape), dtype=self.dtype, device=self.device)
        torch.index_select(self.storage.k[layer], 0, idx, out=stage[0])
        torch.index_select(self.storage.v[layer], 0, idx, out=stage[1])
        return stage, (idx, host)

    def scatter(self, layer: int, pages: list[int], raw: torch.Tensor) -> tuple:
        idx, host = self.index(pages)
        stage = raw.view(self.dtype).view(2, len(pages), *self.page_shape)
        self.storage.k[layer].index_copy_(0, idx, stage[0])
        self.storage.v[layer].index_copy_(0, idx, stage[1])
        return idx, host


class NcclSender(KVSender):
    needs_polling = True
    """Prefill side (rank 0 of each link)."""

    def __init__(self, storage: KVStorage, worker_id: str, timeout_s: float) -> None:
        super().__init__(storage, worker_id, timeout_s)
        self.device = cuda_device(storage)
        self.lib = nccl_lib.load()
        self.pages = _Pages(storage)
        self.page_bytes = KVStorage.bytes_per_page(storage.layout) // storage.layout.num_layers
        self.gather_stream = torch.cuda.Stream(self.device)
        self.streams = PushSockets()
        self.links: dict[str, _Link] = {}  # by the peer's address
        self.link_of: dict[str, _Link] = {}  # by rid
        self.watchdog = _Watchdog(self.links, timeout_s)

    @property
    def in_flight(self) -> int:
        """NCCL sends queued or not yet completed, over all links."""
        return sum(len(link.queued) + len(link.inflight) for link in self.links.values())

    def _push(self, link: _Link, msg: NcclStreamMsg) -> bool:
        try:
            self.streams.get(link.peer).send_multipart(encode_frames(msg, link.id), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def _connect(self, t: Transfer, peer: TransferPeer) -> None:
        link = self.links.get(peer.address)
        if link is not None and link.error and not link.dead:
            self._break(link, link.error)
        if link is None or link.dead:
            link = self._bootstrap(peer.address)
        self.link_of[t.rid] = link
        if link.dead:
            t.end(TransferState.FAILED, f"NCCL link to decode peer {peer.address} failed: {link.error}")
        else:
            t.state = TransferState.TRANSFERRING if link.usable else TransferState.BOOTSTRAPPING

    def _bootstrap(self, address: str) -> _Link:
        uid = self.lib.unique_id()
        link = _Link(uuid.uuid4().hex, address, self.device, 0, uid)
        self.links[address] = link
        if not self._push(link, NcclHello(link=link.id, unique_id=uid, sender=self.worker_id)):
            self._break(link, f"decode peer {address} is not taking data")
        return link

    def send(self, rid: str, layer: int, src_pages: list[int], dst_pages: list[int]) -> None:
        t = self.transfers.get(rid)
        if t is None or t.done or not src_pages:
            return
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"{len(src_pages)} source pages for {len(dst_pages)} destination pages")
        written = torch.cuda.Event()  # the layer's KV is complete once the compute stream gets here
        written.record(torch.cuda.current_stream(self.device))
        self._submit(self.link_of[rid], ("chunk", t, layer, list(src_pages), list(dst_pages), written))

    def _close(self, t: Transfer, error: str | None) -> None:
        self._submit(self.link_of[t.rid], ("close", t, error))

    def _submit(self, link: _Link, item: tuple) -> None:
        if not link.dead:
            link.queued.append(item)
            self._flush(link)

    def _flush(self, link: _Link) -> None:
        while link.queued and link.usable:
            kind, t, *args = link.queued.pop(0)
            try:
                if kind == "chunk":
                    self._emit_chunk(link, t, *args)
                else:
                    self._emit_close(link, t, *args)
            except (nccl_lib.NcclError, RuntimeError) as e:
                self._break(link, f"sending KV of {t.rid}: {e}")

    def _emit_chunk(self, link: _Link, t: Transfer, layer: int, src: list[int], dst: list[int],
                    written: torch.cuda.Event) -> None:
        if t.done:
            return
        nbytes = len(src) * self.page_bytes
        if not self._push(link, KVChunk(rid=t.rid, layer=layer, dst_pages=dst, nbytes=nbytes)):
            t.end(TransferState.FAILED, f"decode peer {link.peer} is not taking data")
            return
        with _on(self.device):
            self.gather_stream.wait_event(written)
            with torch.cuda.stream(self.gather_stream):
                stage, keep = self.pages.gather(layer, src)
                gathered = torch.cuda.Event()
                gathered.record(self.gather_stream)
            link.stream.wait_event(gathered)
            link.post(stage.data_ptr(), nbytes)
            sent = torch.cuda.Event()
            sent.record(link.stream)
        link.inflight.append(_Op(t.rid, sent, nbytes, (stage, *keep)))
        t.nbytes += nbytes

    def _emit_close(self, link: _Link, t: Transfer, error: str | None) -> None:
        error = error or (t.error if t.state is TransferState.FAILED else None)
        msg = KVFailed(rid=t.rid, error=error) if error else KVDone(rid=t.rid, total_bytes=t.nbytes)
        if not self._push(link, msg) and not t.done:
            t.end(TransferState.FAILED, f"decode peer {link.peer} is not taking data")

    def _break(self, link: _Link, reason: str) -> None:
        log.warning("NCCL link %s to decode peer %s given up: %s", link.id[:8], link.peer, reason)
        link.abort(reason)
        if self.links.get(link.peer) is link:
            del self.links[link.peer]
        for rid, bound in self.link_of.items():
            t = self.transfers.get(rid)
            if bound is link and t is not None and not t.done:
                t.end(TransferState.FAILED, f"NCCL link to decode peer {link.peer} failed: {reason}")

    def poll(self) -> list[Transfer]:
        now = time.monotonic()
        for link in list(self.links.values()):
            self._service(link, now)
        ended = super().poll()
        self.link_of = {rid: link for rid, link in self.link_of.items() if rid in self.transfers}
        return ended

    def _service(self, link: _Link, now: float) -> None:
        why = link.fault(now, self.timeout_s)
        if why:
            self._break(link, why)
            return
        if not link.usable:
            return
        for rid, bound in self.link_of.items():
            t = self.transfers.get(rid)
            if bound is link and t is not None and t.state is TransferState.BOOTSTRAPPING:
                t.state = TransferState.TRANSFERRING
        self._flush(link)
        link.completed()  # releases the staging buffers of finished sends

    def shutdown(self) -> None:
        self.watchdog.stop.set()
        threads = [link.abort("sender shut down") for link in self.links.values()]
        for t in threads:
            if t is not None:
                t.join(timeout=10)
        self.streams.close()


@dataclass
class _Inbound:
    """What the receiver still waits for on one request."""

    link: _Link
    recvs: int = 0  # accepted chunks whose receive has not completed
    scatters: int = 0  # scatters enqueued and not completed
    total: int | None = None  # from KVDone


class NcclReceiver(KVReceiver):
    needs_polling = True
    """Decode side (rank 1 of each link)."""

    name = "nccl"

    def __init__(self, storage: KVStorage, worker_id: str, host: str, timeout_s: float) -> None:
        super().__init__(storage, worker_id, host, timeout_s)
        self.device = cuda_device(storage)
        nccl_lib.load()
        self.pages = _Pages(storage)
        self.scatter_stream = torch.cuda.Stream(self.device)
        self._sock = zmq.Context.instance().socket(zmq.PULL)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, 100_000)
        self._sock.bind(f"tcp://{host}:*")
        self._address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.links: dict[str, _Link] = {}  # by link id
        self.inbound: dict[str, _Inbound] = {}  # by rid
        self.watchdog = _Watchdog(self.links, timeout_s)
        self.scatters: deque[_Op] = deque()
        self.max_chunk = self.page_bytes * storage.num_pages

    @property
    def address(self) -> str:
        return self._address

    @property
    def socket(self) -> zmq.Socket:
        return self._sock

    @property
    def in_flight(self) -> int:
        """Receives and scatters queued or not yet completed: poll() often while this is non-zero."""
        return len(self.scatters) + sum(len(lk.queued) + len(lk.inflight) for lk in self.links.values())

    def peer_info(self, kv_layout: dict[str, int | str]) -> TransferPeer:
        return TransferPeer(worker_id=self.worker_id, backend=self.name, address=self.address,
                            kv_layout=kv_layout, nccl_device=self.device.index)

    def cancel(self, rid: str) -> None:
        self._quiesce(rid)
        super().cancel(rid)

    def _drain(self) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            decoded = decode_frames(frames)
            if decoded is not None:
                self._dispatch(*decoded)
        now = time.monotonic()
        for link in list(self.links.values()):
            self._service(link, now)
        self._finish_scatters()
        self._settle(now)

    def _dispatch(self, msg: NcclStreamMsg, link_id: str) -> None:
        if isinstance(msg, NcclHello):
            self._hello(msg)
            return
        link = self.links.get(link_id)
        t = self.expected.get(msg.rid)
        if isinstance(msg, KVChunk):
            self._chunk(link, t, msg)
        elif t is None or t.done:
            return
        elif isinstance(msg, KVFailed):
            self._fail(t, f"prefill worker {t.peer} failed: {msg.error}")
        elif link is None:
            self._fail(t, "the end of a KV transfer arrived on an unknown or broken NCCL link")
        else:
            self._inbound(msg.rid, link).total = msg.total_bytes

    def _hello(self, msg: NcclHello) -> None:
        if len(msg.unique_id) != nccl_lib.UNIQUE_ID_BYTES:
            log.warning("bad NCCL hello from %s: %d-byte id", msg.sender, len(msg.unique_id))
            return
        for old in [lk for lk in self.links.values() if lk.peer == msg.sender]:
            self._break(old, "the prefill worker opened a new communicator")
        self.links[msg.link] = _Link(msg.link, msg.sender, self.device, 1, msg.unique_id)

    def _chunk(self, link: _Link | None, t: Transfer | None, chunk: KVChunk) -> None:
        live = t is not None and not t.done
        if link is None or link.dead:
            if live:
                self._fail(t, "a KV chunk arrived on an unknown or broken NCCL link")
            return
        if not 0 <= chunk.nbytes <= self.max_chunk:  # cannot be received: the stream would be out of step
            self._break(link, f"a KV chunk header announces {chunk.nbytes} bytes")
            return
        why = self.check_chunk(t, chunk) if live else None
        if why is not None:
            self._fail(t, f"refused a KV chunk from {t.peer}: {why}")
        accepted = live and why is None
        if accepted:
            self._inbound(chunk.rid, link).recvs += 1
        link.queued.append((chunk, accepted))
        self._flush(link)

    def _inbound(self, rid: str, link: _Link) -> _Inbound:
        if rid not in self.inbound:
            self.inbound[rid] = _Inbound(link)
        return self.inbound[rid]

    def _flush(self, link: _Link) -> None:
        """Post the receives of queued chunk headers, in stream order (refused ones land in scratch)."""
        while link.queued and link.usable:
            chunk, accepted = link.queued.pop(0)
            try:
                with _on(self.device), torch.cuda.stream(link.stream):
                    raw = torch.empty(chunk.nbytes, dtype=torch.uint8, device=self.device)
                    link.post(raw.data_ptr(), chunk.nbytes)
                    received = torch.cuda.Event()
                    received.record(link.stream)
            except (nccl_lib.NcclError, RuntimeError) as e:
                self._break(link, f"receiving KV of {chunk.rid}: {e}")
                return
            link.inflight.append(_Op(chunk.rid, received, chunk.nbytes, (raw,), chunk, accepted))

    def _service(self, link: _Link, now: float) -> None:
        why = link.fault(now, self.timeout_s)
        if why:
            self._break(link, why)
            return
        if link.usable:
            self._flush(link)
            for op in link.completed():
                self._received(op)

    def _received(self, op: _Op) -> None:
        """A receive completed: scatter it into its pages if its request still wants it."""
        inb, t = self.inbound.get(op.rid), self.expected.get(op.rid)
        if not op.accepted or inb is None:
            return
        inb.recvs -= 1
        if t is None or t.done:
            return
        with _on(self.device), torch.cuda.stream(self.scatter_stream):
            self.scatter_stream.wait_event(op.event)
            keep = self.pages.scatter(op.chunk.layer, op.chunk.dst_pages, op.keep[0])
            scattered = torch.cuda.Event()
            scattered.record(self.scatter_stream)
        inb.scatters += 1
        self.scatters.append(_Op(op.rid, scattered, op.nbytes, (op.keep[0], *keep)))

    def _finish_scatters(self) -> None:
        while self.scatters and self.scatters[0].event.query():
            op = self.scatters.popleft()
            inb, t = self.inbound.get(op.rid), self.expected.get(op.rid)
            if inb is not None:
                inb.scatters -= 1
            if t is not None and not t.done:
                t.nbytes += op.nbytes

    def _settle(self, now: float) -> None:
        """End the transfers whose KVDone came and whose every receive and scatter completed."""
        for rid, inb in list(self.inbound.items()):
            t = self.expected.get(rid)
            if t is None or t.done:
                del self.inbound[rid]
            elif inb.total is not None and inb.recvs == 0 and inb.scatters == 0:
                del self.inbound[rid]
                if t.nbytes == inb.total:
                    t.end(TransferState.SUCCESS)
                else:
                    t.end(TransferState.FAILED, f"incomplete KV: {t.nbytes} of {inb.total} bytes arrived")
            elif now > t.deadline:
                self._quiesce(rid)  # the base class is about to fail it: no scatter may still be running

    def _quiesce(self, rid: str) -> None:
        """Wait for rid's enqueued scatters (they never wait on a peer, so this is short)."""
        for op in self.scatters:
            if op.rid == rid:
                op.event.synchronize()

    def _fail(self, t: Transfer, reason: str) -> None:
        self._quiesce(t.rid)
        t.end(TransferState.FAILED, reason)

    def _break(self, link: _Link, reason: str) -> None:
        log.warning("NCCL link %s from prefill worker %s given up: %s", link.id[:8], link.peer, reason)
        link.abort(reason)
        self.links.pop(link.id, None)
        for rid, inb in list(self.inbound.items()):
            t = self.expected.get(rid)
            if inb.link is link and t is not None and not t.done:
                self._fail(t, f"NCCL link to prefill worker {link.peer} failed: {reason}")

    def shutdown(self) -> None:
        self.watchdog.stop.set()
        threads = [link.abort("receiver shut down") for link in self.links.values()]
        for t in threads:
            if t is not None:
                t.join(timeout=10)
        self._sock.close(0)
