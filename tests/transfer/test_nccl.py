"""The nccl transfer backend.

CPU tests: the stream messages and the library lookup. GPU tests (2 GPUs): a sender process on GPU 0 and a
receiver process on GPU 1, driven line by line over stdin/stdout by the test (this file is also their
program: `python test_nccl.py send|recv DEVICE TIMEOUT`), move the KV of a Qwen3-8B-shaped model.
"""

from __future__ import annotations

import faulthandler
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from mixquant_serve.config import KVLayout
from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.protocol.messages import TransferPeer
from mixquant_serve.transfer import nccl_lib
from mixquant_serve.transfer.base import (
    KVChunk,
    KVDone,
    KVFailed,
    TransferState,
    create_receiver,
    stream_encoder,
)
from mixquant_serve.transfer.nccl import NcclHello, NcclReceiver, NcclSender, decode_frames, encode_frames

ROOT = Path(__file__).resolve().parents[2]
QWEN3_8B = KVLayout(num_layers=36, num_kv_heads=8, head_dim=128, page_size=16, dtype="bfloat16")


# ---------------------------------------------------------------- CPU tests


def test_stream_messages_round_trip_with_their_link():
    msgs = [NcclHello(link="l1", unique_id=bytes(range(128)), sender="prefill-0"),
            KVChunk(rid="r", layer=3, dst_pages=[5, 2, 9], nbytes=3 * 65536),
            KVDone(rid="r", total_bytes=123), KVFailed(rid="r", error="boom")]
    for msg in msgs:
        assert decode_frames(encode_frames(msg, "l1")) == (msg, "l1")


def test_base_stream_encoding_still_decodes():
    chunk = KVChunk(rid="r", layer=0, dst_pages=[1], nbytes=8)
    assert decode_frames([stream_encoder.encode(chunk), b"abc"]) == (chunk, "abc")


_DONE = stream_encoder.encode(KVDone(rid="r", total_bytes=1))


@pytest.mark.parametrize("frames", [[b"x"], [b"\xc1garbage", b"l"], [_DONE], [_DONE, b"l", b"extra"],
                                    [stream_encoder.encode({"type": "Pickle", "x": 1}), b"l"]])
def test_malformed_stream_messages_are_dropped(frames):
    assert decode_frames(frames) is None


def test_library_not_found_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.delenv(nccl_lib.ENV_VAR, raising=False)
    monkeypatch.setattr(nccl_lib, "_torch_lib", lambda: [])
    monkeypatch.setattr(nccl_lib.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(nccl_lib.NcclUnavailable) as e:
        nccl_lib.find_library(maps_path=str(tmp_path / "no-maps"), search_path=[str(tmp_path)])
    assert "nvidia-nccl-cu" in str(e.value) and nccl_lib.ENV_VAR in str(e.value)


def test_library_override_must_exist_and_load(tmp_path, monkeypatch):
    monkeypatch.setenv(nccl_lib.ENV_VAR, str(tmp_path / "libnccl.so.2"))
    with pytest.raises(nccl_lib.NcclUnavailable, match="does not exist"):
        nccl_lib.find_library()
    junk = tmp_path / "libnccl.so.2"
    junk.write_bytes(b"not an ELF file")
    assert nccl_lib.find_library() == str(junk)
    with pytest.raises(nccl_lib.NcclUnavailable, match="cannot load NCCL"):
        nccl_lib.Nccl(str(junk))


def test_library_lookup_order(tmp_path, monkeypatch):
    monkeypatch.delenv(nccl_lib.ENV_VAR, raising=False)
    wheel = tmp_path / "site" / "nvidia" / "nccl" / "lib"
    wheel.mkdir(parents=True)
    (wheel / "libnccl.so.2").write_bytes(b"")
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /opt/x/libtorch.so\n")
    site = [str(tmp_path / "site")]
    assert nccl_lib.candidates(str(maps), site)[0] == str(wheel / "libnccl.so.2")
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /opt/torch/lib/libnccl.so.2.27.5\n")
    first, second = nccl_lib.candidates(str(maps), site)[:2]
    assert (first, second) == ("/opt/torch/lib/libnccl.so.2.27.5", str(wheel / "libnccl.so.2"))


def test_kv_in_cpu_memory_is_refused_with_a_pointer_to_tcp():
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=4, page_size=4, dtype="float32")
    storage = KVStorage(layout, 8, "cpu")
    with pytest.raises(ValueError, match="tcp backend"):
        create_receiver("nccl", storage, "decode-0", "127.0.0.1", 5.0)
    with pytest.raises(ValueError, match="tcp backend"):
        NcclSender(storage, "prefill-0", 5.0)


