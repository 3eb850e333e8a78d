"""kernels/gemv.py against float64 matrix products of the eager producers (layers/norm.py's RMSNorm,
layers/activation.py's GatedAct); with an identity weight the output is the fused operand itself, which is
checked against kernels/rmsnorm.py and kernels/silu_mul.py."""

from __future__ import annotations

import pytest
import torch
from conftest import DOT_DTYPES, ON_GPU

from mixquant_serve.kernels.gemv import MAX_M, GemvLaunch, gemv, rmsnorm_gemv, silu_mul_gemv
from mixquant_serve.kernels.rmsnorm import rmsnorm
from mixquant_serve.kernels.silu_mul import silu_mul
from mixquant_serve.layers.activation import GatedAct
from mixquant_serve.layers.norm import RMSNorm

EPS = 1e-6
SMALL = GemvLaunch(block_n=16, block_k=64)  # several programs and K steps at the interpreter's shapes
LAUNCHES = [SMALL, GemvLaunch(block_n=32, block_k=128, num_warps=8, num_stages=2)]
TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5}


def _rand(*shape: int, device: torch.device, dtype: torch.dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)


def _weight(n: int, k: int, device: torch.device, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return _rand(n, k, device=device, dtype=dtype, seed=seed, scale=k**-0.5)


def _assert_matmul(got: torch.Tensor, a: torch.Tensor, weight: torch.Tensor) -> None:
    """got against ``a @ weight.T`` in float64, within the rounding of got's dtype (relative to the row scale)."""
    want = a.double() @ weight.double().T
    assert got.shape == want.shape and got.dtype == a.dtype
    tol = TOL[got.dtype] * want.abs().amax(dim=1, keepdim=True).clamp_min(1.0)
    err = (got.double() - want).abs()
    assert (err <= tol).all(), f"max error {err.max().item():.3g} (tolerance {tol.min().item():.3g})"


def _eager_norm(h: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    """layers/norm.py's eager RMSNorm (the layer runs eagerly on CPU)."""
    norm = RMSNorm(h.shape[1], EPS, h.dtype)
    norm.weight.data = norm_weight.cpu()
    return norm(h.cpu()).to(h.device)


def _eager_silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    return GatedAct("silu")(gate_up.cpu()).to(gate_up.device)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("m", [1, 3, MAX_M])
@pytest.mark.parametrize("n, k", [(384, 512), (100, 200)])
def test_gemv_matches_float64(device, dtype, m, n, k):
    x = _rand(m, k, device=device, dtype=dtype, seed=m + n)
    w = _weight(n, k, device, dtype, seed=k)
    for launch in [None, *LAUNCHES]:
        _assert_matmul(gemv(x, w, launch=launch), x, w)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("m", [1, 3, MAX_M])
def test_rmsnorm_gemv_matches_the_eager_norm_then_matmul(device, dtype, m):
    n, k = 96, 320
    x = _rand(m, k, device=device, dtype=dtype, seed=m, scale=3.0)
    r = _rand(m, k, device=device, dtype=dtype, seed=m + 1)
    nw, w = _rand(k, device=device, dtype=dtype, seed=2), _weight(n, k, device, dtype, seed=3)
    x0, r0 = x.clone(), r.clone()
    h = x0 + r0
    for launch in [None, *LAUNCHES]:
        res_out = torch.full_like(x, float("nan"))
        got = rmsnorm_gemv(x, r, nw, EPS, w, residual_out=res_out, launch=launch)
        assert torch.equal(res_out, h), "residual_out is the rounded sum"
        _assert_matmul(got, _eager_norm(h, nw), w)
    assert torch.equal(x, x0) and torch.equal(r, r0), "inputs are left alone"
    _assert_matmul(rmsnorm_gemv(x, None, nw, EPS, w, launch=SMALL), _eager_norm(x, nw), w)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("m", [1, 3])
def test_silu_mul_gemv_matches_eager_gated_act_then_matmul(device, dtype, m):
    n, inter = 80, 448
    gate_up = _rand(m, 2 * inter, device=device, dtype=dtype, seed=m, scale=3.0)
    w = _weight(n, inter, device, dtype, seed=7)
    for launch in [None, *LAUNCHES]:
        _assert_matmul(silu_mul_gemv(gate_up, w, launch=launch), _eager_silu_mul(gate_up), w)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize("launch", LAUNCHES)
def test_identity_weight_returns_the_fused_operands(device, dtype, launch):
    """``a @ I`` is exact, so the output is the operand: the norm's (up to the last bit where the float32 sum
    runs in another order) and silu_mul's, both as the separate kernels and the eager layers round them."""
    m, k = 4, 160
    eye = torch.eye(k, dtype=dtype, device=device)
    x, r = (_rand(m, k, device=device, dtype=dtype, seed=s, scale=2.0) for s in (1, 2))
    nw = _rand(k, device=device, dtype=dtype, seed=3)
    normed = rmsnorm_gemv(x, r, nw, EPS, eye, residual_out=torch.empty_like(x), launch=launch)
    want, h = rmsnorm(x, nw, EPS, r)
    eager = _eager_norm(h, nw)
    assert (normed == want).float().mean() > 0.98
    torch.testing.assert_close(normed, want, rtol=TOL[dtype] if dtype != torch.float32 else 1e-6, atol=0)
    torch.testing.assert_close(normed, eager, rtol=TOL[dtype] if dtype != torch.float32 else 1e-5, atol=1e-5)
    if dtype != torch.float32:  # torch's float32 rsqrt may differ in its last bit
        assert (normed == eager).float().mean() > 0.98
    gate_up = _rand(m, 2 * k, device=device, dtype=dtype, seed=4, scale=3.0)
    act = silu_mul_gemv(gate_up, eye, launch=launch)
    assert torch.equal(act, silu_mul(gate_up)), "the same arithmetic as kernels/silu_mul.py"
    eager = _eager_silu_mul(gate_up)
    torch.testing.assert_close(act, eager, rtol=TOL[dtype] if dtype != torch.float32 else 1e-5, atol=1e-5)
    if dtype != torch.float32:  # the float32 silu may differ in its last bit (exp); rounding hides that
        assert (act == eager).float().mean() > 0.98


def test_strided_operands_out_buffer_and_determinism(device):
    dtype = torch.float16 if not ON_GPU else torch.bfloat16
    wide = _rand(3, 300, device=device, dtype=dtype, seed=1)
    merged = _weight(120, 256, device, dtype, seed=2)
    x, w = wide[:, 40:240], merged[:, :200]  # row strides 300 and 256
    out = torch.empty(3, 120, dtype=dtype, device=device)
    got = gemv(x, w, out=out, launch=SMALL)
    assert got.data_ptr() == out.data_ptr()
    _assert_matmul(out, x, w)
    assert torch.equal(gemv(x, w, launch=SMALL), out), "no split-K: the same bits every time"
    gate_up = _rand(2, 512, device=device, dtype=dtype, seed=3)[:, :400]
    _assert_matmul(silu_mul_gemv(gate_up, w, launch=SMALL), _eager_silu_mul(gate_up), w)


def test_empty_batch(device):
    w = _weight(32, 64, device, torch.float32, seed=1)
    assert gemv(torch.empty(0, 64, device=device), w).shape == (0, 32)


def test_refuses_bad_operands(device):
    f32 = dict(device=device, dtype=torch.float32)
    x, w, nw = torch.randn(2, 64, **f32), torch.randn(32, 64, **f32), torch.randn(64, **f32)
    cases = [
        (lambda: gemv(x[None], w), "2-D"),
        (lambda: gemv(x.to(torch.int32), w), "float16/bfloat16/float32"),
        (lambda: gemv(x.t().contiguous().t(), w), "contiguous in its last dimension"),
        (lambda: gemv(x, w[:, :48]), "K = 64"),
        (lambda: gemv(x, w.half()), "dtypes and devices must match"),
        (lambda: gemv(torch.randn(MAX_M + 1, 64, **f32), w), "at most MAX_M"),
        (lambda: gemv(x, w, out=torch.empty(2, 33, **f32)), "out"),
        (lambda: gemv(x, w, out=x[:, :32]), "must not overlap"),
        (lambda: rmsnorm_gemv(x, torch.randn(2, 64, **f32), nw, EPS, w), "needs residual_out"),
        (lambda: rmsnorm_gemv(x, None, nw, EPS, w, residual_out=torch.empty_like(x)), "only with a residual"),
        (lambda: rmsnorm_gemv(x, torch.randn(3, 64, **f32), nw, EPS, w, residual_out=torch.empty_like(x)),
         "residual"),
        (lambda: rmsnorm_gemv(x, torch.randn(2, 64, **f32), nw, EPS, w, residual_out=x), "must not overlap"),
        (lambda: rmsnorm_gemv(x, None, nw[:32], EPS, w), "norm_weight"),
        (lambda: silu_mul_gemv(torch.randn(2, 127, **f32), w), "even"),
        (lambda: silu_mul_gemv(torch.randn(2, 64, **f32), w), "K = 32"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_refuses_cpu_tensors_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="CUDA"):
        gemv(torch.randn(1, 16), torch.randn(8, 16))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
def test_real_shapes_bf16(m):
    """Qwen3-8B decode shapes: qkv (K=4096, N=6144) plain and with the input norm; down (K=12288, N=4096)."""
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    x, r = (_rand(m, 4096, device=dev, dtype=bf16, seed=s) for s in (1, 2))
    nw, w = _rand(4096, device=dev, dtype=bf16, seed=3), _weight(6144, 4096, dev, bf16, seed=4)
    _assert_matmul(gemv(x, w), x, w)
    res_out = torch.empty_like(x)
    got = rmsnorm_gemv(x, r, nw, EPS, w, residual_out=res_out)
    assert torch.equal(res_out, x + r)
    _assert_matmul(got, _eager_norm(x + r, nw), w)
    gate_up = _rand(m, 2 * 12288, device=dev, dtype=bf16, seed=5, scale=2.0)
    w_down = _weight(4096, 12288, dev, bf16, seed=6)
    _assert_matmul(silu_mul_gemv(gate_up, w_down), _eager_silu_mul(gate_up), w_down)
