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
    receiver.expect("u", [3], "test")  # the right total, split unevenly between K and V
    push.send_multipart([stream_encoder.encode(KVChunk(rid="u", layer=0, dst_pages=[3], nbytes=2 * half)),
                         b"\1" * (half - 2), b"\1" * (half + 2)])
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


def test_fuzzed_stream_messages_never_raise_out_of_poll():
    """Whatever a (buggy or hostile) peer sends on the KV stream, poll() returns and nothing outside the
    expected pages is written."""
    import zmq
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from mixquant_serve.transfer.base import KVDone, KVFailed

    _, dst = storages()
    receiver = create_receiver("tcp", dst, "d", "127.0.0.1", timeout_s=5)
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.connect(receiver.address)
    page = KVStorage.bytes_per_page(LAYOUT) // LAYOUT.num_layers
    ints = st.one_of(st.integers(-2, 20), st.sampled_from([page, page // 2, 2**31, -(2**40)]))
    header = st.one_of(
        st.builds(KVChunk, rid=st.sampled_from(["r", "x"]), layer=ints, dst_pages=st.lists(ints, max_size=3),
                  nbytes=ints).map(stream_encoder.encode),
        st.builds(KVDone, rid=st.sampled_from(["r", "x"]), total_bytes=ints).map(stream_encoder.encode),
        st.builds(KVFailed, rid=st.just("r"), error=st.text(max_size=5)).map(stream_encoder.encode),
        st.binary(max_size=16))
    frames = st.lists(st.one_of(st.binary(max_size=8), st.integers(0, 3 * page).map(lambda n: b"\1" * n)),
                      max_size=3)

    @st.composite
    def plausible(draw):  # a well-formed header for pages it may write, with the payload cut anywhere
        pages = draw(st.lists(st.sampled_from([5, 6]), min_size=1, max_size=2))
        chunk = KVChunk(rid="r", layer=draw(st.integers(0, LAYOUT.num_layers - 1)), dst_pages=pages,
                        nbytes=len(pages) * page)
        cuts = sorted(draw(st.lists(st.integers(0, chunk.nbytes), max_size=2)))
        bounds = [0, *cuts, chunk.nbytes]
        return stream_encoder.encode(chunk), [b"\1" * (b - a) for a, b in zip(bounds, bounds[1:], strict=False)]

    @settings(max_examples=200, deadline=None, derandomize=True, database=None)
    @given(message=st.one_of(st.tuples(header, frames), plausible()))
    def send(message):
        first, rest = message
        if "r" not in receiver.expected:
            receiver.expect("r", [5, 6], "test")
        push.send_multipart([first, *rest])
        assert receiver.socket.poll(2000), "the message did not arrive"
        receiver.poll()
        for cache in dst.k + dst.v:
            untouched = [i for i in range(cache.shape[0]) if i not in (5, 6)]
            assert not cache[untouched].any()

    try:
        send()
    finally:
        push.close(0), receiver.shutdown()