# ---------------------------------------------------------------- peer programs (run in subprocesses)


def checksums(storage: KVStorage, pages: list[int]) -> list[list[int]]:
    """Per layer, a position-weighted sum of the bits of K and of V over `pages` in this order."""
    idx = torch.tensor(pages, device=storage.k[0].device)
    out = []
    for layer in range(storage.layout.num_layers):
        sums = []
        for cache in (storage.k[layer], storage.v[layer]):
            bits = cache.index_select(0, idx).view(torch.int16).flatten().to(torch.int64)
            weights = torch.arange(1, bits.numel() + 1, device=bits.device) % 65521
            sums.append(int((bits * weights).sum()))
        out.append(sums)
    return out


def _emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


def _commands():
    """Lines from stdin, without blocking: yields a dict, or None when nothing is waiting."""
    buf = b""
    while True:
        if b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            yield json.loads(line)
        elif select.select([0], [], [], 0)[0]:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                os._exit(0)
            buf += chunk
        else:
            yield None


class _Timed:
    def __init__(self, fn):
        self.fn, self.longest = fn, 0.0

    def __call__(self):
        start = time.perf_counter()
        out = self.fn()
        self.longest = max(self.longest, time.perf_counter() - start)
        return out


def recv_main(device: int, timeout_s: float) -> None:
    torch.cuda.set_device(device)
    storage = KVStorage(QWEN3_8B, 1024, f"cuda:{device}")
    receiver = NcclReceiver(storage, "decode-0", "127.0.0.1", timeout_s)
    poll, free = _Timed(receiver.poll), torch.randperm(storage.num_pages).tolist()
    pages: dict[str, list[int]] = {}
    die_after: str | None = None
    _emit({"address": receiver.address, "nccl_device": receiver.peer_info({}).nccl_device})
    for cmd in _commands():
        for t in poll():
            sums = checksums(storage, pages[t.rid]) if t.state is TransferState.SUCCESS else None
            _emit({"ended": t.rid, "state": t.state.value, "error": t.error, "nbytes": t.nbytes,
                   "sums": sums})
        if die_after and die_after in receiver.expected and receiver.expected[die_after].nbytes > 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if cmd is None:
            time.sleep(0.0005)
        elif cmd["cmd"] == "expect":
            pages[cmd["rid"]] = [free.pop() for _ in range(cmd["n"])]
            receiver.expect(cmd["rid"], pages[cmd["rid"]], "prefill-0")
            _emit({"rid": cmd["rid"], "pages": pages[cmd["rid"]], "spare": free[0]})
        elif cmd["cmd"] == "status":
            page = cmd.get("page")
            caches = storage.k + storage.v
            untouched = None if page is None else all(int(c[page].abs().sum()) == 0 for c in caches)
            _emit({"links": len(receiver.links), "max_poll_s": poll.longest, "untouched": untouched})
        elif cmd["cmd"] == "die_after_data":
            die_after = cmd["rid"]
        elif cmd["cmd"] == "exit":
            receiver.shutdown()
            os._exit(0)


