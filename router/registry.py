"""The registration socket: workers started with `--router-url tcp://HOST:PORT` announce themselves here.

A worker sends Register(url, role) every second until this router's Hello reaches its control socket; the
router then links to that url exactly as to a url named on its command line (the role WorkerInfo reports
wins over the announced one). Only Register messages are decoded (msgspec, never pickle); anything else is
dropped with a log line. The socket binds to --host, loopback by default: whoever can reach it can make
the router connect to an address of their choice, so expose it only on the cluster's network.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import msgspec
import zmq
import zmq.asyncio

from mixquant_serve.protocol.messages import Register
from router.workers import ROLES, WorkerPool

log = logging.getLogger("router.registry")
_decoder = msgspec.msgpack.Decoder(Register)
URL_SCHEMES = ("tcp://", "ipc://")


class Registry:
    def __init__(self, pool: WorkerPool, host: str, port: int) -> None:
        self.pool = pool
        self.address = f"tcp://{host}:{port}"
        self.sock: zmq.asyncio.Socket | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        assert self.pool.ctx is not None, "start the pool first"
        self.sock = self.pool.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.address)
        self.address = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.task = asyncio.create_task(self._loop(), name="registry")
        log.info("workers may register at %s", self.address)

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.sock is not None:
            self.sock.close(0)

    async def _loop(self) -> None:
        assert self.sock is not None
        while True:
            frames = await self.sock.recv_multipart()
            if len(frames) != 2:
                log.warning("dropped a registration of %d frames", len(frames))
                continue
            try:
                self.register(_decoder.decode(frames[1]))
            except (msgspec.DecodeError, ValueError) as e:
                log.warning("dropped an invalid registration: %s", e)

    def register(self, msg: Register) -> None:
        if not msg.url.startswith(URL_SCHEMES):
            raise ValueError(f"url {msg.url!r} is not a tcp:// or ipc:// address")
        if msg.role not in ROLES:
            raise ValueError(f"unknown role {msg.role!r}")
        self.pool.add(msg.url, msg.role, static=False)
