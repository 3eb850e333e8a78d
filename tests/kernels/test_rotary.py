"""kernels/rotary.py against the eager rotary layer (and Qwen3's q/k RMSNorm before it)."""

from __future__ import annotations

import pytest
import torch
from conftest import DOT_DTYPES

from mixquant_serve.kernels.rotary import qk_norm_rope
from mixquant_serve.layers.norm import RMSNorm
from mixquant_serve.layers.rotary import RotaryEmbedding


def _eager(qkv, h, hkv, d, pos, rotary, qn, kn):
    q = qkv[:, : h * d].reshape(-1, h, d)
    k = qkv[:, h * d : (h + hkv) * d].reshape(-1, hkv, d)
    if qn is not None:
        q, k = qn(q), kn(k)
    return rotary(pos, q, k)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("h,hkv,d", [(4, 2, 64), (8, 1, 128), (2, 2, 32)])
def test_matches_eager(device, dtype, norm, h, hkv, d):
    torch.manual_seed(h * d)
    t = 9
    rotary = RotaryEmbedding(d, 4096, 10000.0, None, device)
    qkv = torch.randn(t, (h + 2 * hkv) * d, dtype=dtype, device=device)
    pos = torch.randint(0, 4096, (t,), device=device)
    qn = kn = None
    if norm:
        qn, kn = RMSNorm(d, 1e-6, dtype).to(device), RMSNorm(d, 1e-6, dtype).to(device)
        qn.weight.data, kn.weight.data = (torch.randn(d, dtype=dtype, device=device) for _ in range(2))
    want_q, want_k = _eager(qkv, h, hkv, d, pos, rotary, qn, kn)
    got_q, got_k = qk_norm_rope(qkv, h, hkv, d, pos, rotary.cos, rotary.sin,
                                qn.weight if norm else None, kn.weight if norm else None, 1e-6)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_q, want_q, **tol)
    torch.testing.assert_close(got_k, want_k, **tol)
    if not norm:  # pure elementwise: the same roundings, so the same bits
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)


def test_refuses_a_bad_layout(device):
    qkv = torch.randn(3, 100, device=device)
    t = RotaryEmbedding(32, 64, 10000.0, None, device)
    with pytest.raises(ValueError, match="qkv"):
        qk_norm_rope(qkv, 2, 1, 32, torch.zeros(3, dtype=torch.long, device=device), t.cos, t.sin)


def _inputs(device, dtype, h, hkv, d, t, norm, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(t, (h + 2 * hkv) * d, generator=gen).to(dtype).to(device)
    pos = torch.randint(0, 4096, (t,), generator=gen).to(device)
    weights = tuple(torch.randn(d, generator=gen).to(dtype).to(device) for _ in range(2)) if norm else (None, None)
    return qkv, pos, weights


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("cache_dtype", [None, torch.float32])  # None: the activations' dtype
@pytest.mark.parametrize("norm,keep_k", [(False, True), (True, False), (True, True)])
@pytest.mark.parametrize("h,hkv,d", [(32, 8, 128), (9, 3, 64)])
def test_cache_write_matches_rotate_then_index_copy(device, dtype, cache_dtype, norm, keep_k, h, hkv, d):
    t, num_slots = 11, 64
    qkv, pos, (qw, kw) = _inputs(device, dtype, h, hkv, d, t, norm, seed=h + d)
    rotary = RotaryEmbedding(d, 4096, 1e6, None, device)
    gen = torch.Generator().manual_seed(d)
    k_cache, v_cache = (torch.randn(num_slots, hkv, d, generator=gen).to(cache_dtype or dtype).to(device)
                        for _ in range(2))
    slots = torch.randperm(num_slots, generator=gen)[:t].to(device)
    slots[-2:] = 0  # padding rows of a CUDA-graph batch all write slot 0
    want_q, want_k = qk_norm_rope(qkv, h, hkv, d, pos, rotary.cos, rotary.sin, qw, kw, 1e-6)
    want_kc, want_vc = k_cache.clone(), v_cache.clone()
    want_kc.index_copy_(0, slots[:-2], want_k[:-2].to(want_kc.dtype))
    want_vc.index_copy_(0, slots[:-2], qkv[:-2, (h + hkv) * d :].view(-1, hkv, d).to(want_vc.dtype))

    got_q, got_k = qk_norm_rope(qkv, h, hkv, d, pos, rotary.cos, rotary.sin, qw, kw, 1e-6, k_cache=k_cache,
                                v_cache=v_cache, slots=slots, keep_k=keep_k)
    assert torch.equal(got_q, want_q)
    assert torch.equal(got_k, want_k) if keep_k else got_k is None
    assert torch.equal(k_cache[1:], want_kc[1:]) and torch.equal(v_cache[1:], want_vc[1:])
    assert any(torch.equal(k_cache[0], want_k[i].to(k_cache.dtype)) for i in (-2, -1))
    eager_q, eager_k = _eager(qkv, h, hkv, d, pos, rotary, *_norms(qw, kw, dtype, d, device))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype != torch.float32 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_q, eager_q, **tol)
    torch.testing.assert_close(k_cache[slots[:-2]], eager_k[:-2].to(k_cache.dtype), **tol)


