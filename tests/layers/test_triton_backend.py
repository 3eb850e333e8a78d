"""The Triton attention backend against the PyTorch reference backend over the same calls and cache."""

from __future__ import annotations

import pytest
import torch
from kernels.conftest import DOT_DTYPES  # first: picks Triton's interpreter on CPU before kernels load

from mixquant_serve.config import KVLayout
from mixquant_serve.kvcache.page_pool import PagePool
from mixquant_serve.kvcache.storage import KVStorage, dtype_name
from mixquant_serve.layers.attention.base import SeqSlice, create_attention_backend
from mixquant_serve.layers.attention.torch_ref import TorchRefBackend
from mixquant_serve.layers.attention.triton_backend import TritonBackend, TritonMeta

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS, KV_HEADS, HEAD_DIM, LAYERS = 4, 2, 64, 2
_ATOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


class _Pair:
    """Both backends on their own storage, fed identical calls; requests own pages from one pool."""

    def __init__(self, dtype: torch.dtype, page_size: int, sdpa: bool, splits: int | None = None,
                 extend_splits: int | None = None) -> None:
        layout = KVLayout(LAYERS, KV_HEADS, HEAD_DIM, page_size, dtype_name(dtype))
        args = (HEADS, KV_HEADS, HEAD_DIM, DEVICE)
        self.ref = TorchRefBackend(KVStorage(layout, 48, DEVICE), *args)
        self.tri = TritonBackend(KVStorage(layout, 48, DEVICE), *args, sdpa_prefill=sdpa, decode_splits=splits,
                                 extend_splits=extend_splits)
        self.pool, self.dtype, self.page_size = PagePool(48, page_size), dtype, page_size
        self.pages: dict[str, list[int]] = {}
        self.done: dict[str, int] = {}
        self.gen = torch.Generator().manual_seed(page_size)

    def seqs(self, step: list[tuple[str, int]]) -> list[SeqSlice]:
        out = []
        for name, n in step:
            pages, start = self.pages.setdefault(name, []), self.done.get(name, 0)
            pages += self.pool.alloc(self.pool.pages_for(start + n) - len(pages))
            out.append(SeqSlice(list(pages), start, n))
            self.done[name] = start + n
        return out

    def inputs(self, t: int) -> tuple[torch.Tensor, ...]:
        shapes = ((t, HEADS, HEAD_DIM), (t, KV_HEADS, HEAD_DIM), (t, KV_HEADS, HEAD_DIM))
        return tuple(torch.randn(s, generator=self.gen).to(self.dtype).to(DEVICE) for s in shapes)

    def check(self, step: list[tuple[str, int]]) -> None:
        seqs = self.seqs(step)
        ref_meta, tri_meta = self.ref.plan(seqs), self.tri.plan(seqs)
        for layer in range(LAYERS):
            q, k, v = self.inputs(sum(s.length for s in seqs))
            want = self.ref.forward(layer, q, k, v, ref_meta)
            got = self.tri.forward(layer, q, k, v, tri_meta)
            assert got.shape == want.shape and got.dtype == q.dtype
            torch.testing.assert_close(got, want, atol=_ATOL[self.dtype], rtol=0)


@pytest.mark.parametrize(("dtype", "page_size", "sdpa", "splits", "extend_splits"), [
    (torch.float32, 4, True, 3, 2),
    (DOT_DTYPES[0], 16, False, None, None),  # float16 here (bfloat16 dots are wrong in the interpreter)
])
def test_matches_the_reference_over_mixed_batches(dtype, page_size, sdpa, splits, extend_splits):
    pair = _Pair(dtype, page_size, sdpa, splits, extend_splits)
    pair.check([("a", 20), ("b", 5)])  # prefill of two sequences
    pair.check([("a", 1), ("b", 1)])  # decode
    pair.pages["c"] = pair.pages["a"][:1]  # c hits a's first page in the prefix cache
    pair.done["c"] = page_size
    pair.pool.ref(pair.pages["c"])
    pair.check([("c", 7), ("a", 1)])  # extend after a prefix hit, mixed with a one-token row
    pair.check([("d", 9)])  # one new sequence (SDPA when enabled)
    pair.check([("d", 12)])  # its next chunk, over its cached first chunk
    pair.check([("a", 1), ("b", 1), ("c", 1), ("d", 1)])
    for layer in range(LAYERS):  # both wrote the same K/V everywhere
        for ref, tri in zip(pair.ref.storage.flat(layer), pair.tri.storage.flat(layer), strict=True):
            torch.testing.assert_close(tri, ref, atol=0, rtol=0)


