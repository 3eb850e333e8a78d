"""The Triton attention backend against the PyTorch reference backend over the same calls and cache."""

from __future__ import annotations

import pytest
import torch
from kernels.conftest import DOT_DTYPES  # first: picks Triton's interpreter on CPU before kernels load

from mixquant_serve.config import KVLayout
from mixquant_serve.kernels.rotary import qk_norm_rope
from mixquant_serve.kvcache.page_pool import PagePool
from mixquant_serve.kvcache.storage import KVStorage, dtype_name
from mixquant_serve.layers.attention.base import SeqSlice, create_attention_backend
from mixquant_serve.layers.attention.torch_ref import TorchRefBackend
from mixquant_serve.layers.attention.triton_backend import TritonBackend, TritonMeta
from mixquant_serve.layers.norm import RMSNorm
from mixquant_serve.layers.rotary import RotaryEmbedding

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


class _Rotate:
    """q/k norm and rotary of a qkv projection, by the kernel itself or by the rotary layer (PyTorch off CUDA)."""

    def __init__(self, by_kernel: bool, dtype: torch.dtype) -> None:
        self.by_kernel = by_kernel
        self.rotary = RotaryEmbedding(HEAD_DIM, 256, 10000.0, None, DEVICE)
        self.norms = tuple(RMSNorm(HEAD_DIM, 1e-6, dtype).to(DEVICE) for _ in range(2))
        for n in self.norms:
            n.weight.data.normal_()

    def __call__(self, qkv, positions, kv_write=None):
        if not self.by_kernel:
            return self.rotary.rotate_qkv(positions, qkv, HEADS, KV_HEADS, HEAD_DIM, self.norms, kv_write)
        cache = {} if kv_write is None else dict(k_cache=kv_write.k_cache, v_cache=kv_write.v_cache,
                                                 slots=kv_write.slots, keep_k=kv_write.keep_k)
        q, k = qk_norm_rope(qkv, HEADS, KV_HEADS, HEAD_DIM, positions, self.rotary.cos, self.rotary.sin,
                            self.norms[0].weight, self.norms[1].weight, 1e-6, **cache)
        return q, k, qkv[:, (HEADS + KV_HEADS) * HEAD_DIM :].view(-1, KV_HEADS, HEAD_DIM)


@pytest.mark.parametrize("by_kernel", [True, False])
def test_kv_stored_by_the_rotary_equals_kv_stored_by_forward(by_kernel):
    """kv_write's rows filled while rotating, then forward(kv_stored=True): the same output and cache, bit for bit,
    as forward storing K/V itself; over prefill (SDPA keeps k), extend, decode and a padded static decode."""
    dtype = DOT_DTYPES[0]
    pair = _Pair(dtype, 4, sdpa=True)
    fused = TritonBackend(KVStorage(pair.tri.storage.layout, 48, DEVICE), HEADS, KV_HEADS, HEAD_DIM, DEVICE,
                          sdpa_prefill=True)
    rotate, static = _Rotate(by_kernel, dtype), fused.static_decode_meta(max_batch=4, max_pages=8)
    steps = ([("a", 9)], [("a", 6), ("b", 5)], [("a", 1), ("b", 1)], [("b", 1), ("a", 1), ("c", 1)])
    for i, step in enumerate(steps):
        seqs = pair.seqs(step)
        plain_meta = pair.tri.plan(seqs)
        fused_meta = fused.load_decode_meta(static, seqs, 4) if i == len(steps) - 1 else fused.plan(seqs)
        t = fused_meta.slots.shape[0]
        positions = torch.zeros(t, dtype=torch.long)
        positions[: plain_meta.slots.shape[0]] = torch.cat([torch.arange(s.start, s.start + s.length) for s in seqs])
        for layer in range(LAYERS):
            qkv = torch.randn(t, (HEADS + 2 * KV_HEADS) * HEAD_DIM, generator=pair.gen).to(dtype).to(DEVICE)
            n = plain_meta.slots.shape[0]
            want = pair.tri.forward(layer, *rotate(qkv[:n], positions[:n].to(DEVICE)), plain_meta)
            kv_write = fused.kv_write(layer, fused_meta)
            assert kv_write.keep_k == fused_meta.sdpa == (i == 0)
            q, k, v = rotate(qkv, positions.to(DEVICE), kv_write)
            assert (k is None) != kv_write.keep_k
            got = fused.forward(layer, q, k, v, fused_meta, kv_stored=True)
            assert torch.equal(got[:n], want)
    for layer in range(LAYERS):  # page 0 takes the padding rows
        for plain, stored in zip(pair.tri.storage.flat(layer), fused.storage.flat(layer), strict=True):
            assert torch.equal(stored[4:], plain[4:])


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
