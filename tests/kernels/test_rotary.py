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