def test_static_decode_meta_is_refilled_in_place():
    """What a CUDA graph replays: metadata views taken once see each later load; padding rows give zeros."""
    pair = _Pair(torch.float32, 4, sdpa=True)
    pair.check([("a", 9), ("b", 3), ("c", 14)])
    static = pair.tri.static_decode_meta(max_batch=8, max_pages=16)
    captured = None
    for step in ([("a", 1), ("b", 1)], [("c", 1), ("a", 1), ("b", 1)], [("b", 1)]):
        seqs = pair.seqs(step)
        meta = pair.tri.load_decode_meta(static, seqs, padded_batch=4)
        captured = captured or meta
        for name in ("slots", "page_table", "seq_lens", "buf"):
            assert getattr(meta, name).data_ptr() == getattr(captured, name).data_ptr()
        q, k, v = pair.inputs(4)
        n = len(seqs)
        want = pair.ref.forward(0, q[:n], k[:n], v[:n], pair.ref.plan(seqs))
        got = pair.tri.forward(0, q, k, v, captured)
        torch.testing.assert_close(got[:n], want, atol=_ATOL[torch.float32], rtol=0)
        assert torch.equal(got[n:], torch.zeros_like(got[n:]))
    torch.testing.assert_close(pair.tri.storage.k[0][1:], pair.ref.storage.k[0][1:], atol=0, rtol=0)


def test_plan_layout_and_errors():
    pair = _Pair(torch.float32, 4, sdpa=True)
    seqs = [SeqSlice([3, 5, 7], 6, 3), SeqSlice([2], 0, 2)]
    meta = pair.tri.plan(seqs)
    assert meta.slots.tolist() == [5 * 4 + 2, 5 * 4 + 3, 7 * 4 + 0, 2 * 4 + 0, 2 * 4 + 1]
    assert meta.page_table.tolist() == [[3, 5, 7], [2, 0, 0]]
    assert (meta.seq_lens.tolist(), meta.prefix_lens.tolist(), meta.q_start_loc.tolist()) == ([9, 2], [6, 0],
                                                                                              [0, 3, 5])
    assert (meta.max_q_len, meta.is_decode, meta.sdpa) == (3, False, False)
    assert meta.slots.dtype == torch.int64 and meta.page_table.dtype == torch.int32
    with pytest.raises(ValueError, match="needs 2 pages"):
        pair.tri.plan([SeqSlice([3], 3, 2)])
    static = pair.tri.static_decode_meta(2, 2)
    with pytest.raises(ValueError, match="static table holds 2"):
        pair.tri.load_decode_meta(static, [SeqSlice([1, 2, 3], 8, 1)], 2)
    assert isinstance(create_attention_backend("triton", pair.tri.storage, *([HEADS, KV_HEADS, HEAD_DIM, DEVICE])),
                      TritonBackend)


@pytest.mark.gpu
def test_decode_replays_in_a_cuda_graph():
    """Capture one decode forward over static metadata, then replay it for batches of other lengths."""
    pair = _Pair(torch.bfloat16, 16, sdpa=True)
    pair.check([("a", 40), ("b", 17), ("c", 3)])
    static = pair.tri.static_decode_meta(max_batch=8, max_pages=32)
    sq, sk, sv = (torch.zeros(4, h, HEAD_DIM, dtype=torch.bfloat16, device=DEVICE) for h in (HEADS, KV_HEADS, KV_HEADS))

    def step(names: list[str], run) -> TritonMeta:
        seqs = pair.seqs([(name, 1) for name in names])
        q, k, v = pair.inputs(len(seqs))
        want = pair.ref.forward(0, q, k, v, pair.ref.plan(seqs))
        for s, x in zip((sq, sk, sv), (q, k, v), strict=True):
            s.zero_()
            s[: len(seqs)] = x
        meta = pair.tri.load_decode_meta(static, seqs, padded_batch=4)
        got = run(meta)
        torch.testing.assert_close(got[: len(seqs)], want, atol=_ATOL[torch.bfloat16], rtol=0)
        assert torch.equal(got[len(seqs) :], torch.zeros_like(got[len(seqs) :]))
        return meta

    graph, side = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles the kernels, checked like any other step
        meta = step(["a", "b"], lambda meta: pair.tri.forward(0, sq, sk, sv, meta).clone())
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        out = pair.tri.forward(0, sq, sk, sv, meta)
    for names in (["c", "a", "b"], ["b"], ["a", "c"]):
        step(names, lambda meta: (graph.replay(), out.clone())[1])