@pytest.mark.parametrize("to_cache", [False, True])
def test_writes_into_given_buffers(device, to_cache):
    """q_out/k_out/v_out (a CUDA graph's static buffers, here views of bigger ones): the same q and k as new
    tensors, v copied contiguous; rows past T untouched."""
    h, hkv, d, t = 8, 2, 64, 7
    qkv, pos, (qw, kw) = _inputs(device, torch.float16, h, hkv, d, t, True, seed=5)
    rotary = RotaryEmbedding(d, 4096, 1e6, None, device)
    want_q, want_k = qk_norm_rope(qkv, h, hkv, d, pos, rotary.cos, rotary.sin, qw, kw, 1e-6)
    bufs = [torch.full((t + 3, n, d), 7.0, dtype=torch.float16, device=device) for n in (h, hkv, hkv)]
    cache = {}
    if to_cache:
        slots = torch.arange(t, device=device)
        cache = dict(k_cache=torch.zeros(16, hkv, d, dtype=torch.float16, device=device),
                     v_cache=torch.zeros(16, hkv, d, dtype=torch.float16, device=device), slots=slots)
    got_q, got_k = qk_norm_rope(qkv, h, hkv, d, pos, rotary.cos, rotary.sin, qw, kw, 1e-6, **cache,
                                q_out=bufs[0][:t], k_out=bufs[1][:t], v_out=bufs[2][:t])
    assert got_q.data_ptr() == bufs[0].data_ptr() and got_k.data_ptr() == bufs[1].data_ptr()
    assert torch.equal(bufs[0][:t], want_q) and torch.equal(bufs[1][:t], want_k)
    assert torch.equal(bufs[2][:t], qkv[:, (h + hkv) * d :].reshape(t, hkv, d))
    assert all((b[t:] == 7).all() for b in bufs)
    if to_cache:
        assert torch.equal(cache["v_cache"][:t], bufs[2][:t]) and torch.equal(cache["k_cache"][:t], want_k)
    with pytest.raises(ValueError, match="q_out"):
        qk_norm_rope(qkv, h, hkv, d, pos, rotary.cos, rotary.sin, qw, kw, 1e-6, q_out=bufs[0])


def _norms(qw, kw, dtype, d, device):
    if qw is None:
        return None, None
    qn, kn = RMSNorm(d, 1e-6, dtype).to(device), RMSNorm(d, 1e-6, dtype).to(device)
    qn.weight.data, kn.weight.data = qw, kw
    return qn, kn


def test_cache_write_refuses_bad_arguments(device):
    qkv, pos, _ = _inputs(device, torch.float32, 2, 1, 32, 3, False, seed=0)
    t = RotaryEmbedding(32, 64, 10000.0, None, device)
    cache = torch.zeros(8, 1, 32, device=device)
    slots = torch.zeros(3, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="must be kept"):
        qk_norm_rope(qkv, 2, 1, 32, pos % 64, t.cos, t.sin, keep_k=False)
    with pytest.raises(ValueError, match="come together"):
        qk_norm_rope(qkv, 2, 1, 32, pos % 64, t.cos, t.sin, k_cache=cache, slots=slots)
    with pytest.raises(ValueError, match="v_cache"):
        qk_norm_rope(qkv, 2, 1, 32, pos % 64, t.cos, t.sin, k_cache=cache, v_cache=cache[:, :, :16], slots=slots)
    with pytest.raises(ValueError, match="slots"):
        qk_norm_rope(qkv, 2, 1, 32, pos % 64, t.cos, t.sin, k_cache=cache, v_cache=cache, slots=slots.int())


@pytest.mark.gpu
def test_cache_write_replays_in_a_cuda_graph():
    """Qwen3-8B's heads in bfloat16: one capture over static qkv/positions/slots, replayed with new contents."""
    h, hkv, d, t, dtype = 32, 8, 128, 4, torch.bfloat16
    rotary = RotaryEmbedding(d, 4096, 1e6, None, "cuda")
    qw, kw = (torch.randn(d, dtype=dtype, device="cuda") for _ in range(2))
    k_cache, v_cache = (torch.zeros(64, hkv, d, dtype=dtype, device="cuda") for _ in range(2))
    qkv = torch.zeros(t, (h + 2 * hkv) * d, dtype=dtype, device="cuda")
    pos, slots = (torch.zeros(t, dtype=torch.long, device="cuda") for _ in range(2))

    def fused() -> torch.Tensor:
        return qk_norm_rope(qkv, h, hkv, d, pos, rotary.cos, rotary.sin, qw, kw, 1e-6, k_cache=k_cache,
                            v_cache=v_cache, slots=slots, keep_k=False)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fused()  # compiles the kernel off the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused()
    for step in range(3):
        new_qkv, new_pos, _ = _inputs("cuda", dtype, h, hkv, d, t, False, seed=step)
        qkv.copy_(new_qkv)
        pos.copy_(new_pos)
        slots.copy_(torch.randperm(63)[:t] + 1)
        graph.replay()
        want_q, want_k = qk_norm_rope(qkv, h, hkv, d, pos, rotary.cos, rotary.sin, qw, kw, 1e-6)
        assert torch.equal(out, want_q) and torch.equal(k_cache[slots], want_k)
        assert torch.equal(v_cache[slots].flatten(1), qkv[:, (h + hkv) * d :])
