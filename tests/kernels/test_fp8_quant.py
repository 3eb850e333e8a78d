"""The FP8 per-token quantization kernel against ``quantize_fp8_per_token``, bit for bit."""

from __future__ import annotations

import json

import pytest
import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.fp8_quant import e4m3_round, fp8_quantize_per_token
from mixquant_serve.quant.fp8 import quantize_fp8_per_token

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _bits(t: torch.Tensor) -> torch.Tensor:
    width = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(width)


@triton.jit
def _round_kernel(v_ptr, code_ptr, val_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    code, val = e4m3_round(tl.load(v_ptr + offs, mask=offs < n))
    tl.store(code_ptr + offs, code.to(tl.uint8), mask=offs < n)
    tl.store(val_ptr + offs, val, mask=offs < n)


def _e4m3_probe_values() -> torch.Tensor:
    """Every E4M3 value up to 448, the midpoints between neighbours (ties), the float32 values next to
    those midpoints, values far below the smallest subnormal, signed zeros, and random floats."""
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[:-1].double() + grid[1:].double()) / 2  # exact in float32: one more bit
    mids = mids.float()
    near = torch.cat([torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids + 1)])
    tiny = torch.tensor([2.0**-10, 2.0**-11, 1.5 * 2.0**-10, 2.0**-30, 1e-38, 1e-45, 0.0])
    rand = torch.rand(4000, generator=torch.Generator().manual_seed(0)) ** 8 * 448
    pos = torch.cat([grid, mids, near, tiny, rand]).clamp(max=448.0)
    return torch.cat([pos, -pos])


def test_e4m3_round_matches_torch_cast(device):
    v = _e4m3_probe_values().to(device)
    code = torch.empty(v.shape, dtype=torch.uint8, device=device)
    val = torch.empty_like(v)
    _round_kernel[(triton.cdiv(v.numel(), 1024),)](v, code, val, v.numel(), BLOCK=1024)
    ref = v.to(torch.float8_e4m3fn)
    assert torch.equal(code, _bits(ref))
    assert torch.equal(_bits(val), _bits(ref.float()))  # the rounded value too, signed zeros included
    nan = torch.tensor([float("nan")], device=device)
    _round_kernel[(1,)](nan, code, val, 1, BLOCK=16)
    assert code[0].item() == 0x7F and torch.isnan(val[0])


def _rows(dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Rows of very different scales plus crafted rows: zeros, signed zeros, ties, huge, tiny."""
    gen = torch.Generator().manual_seed(seed)
    k = 96
    x = torch.randn(12, k, generator=gen) * torch.exp(4 * torch.randn(12, 1, generator=gen))
    x[0] = 0.0
    x[1] = -0.0
    x[1, 7] = 3.0
    # amax 448 gives scale 1: the row holds every E4M3 midpoint in [16, 448] region and subnormal ties
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    mids = ((grid[:-1] + grid[1:]) / 2)[torch.randint(0, 125, (k,), generator=gen)]
    x[2] = mids * torch.where(torch.rand(k, generator=gen) < 0.5, -1.0, 1.0)
    x[2, 0] = 448.0
    x[3] = torch.randn(k, generator=gen) * 1e4  # large
    x[4] = torch.randn(k, generator=gen) * 1e-3  # small
    x[5, :] = 1e-14  # below the 1e-12 amax floor: the floor decides the scale
    return x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_matches_reference(device, dtype):
    x = _rows(dtype, DTYPES.index(dtype)).to(device)
    q, s = fp8_quantize_per_token(x)
    ref_q, ref_s = quantize_fp8_per_token(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape and s.shape == (x.shape[0], 1)
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(_bits(s), _bits(ref_s))


def test_strided_rows_and_nan_row(device):
    big = torch.randn(6, 160, generator=torch.Generator().manual_seed(3)) * 5
    big[4, 25] = float("nan")
    x = big[:, 16:144].to(device)  # row stride 160, unit stride along K
    q, s = fp8_quantize_per_token(x)
    ref_q, ref_s = quantize_fp8_per_token(x)
    assert torch.isnan(s[4]).item() and torch.equal(_bits(s), _bits(ref_s))
    assert torch.equal(_bits(q), _bits(ref_q))


def test_rows_read_in_chunks(device, monkeypatch):
    """Rows longer than one chunk (K > 8192 on the GPU; forced small here): the two-pass path."""
    from mixquant_serve.kernels import fp8_quant

    monkeypatch.setattr(fp8_quant, "ONE_CHUNK_MAX", 32)
    monkeypatch.setattr(fp8_quant, "CHUNK", 32)
    x = _rows(torch.bfloat16, 7)[:, :80].contiguous().to(device)  # chunks of 32, 32 and 16
    x[6, 75] = float("nan")  # in the last chunk
    q, s = fp8_quantize_per_token(x)
    ref_q, ref_s = quantize_fp8_per_token(x)
    assert torch.isnan(s[6]).item()
    assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(_bits(s), _bits(ref_s))


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("cfg", [{"rows": 4}, {"rows": 2, "programs_per_sm": 1}, {"programs_per_sm": 2}],
                         ids=["rows4", "rows2-persistent", "persistent"])
def test_row_groups_and_persistent_grid(device, monkeypatch, cfg, chunked):
    """Several rows a program (13 rows: no multiple of 2 or 4) and a persistent grid (4 SMs in the interpreter:
    fewer programs than row groups), whole rows in registers or read in chunks: the reference's bits, the
    crafted rows (zeros, ties, below the amax floor) and a NaN row included; a single row too."""
    from mixquant_serve.kernels import fp8_quant

    if chunked:
        monkeypatch.setattr(fp8_quant, "ONE_CHUNK_MAX", 32)
        monkeypatch.setattr(fp8_quant, "CHUNK", 32)
    x = _rows(torch.float32, 9)[:, :80]
    x = torch.cat([x, x[3:4]]).contiguous().to(device)  # chunks of 32, 32 and 16
    x[12, 70] = float("nan")
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"fp8_per_token": cfg}))
    for rows in (x, x[12:]):
        q, s = fp8_quantize_per_token(rows)
        ref_q, ref_s = quantize_fp8_per_token(rows)
        assert torch.equal(_bits(q), _bits(ref_q)) and torch.equal(_bits(s), _bits(ref_s))
    assert torch.isnan(s[0]).item()


def test_rejects_bad_input(device):
    with pytest.raises(ValueError, match="2-D"):
        fp8_quantize_per_token(torch.randn(2, 3, 16, device=device))
    with pytest.raises(ValueError, match="2-D"):
        fp8_quantize_per_token(torch.ones(2, 16, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="unit stride"):
        fp8_quantize_per_token(torch.randn(16, 4, device=device).T)
    assert fp8_quantize_per_token(torch.randn(0, 16, device=device))[0].shape == (0, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_qwen_shapes_match_cpu_reference(dtype):
    gen = torch.Generator().manual_seed(11)
    for t, k in ((1, 4096), (333, 4096), (64, 12288)):
        x = (torch.randn(t, k, generator=gen) * torch.exp(3 * torch.randn(t, 1, generator=gen))).to(dtype)
        q, s = fp8_quantize_per_token(x.cuda())
        ref_q, ref_s = quantize_fp8_per_token(x)
        assert torch.equal(_bits(q).cpu(), _bits(ref_q)) and torch.equal(_bits(s).cpu(), _bits(ref_s))
