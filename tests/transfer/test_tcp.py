"""The tcp transfer backend in one process: pages move exactly, and the receiver refuses what it must."""

from __future__ import annotations

import time

import torch

from mixquant_serve.config import KVLayout
from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.transfer.base import KVChunk, TransferState, create_receiver, create_sender, stream_encoder

LAYOUT = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, page_size=4, dtype="bfloat16")


def storages() -> tuple[KVStorage, KVStorage]:
    src, dst = KVStorage(LAYOUT, 16, "cpu"), KVStorage(LAYOUT, 16, "cpu")
    g = torch.Generator().manual_seed(0)
    for t in src.k + src.v:
        t.copy_(torch.randn(t.shape, generator=g))
    return src, dst


def drain(receiver, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ended := receiver.poll():
            return ended
        time.sleep(0.01)
    raise AssertionError("nothing ended")


def test_pages_arrive_exactly_where_asked():
    src, dst = storages()
    receiver = create_receiver("tcp", dst, "d", "127.0.0.1", timeout_s=5)
    sender = create_sender("tcp", src, "p", timeout_s=5)
    receiver.expect("r", [7, 8, 9], "p")
    sender.open("r", receiver.peer_info({}))
    for layer in range(LAYOUT.num_layers):
        sender.send("r", layer, [1, 2, 3], [7, 8, 9])
    sender.close("r")
    [t] = drain(receiver)
    assert t.state is TransferState.SUCCESS and t.nbytes == 3 * KVStorage.bytes_per_page(LAYOUT)
    for layer in range(LAYOUT.num_layers):
        assert torch.equal(dst.k[layer][[7, 8, 9]], src.k[layer][[1, 2, 3]])
        assert torch.equal(dst.v[layer][[7, 8, 9]], src.v[layer][[1, 2, 3]])
        assert not dst.k[layer][[1, 2, 3]].any()  # nothing else was written
    sender.shutdown(), receiver.shutdown()


def test_pages_outside_the_allocation_are_refused():
    src, dst = storages()
    receiver = create_receiver("tcp", dst, "d", "127.0.0.1", timeout_s=5)
    sender = create_sender("tcp", src, "p", timeout_s=5)
    receiver.expect("r", [7], "p")
    sender.open("r", receiver.peer_info({}))
    sender.send("r", 0, [1], [12])  # page 12 was never allocated for "r"
    sender.close("r")
    [t] = drain(receiver)
    assert t.state is TransferState.FAILED and "outside the pages allocated" in t.error
    assert not dst.k[0][12].any()
    sender.shutdown(), receiver.shutdown()


def test_bad_headers_fail_the_transfer_without_writing():
    src, dst = storages()
    receiver = create_receiver("tcp", dst, "d", "127.0.0.1", timeout_s=5)
    import zmq

    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(receiver.address)
    receiver.expect("r", [3], "test")
    half = KVStorage.bytes_per_page(LAYOUT) // LAYOUT.num_layers // 2
    push.send_multipart([stream_encoder.encode(KVChunk(rid="r", layer=9, dst_pages=[3], nbytes=2 * half)),
                         b"\0" * half, b"\0" * half])
    [t] = drain(receiver)
    assert t.state is TransferState.FAILED and "layer 9 out of range" in t.error
    receiver.expect("s", [3], "test")
    push.send_multipart([stream_encoder.encode(KVChunk(rid="s", layer=0, dst_pages=[3], nbytes=2 * half)),
                         b"\1" * half])  # one frame short
    [t] = drain(receiver)
    assert t.state is TransferState.FAILED and "payload size" in t.error
    push.send(b"\x80\x04not msgpack")  # garbage (a pickle header) is dropped, never unpickled
    assert receiver.poll() == [] and not dst.k[0][3].any()
    push.close(0), receiver.shutdown()


def test_an_unfinished_transfer_times_out():
    _, dst = storages()
    receiver = create_receiver("tcp", dst, "d", "127.0.0.1", timeout_s=0.2)
    receiver.expect("r", [1], "somewhere")
    [t] = drain(receiver)
    assert t.state is TransferState.FAILED and "timed out" in t.error
    receiver.shutdown()
