"""kernels/rmsnorm.py against the eager RMSNorm layer (Hugging Face's numerics)."""

from __future__ import annotations

import pytest
import torch
from conftest import DOT_DTYPES, ON_GPU

from mixquant_serve.kernels.rmsnorm import rmsnorm
from mixquant_serve.layers.norm import RMSNorm


def _layer(n: int, dtype: torch.dtype, device: torch.device) -> RMSNorm:
    norm = RMSNorm(n, 1e-6, dtype).to(device)
    norm.weight.data = torch.randn(n, dtype=dtype, device=device)
    return norm


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("n", [64, 200, 4096] if ON_GPU else [64, 200])
def test_matches_the_eager_layer(device, dtype, n):
    torch.manual_seed(n)
    norm = _layer(n, dtype, device)
    x = torch.randn(7, n, dtype=dtype, device=device) * 3
    out, res = rmsnorm(x, norm.weight, norm.eps)
    assert res is None
    torch.testing.assert_close(out, norm(x), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
def test_fused_residual_add(device, dtype):
    torch.manual_seed(1)
    norm = _layer(96, dtype, device)
    x, r = (torch.randn(2, 5, 96, dtype=dtype, device=device) for _ in range(2))
    x0, r0 = x.clone(), r.clone()
    out, res = rmsnorm(x, norm.weight, norm.eps, residual=r)
    assert torch.equal(res, x0 + r0), "the new residual is the rounded sum"
    torch.testing.assert_close(out, norm(x0 + r0), rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-5)
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs are left alone"


def test_strided_rows_and_empty_input(device):
    norm = _layer(32, torch.float32, device)
    wide = torch.randn(4, 64, device=device)
    out, _ = rmsnorm(wide[:, :32], norm.weight, norm.eps)
    torch.testing.assert_close(out, norm(wide[:, :32].contiguous()))
    empty, _ = rmsnorm(torch.empty(0, 32, device=device), norm.weight, norm.eps)
    assert empty.shape == (0, 32)


def test_refuses_mismatched_shapes(device):
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(torch.randn(2, 16, device=device), w, 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rmsnorm(torch.randn(2, 8, device=device), w, 1e-6, residual=torch.randn(3, 8, device=device))