def send_main(device: int, timeout_s: float) -> None:
    torch.cuda.set_device(device)
    storage = KVStorage(QWEN3_8B, 1024, f"cuda:{device}")
    sender = NcclSender(storage, "prefill-0", timeout_s)
    poll, free = _Timed(sender.poll), torch.randperm(storage.num_pages).tolist()
    src: dict[str, list[int]] = {}
    _emit({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        rid = cmd.get("rid")
        if cmd["cmd"] == "open":
            peer = TransferPeer(worker_id="decode-0", backend="nccl", address=cmd["address"], kv_layout={})
            t = sender.open(rid, peer)
            src[rid] = [free.pop() for _ in range(cmd["n"])]
            _emit({"state": t.state.value, "link": sender.link_of[rid].id})
        elif cmd["cmd"] == "send":
            _send_layers(sender, storage, cmd, src[rid])
            if cmd.get("close"):
                sender.close(rid)
            if not cmd.get("wait"):
                time.sleep(0.5)  # lets ZMQ deliver the headers before the test kills this process
                _emit({"enqueued": True})
                continue
            while sender.in_flight and rid in sender.transfers and not sender.transfers[rid].done:
                poll()
            t = sender.transfers.get(rid)
            _emit({"state": t.state.value if t else None, "error": t.error if t else None,
                   "sums": checksums(storage, src[rid]), "max_poll_s": poll.longest})
        elif cmd["cmd"] == "until_failed":
            _emit(_until_failed(sender, poll, rid))
        elif cmd["cmd"] == "exit":
            sender.shutdown()
            os._exit(0)


def _send_layers(sender: NcclSender, storage: KVStorage, cmd: dict, src: list[int]) -> None:
    """Each layer's KV is written on the compute stream just before send(), as a prefill forward does."""
    idx = torch.tensor(src, device=storage.k[0].device)
    gen = torch.Generator(device=storage.k[0].device).manual_seed(cmd.get("seed", 0))
    if cmd.get("stall"):
        torch.cuda._sleep(40_000_000_000)  # ~20 s of GPU time: nothing after this runs before the test ends
    for layer in cmd["layers"]:
        torch.cuda._sleep(1_000_000)  # the compute stream lags the host, as it does in a real forward
        for cache in (storage.k[layer], storage.v[layer]):
            cache[idx] = torch.randn(cache[idx].shape, generator=gen, device=cache.device).to(cache.dtype)
        dst = list(cmd["dst"])
        if cmd.get("foreign_in_layer") == layer:
            dst[-1] = cmd["foreign"]
        sender.send(cmd["rid"], layer, src, dst)


def _until_failed(sender: NcclSender, poll: _Timed, rid: str) -> dict:
    start, t = time.monotonic(), sender.transfers.get(rid)
    ended = []
    while time.monotonic() - start < 60 and (sender.links or not ended):
        ended += [x for x in poll() if x.rid == rid]
        time.sleep(0.001)
    state = ended[0].state.value if ended else (t.state.value if t else None)
    aborting = [th.name for th in threading.enumerate() if th.name.startswith("nccl-abort")]
    for _ in range(200):  # ncclCommAbort must come back (in its thread)
        aborting = [th.name for th in threading.enumerate() if th.name.startswith("nccl-abort")]
        if not aborting:
            break
        time.sleep(0.05)
    return {"state": state, "error": ended[0].error if ended else None, "links": len(sender.links),
            "seconds": time.monotonic() - start, "max_poll_s": poll.longest, "aborting": aborting}


# ---------------------------------------------------------------- GPU tests


class Peer:
    """A peer program in a subprocess, spoken to in JSON lines."""

    def __init__(self, role: str, device: int, timeout_s: float) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", NCCL_DEBUG="WARN", NCCL_DEBUG_FILE="/dev/stderr",
                   PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
        self.proc = subprocess.Popen([sys.executable, __file__, role, str(device), str(timeout_s)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self.buf = b""

    def tell(self, **cmd) -> None:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def read(self, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                if line.startswith(b"{"):
                    return json.loads(line)
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                self.proc.send_signal(signal.SIGUSR1)  # the peer prints its threads' stacks to stderr
                time.sleep(1)
                raise TimeoutError(f"no answer from the {self.proc.args[2]} peer within {timeout} s")
            chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise RuntimeError(f"the {self.proc.args[2]} peer exited with {self.proc.wait()}")
            self.buf += chunk

    def ask(self, timeout: float = 60.0, **cmd) -> dict:
        self.tell(**cmd)
        return self.read(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _needs_two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs (one sender, one receiver); this machine has {torch.cuda.device_count()}")
    try:
        nccl_lib.load()
    except nccl_lib.NcclUnavailable as e:
        pytest.skip(str(e))


def _peers(*specs: tuple[str, int, float]) -> list[Peer]:
    _needs_two_gpus()
    return [Peer(*spec) for spec in specs]


@pytest.mark.gpu
@pytest.mark.timeout(240)
def test_moves_an_8k_prompt_of_qwen3_8b_layer_by_layer():
    recv, send = _peers(("recv", 1, 60.0), ("send", 0, 60.0))
    try:
        address = recv.read()["address"]
        send.read()
        want = {"a": 512, "b": 64, "c": 8, "d": 64}  # a: 8192 tokens of 16 per page
        dst = {rid: recv.ask(cmd="expect", rid=rid, n=n) for rid, n in want.items()}
        layers = list(range(QWEN3_8B.num_layers))
        sent = {}
        for i, rid in enumerate(want):
            opened = send.ask(cmd="open", rid=rid, address=address, n=want[rid])
            # the first transfer makes the communicator, the later ones reuse it
            assert opened["state"] == ("bootstrapping" if i == 0 else "transferring")
            extra = {"foreign": dst["c"]["spare"], "foreign_in_layer": 1} if rid == "c" else {}
            sent[rid] = send.ask(cmd="send", rid=rid, layers=layers if rid != "c" else [0, 1], close=True,
                                 wait=True, dst=dst[rid]["pages"], seed=i, **extra)
        ended = {m["ended"]: m for m in (recv.read() for _ in want)}
        for rid in "abd":
            assert ended[rid]["state"] == "success", ended[rid]
            assert ended[rid]["nbytes"] == want[rid] * KVStorage.bytes_per_page(QWEN3_8B)
            assert ended[rid]["sums"] == sent[rid]["sums"]
        assert ended["c"]["state"] == "failed" and "page indices outside" in ended["c"]["error"]
        status = recv.ask(cmd="status", page=dst["c"]["spare"])
        assert status["untouched"]  # the refused chunk was received into scratch, never written
        assert status["links"] == 1
        assert max(status["max_poll_s"], sent["d"]["max_poll_s"]) < 1.0
    finally:
        for p in (recv, send):
            p.stop()


@pytest.mark.gpu
@pytest.mark.timeout(240)
def test_a_dead_sender_fails_the_transfer_and_the_next_one_bootstraps_afresh():
    timeout_s = 8.0
    recv, first, second = _peers(("recv", 1, timeout_s), ("send", 0, timeout_s), ("send", 0, timeout_s))
    try:
        address = recv.read()["address"]
        first.read(), second.read()
        pages = recv.ask(cmd="expect", rid="a", n=512)["pages"]
        first.ask(cmd="open", rid="a", address=address, n=512)
        half = list(range(QWEN3_8B.num_layers // 2))
        first.ask(cmd="send", rid="a", layers=half, dst=pages, wait=True)
        first.ask(cmd="send", rid="a", layers=[18, 19], dst=pages, stall=True)  # headers out, data never
        first.stop()
        killed = time.monotonic()
        ended = recv.read(timeout=30)
        assert ended["ended"] == "a" and ended["state"] == "failed"
        assert time.monotonic() - killed < timeout_s + 3
        for _ in range(100):  # the stuck receive aborts the communicator
            status = recv.ask(cmd="status")
            if status["links"] == 0:
                break
            time.sleep(0.1)
        assert status["links"] == 0 and status["max_poll_s"] < 1.0
        pages = recv.ask(cmd="expect", rid="b", n=64)["pages"]
        assert second.ask(cmd="open", rid="b", address=address, n=64)["state"] == "bootstrapping"
        sent = second.ask(cmd="send", rid="b", layers=list(range(QWEN3_8B.num_layers)), dst=pages, close=True,
                          wait=True, seed=7)
        ended = recv.read(timeout=30)
        assert ended["ended"] == "b" and ended["state"] == "success", ended
        assert ended["sums"] == sent["sums"]
    finally:
        for p in (recv, first, second):
            p.stop()


@pytest.mark.gpu
@pytest.mark.timeout(240)
def test_a_dead_receiver_fails_the_sender_without_blocking_it():
    timeout_s = 8.0
    recv, send = _peers(("recv", 1, timeout_s), ("send", 0, timeout_s))
    try:
        address = recv.read()["address"]
        send.read()
        pages = recv.ask(cmd="expect", rid="a", n=512)["pages"]
        old = send.ask(cmd="open", rid="a", address=address, n=512)["link"]
        send.ask(cmd="send", rid="a", layers=[0], dst=pages, wait=True)
        recv.tell(cmd="die_after_data", rid="a")
        assert recv.proc.wait(timeout=30) == -signal.SIGKILL
        send.ask(cmd="send", rid="a", layers=list(range(1, QWEN3_8B.num_layers)), dst=pages, close=True)
        out = send.ask(cmd="until_failed", rid="a", timeout=90)
        assert out["state"] == "failed" and out["links"] == 0, out
        assert out["max_poll_s"] < 1.0 and not out["aborting"], out
        again = send.ask(cmd="open", rid="z", address=address, n=4)
        assert again["state"] == "bootstrapping" and again["link"] != old
    finally:
        for p in (recv, send):
            p.stop()


if __name__ == "__main__":
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    role, dev, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    (send_main if role == "send" else recv_main)(dev, timeout)
