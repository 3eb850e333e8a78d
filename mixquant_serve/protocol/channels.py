"""ZMQ sockets of the router <-> worker control channel.

A worker binds one ROUTER socket; each router connects one DEALER socket to it. Workers therefore need
not know their routers (static worker lists work), and several routers may share a worker.
"""

from __future__ import annotations

import msgspec
import zmq
import zmq.asyncio

from mixquant_serve.protocol.messages import FromWorker, ToWorker

_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)
_encoder = msgspec.msgpack.Encoder()


def encode(msg: ToWorker | FromWorker) -> bytes:
    return _encoder.encode(msg)


class WorkerSocket:
    """The worker's end: receives from any router, answers the router that asked or all of them."""

    def __init__(self, address: str) -> None:
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.sock.bind(address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.peers: set[bytes] = set()

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.sock.poll(timeout_ms, zmq.POLLIN))

    def recv_all(self) -> list[tuple[bytes, ToWorker]]:
        """Everything waiting now; undecodable frames are dropped with a log line, never unpickled."""
        out = []
        while True:
            try:
                peer, payload = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return out
            self.peers.add(peer)
            try:
                out.append((peer, _to_worker.decode(payload)))
            except msgspec.DecodeError as e:
                print(f"[worker] dropped an undecodable control message: {e}", flush=True)

    def send(self, peer: bytes, msg: FromWorker) -> None:
        self.sock.send_multipart([peer, _encoder.encode(msg)])

    def broadcast(self, msg: FromWorker) -> None:
        payload = _encoder.encode(msg)
        for peer in self.peers:
            self.sock.send_multipart([peer, payload])

    def close(self) -> None:
        self.sock.close(0)


class RouterSocket:
    """The router's end of one worker link (asyncio)."""

    def __init__(self, ctx: zmq.asyncio.Context, address: str) -> None:
        self.address = address
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    async def send(self, msg: ToWorker) -> None:
        await self.sock.send(_encoder.encode(msg))

    async def recv(self) -> FromWorker:
        return _from_worker.decode(await self.sock.recv())

    def close(self) -> None:
        self.sock.close(0)


class PeerLink:
    """A worker's synchronous link to another worker's control socket (decode -> prefill)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)
        self.last_heard: float | None = None

    def send(self, msg: ToWorker) -> None:
        self.sock.send(_encoder.encode(msg), zmq.NOBLOCK)

    def recv_all(self) -> list[FromWorker]:
        out = []
        while True:
            try:
                out.append(_from_worker.decode(self.sock.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return out
            except msgspec.DecodeError as e:
                print(f"[worker] dropped an undecodable message from {self.address}: {e}", flush=True)

    def close(self) -> None:
        self.sock.close(0)
