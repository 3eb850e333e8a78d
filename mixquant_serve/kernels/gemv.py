"""Small-M GEMV with its producer fused into the prologue (Triton): ``a @ weight.T`` for 1..MAX_M rows.

Decode at a small batch is memory-bound: the weight ``[N, K]`` (nn.Linear layout) is read once and the activation
rows are tiny. Each program owns BLOCK_N output columns for all rows and streams its weight rows over K in
BLOCK_K steps (coalesced along K), accumulating in float32; there is no split-K, so results are deterministic.
The activation tile ``a`` of each K step is made in the prologue, rounded to the input dtype exactly as the
separate kernel would write it:

- ``gemv``: ``a = x``.
- ``rmsnorm_gemv``: ``a = rmsnorm(x + residual)`` with ``kernels/rmsnorm.py``'s arithmetic (the 16-bit sum
  ``h = x + residual``, float32 statistics, the normalized value rounded, then times the norm weight, rounded
  again). Every program first computes the rows' sum of squares itself (a pass over ``x`` and ``residual``,
  which stay in L2); program 0 alone writes ``h`` to ``residual_out``. The float32 sum runs in another order
  than ``kernels/rmsnorm.py``'s, so an element of ``a`` may differ from its output in the last bit.
- ``silu_mul_gemv``: ``a = silu(gate) * up`` per K step with ``kernels/silu_mul.py``'s arithmetic.

The product is a tensor-core ``tl.dot`` of the rows (a power of two; Triton pads fewer than 16) by the weight
tile, pipelined over ``num_stages`` weight tiles; the operand's inputs are loaded one K step ahead. float32
operands use IEEE products (never TF32).

MAX_M is a speed limit, not a correctness one: on one H200 (CUDA graphs, bfloat16, Qwen3-8B's four decode GEMMs;
benchmarks/RESULTS.md) the fused kernels beat the separate producer + cuBLAS by ~8 us a layer at M = 1, were
~5 us slower at M = 4 and up to 3x slower at M = 16 (untuned). Above MAX_M rows the caller uses cuBLAS.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mixquant_serve.kernels.fp8_quant import check_triton_device

MAX_M = 4  # rows; more go to cuBLAS (see the module's docstring)
WIDE_N = 16384  # from this many output columns, default_launch takes 64 columns a program
STATS_ELEMS = 2048  # elements per warp and step of the RMSNorm statistics pass (of each of x, residual)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PLAIN, _RMSNORM, _SILU_MUL = 0, 1, 2  # the prologue


class GemvLaunch(NamedTuple):
    """Launch parameters: output columns per program, K per step, warps, software-pipeline stages."""

    block_n: int = 32
    block_k: int = 512
    num_warps: int = 4
    num_stages: int = 3


@triton.jit
def _load_inputs(x_ptr, res_ptr, nw_ptr, rows, x_stride, res_stride, k0, K, PROLOGUE: tl.constexpr,
                 HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr):
    """What the operand of K step [k0, k0 + BLOCK_K) is made of, 0 past K: ``(x, residual, norm weight)`` for
    RMSNorm, ``(gate, up, -)`` for SiLU-mul, ``(x, -, -)`` plain; unused slots repeat x."""
    ks = k0 + tl.arange(0, BLOCK_K)
    mask = (ks < K)[None, :]
    offs = rows[:, None] * x_stride + ks[None, :]
    first = tl.load(x_ptr + offs, mask=mask, other=0.0)
    second, nw = first, first
    if PROLOGUE == 2:
        second = tl.load(x_ptr + offs + K, mask=mask, other=0.0)
    elif HAS_RES:
        second = tl.load(res_ptr + rows[:, None] * res_stride + ks[None, :], mask=mask, other=0.0)
    if PROLOGUE == 1:
        nw = tl.load(nw_ptr + ks[None, :], mask=mask, other=0.0)
    return first, second, nw


@triton.jit
def _residual_sum(x, res, HAS_RES: tl.constexpr):
    """``x + residual`` rounded to x's dtype, as PyTorch adds two 16-bit tensors."""
    if HAS_RES:
        return (x.to(tl.float32) + res.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _operand(first, second, nw, rstd, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr):
    """The activation tile from _load_inputs' tuple, rounded at each step as the separate kernels round."""
    if PROLOGUE == 2:  # kernels/silu_mul.py: silu in float32 rounded, then the product rounded
        g = first.to(tl.float32)
        act = (g / (1.0 + tl.exp(-g))).to(first.dtype)
        return (act.to(tl.float32) * second.to(tl.float32)).to(first.dtype)
    a = _residual_sum(first, second, HAS_RES)
    if PROLOGUE == 1:  # kernels/rmsnorm.py: normalized in float32 and rounded, times the weight, rounded
        normed = (a.to(tl.float32) * rstd[:, None]).to(a.dtype)
        a = (nw.to(tl.float32) * normed.to(tl.float32)).to(a.dtype)
    return a


@triton.jit
def _rms_rstd(x_ptr, res_ptr, res_out_ptr, rows, K, x_stride, res_stride, res_out_stride, eps, res_rows,
              HAS_RES: tl.constexpr, BLOCK_M: tl.constexpr, STATS_K: tl.constexpr):
    """``rsqrt(mean(h**2) + eps)`` per row in float32, ``[BLOCK_M]``, with ``h = x + residual``; stores the first
    res_rows rows of h to res_out. Wide steps (a row of 4096 in one or two): few round trips before the weights
    stream."""
    out_rows = tl.arange(0, BLOCK_M)
    sq = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, STATS_K):
        x, res, _ = _load_inputs(x_ptr, res_ptr, x_ptr, rows, x_stride, res_stride, k0, K, 0, HAS_RES, STATS_K)
        h = _residual_sum(x, res, HAS_RES)
        if HAS_RES:
            ks = k0 + tl.arange(0, STATS_K)
            tl.store(res_out_ptr + out_rows[:, None] * res_out_stride + ks[None, :], h,
                     mask=(out_rows < res_rows)[:, None] & (ks < K)[None, :])
        hf = h.to(tl.float32)
        sq += tl.sum(hf * hf, axis=1)
    return tl.math.rsqrt(sq / K + eps)


@triton.jit
def _gemv_kernel(x_ptr, res_ptr, nw_ptr, res_out_ptr, w_ptr, out_ptr, M, N, K, x_stride, res_stride,
                 res_out_stride, w_stride, out_stride, eps, PROLOGUE: tl.constexpr, HAS_RES: tl.constexpr,
                 IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 STATS_K: tl.constexpr):
    pid = tl.program_id(0)
    # rows past M read row M - 1 and columns past N read weight row N - 1 (in bounds, no mask); never stored
    rows = tl.minimum(tl.arange(0, BLOCK_M), M - 1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = w_ptr + tl.minimum(cols, N - 1).to(tl.int64)[:, None] * w_stride
    rstd = tl.zeros([BLOCK_M], tl.float32)
    if PROLOGUE == 1:
        rstd = _rms_rstd(x_ptr, res_ptr, res_out_ptr, rows, K, x_stride, res_stride, res_out_stride, eps,
                         tl.where(pid == 0, M, 0), HAS_RES, BLOCK_M, STATS_K)  # program 0 writes h
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # the operand's inputs are loaded one step ahead (registers): the prologue's arithmetic stands between
    # them and the dot, so the compiler's pipelining (which streams the weight tiles) does not cover them
    first, second, nw = _load_inputs(x_ptr, res_ptr, nw_ptr, rows, x_stride, res_stride, 0, K, PROLOGUE, HAS_RES,
                                     BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        nxt = _load_inputs(x_ptr, res_ptr, nw_ptr, rows, x_stride, res_stride, k0 + BLOCK_K, K, PROLOGUE,
                           HAS_RES, BLOCK_K)
        ks = k0 + tl.arange(0, BLOCK_K)
        w = tl.load(w_rows + ks[None, :], mask=(ks < K)[None, :], other=0.0)
        a = _operand(first, second, nw, rstd, PROLOGUE, HAS_RES)
        acc = tl.dot(a, tl.trans(w), acc, input_precision="ieee") if IEEE else tl.dot(a, tl.trans(w), acc)
        first, second, nw = nxt
    out_rows = tl.arange(0, BLOCK_M)
    tl.store(out_ptr + out_rows[:, None] * out_stride + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(out_rows < M)[:, None] & (cols < N)[None, :])


def default_launch(m: int, n: int, k: int) -> GemvLaunch:
    """The launch parameters for ``m`` rows of a ``[n, k]`` weight: the fastest in CUDA graphs on one H200
    (bfloat16, M = 1 and 4, Qwen3-8B's decode shapes; `benchmarks/gemv_speed.py --configs`). Wide weights take
    64 columns a program: a third fewer programs, each of which repeats the RMSNorm statistics."""
    return GemvLaunch(64, 256) if n >= WIDE_N else GemvLaunch()


def _check_matrix(t: torch.Tensor, name: str) -> None:
    if t.dim() != 2 or t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be a 2-D float16/bfloat16/float32 tensor, got {tuple(t.shape)} {t.dtype}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {t.stride()}")


def _check_operands(a: torch.Tensor, name: str, weight: torch.Tensor, k: int, *others: torch.Tensor) -> None:
    """a [M, *] (already checked as a matrix) and weight [N, k]: one dtype and device, M <= MAX_M; `others` on
    a's dtype and device too."""
    _check_matrix(weight, "weight")
    if weight.shape[1] != k:
        raise ValueError(f"weight {tuple(weight.shape)} does not fit {name} {tuple(a.shape)}: want K = {k}")
    if a.shape[0] > MAX_M:
        raise ValueError(f"{name} has {a.shape[0]} rows; the GEMV takes at most MAX_M = {MAX_M} (use cuBLAS)")
    for t in (weight, *others):
        if t.dtype != a.dtype or t.device != a.device:
            raise ValueError(f"dtypes and devices must match: {name} is {a.dtype} on {a.device}, "
                             f"got {t.dtype} on {t.device}")
    check_triton_device(a)


def _output(out: torch.Tensor | None, like: torch.Tensor, n: int, inputs: list[torch.Tensor]) -> torch.Tensor:
    if out is None:
        return torch.empty(like.shape[0], n, dtype=like.dtype, device=like.device)
    _check_matrix(out, "out")
    if out.shape != (like.shape[0], n) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} on {out.device}: want ({like.shape[0]}, {n}) "
                         f"{like.dtype} on {like.device}")
    if any(_overlaps(out, t) for t in inputs):
        raise ValueError("out must not overlap the inputs (other programs still read them)")
    return out


def _extent(t: torch.Tensor) -> tuple[int, int]:
    """The byte range a 2-D tensor with unit last stride spans."""
    start = t.data_ptr()
    return start, start + ((t.shape[0] - 1) * t.stride(0) + t.shape[1]) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    (a0, a1), (b0, b1) = _extent(a), _extent(b)
    return a.numel() > 0 and b.numel() > 0 and a0 < b1 and b0 < a1


def _stats_block(k: int, block_m: int, num_warps: int) -> int:
    """Columns per step of the RMSNorm statistics pass: STATS_ELEMS per warp over the rows, at most the row."""
    return max(16, min(triton.next_power_of_2(k), STATS_ELEMS * num_warps // block_m))


def _launch(prologue: int, x: torch.Tensor, weight: torch.Tensor, k: int, out: torch.Tensor | None,
            launch: GemvLaunch | None, res: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
            res_out: torch.Tensor | None = None, eps: float = 0.0) -> torch.Tensor:
    m, n = x.shape[0], weight.shape[0]
    out = _output(out, x, n, [t for t in (x, weight, res, res_out) if t is not None])
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = launch or default_launch(m, n, k)
    block_m = triton.next_power_of_2(m)  # tl.dot pads a tile of fewer than 16 rows for the tensor cores
    res_t = x if res is None else res  # unused pointers get x
    res_out_t = x if res_out is None else res_out
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, res_t, x if norm_weight is None else norm_weight, res_out_t, weight, out, m, n, k, x.stride(0),
        res_t.stride(0), res_out_t.stride(0), weight.stride(0), out.stride(0), eps, PROLOGUE=prologue,
        HAS_RES=res is not None, IEEE=x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, STATS_K=_stats_block(k, block_m, cfg.num_warps), num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out


def gemv(x: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None,
         launch: GemvLaunch | None = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T -> [M, N]`` in x's dtype, float32 accumulation; M <= MAX_M."""
    _check_matrix(x, "x")
    _check_operands(x, "x", weight, x.shape[1])
    return _launch(_PLAIN, x, weight, x.shape[1], out, launch)


def rmsnorm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                 weight: torch.Tensor, *, residual_out: torch.Tensor | None = None,
                 out: torch.Tensor | None = None, launch: GemvLaunch | None = None) -> torch.Tensor:
    """``rmsnorm(x + residual) @ weight.T -> [M, N]``; ``residual_out [M, K]`` receives ``x + residual``.

    The norm is ``kernels/rmsnorm.py``'s (norm_weight [K], eps). With a residual, ``residual_out`` is required
    and must not overlap ``x`` or ``residual`` (other programs still read them while program 0 writes it).
    """
    _check_matrix(x, "x")
    k = x.shape[1]
    _check_operands(x, "x", weight, k, norm_weight)
    if norm_weight.shape != (k,) or (k > 1 and norm_weight.stride(0) != 1):
        raise ValueError(f"norm_weight {tuple(norm_weight.shape)} must be a contiguous vector of {k}")
    if residual is None:
        if residual_out is not None:
            raise ValueError("residual_out is written only with a residual")
        return _launch(_RMSNORM, x, weight, k, out, launch, norm_weight=norm_weight, eps=eps)
    if residual_out is None:
        raise ValueError("a residual needs residual_out, the buffer that receives x + residual")
    for name, t in (("residual", residual), ("residual_out", residual_out)):
        _check_matrix(t, name)
        if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} on {t.device} does not match x "
                             f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if _overlaps(residual_out, x) or _overlaps(residual_out, residual):
        raise ValueError("residual_out must not overlap x or residual (other programs still read them)")
    return _launch(_RMSNORM, x, weight, k, out, launch, residual, norm_weight, residual_out, eps)


def silu_mul_gemv(gate_up: torch.Tensor, weight: torch.Tensor, *, out: torch.Tensor | None = None,
                  launch: GemvLaunch | None = None) -> torch.Tensor:
    """``(silu(gate) * up) @ weight.T -> [M, N]`` with ``gate_up [M, 2*I]`` (gate first) and weight ``[N, I]``.

    The product is rounded as ``kernels/silu_mul.py`` (eager PyTorch) rounds it, then multiplied.
    """
    _check_matrix(gate_up, "gate_up")
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up needs an even last dimension, got {gate_up.shape[1]}")
    _check_operands(gate_up, "gate_up", weight, gate_up.shape[1] // 2)
    return _launch(_SILU_MUL, gate_up, weight, gate_up.shape[1] // 2, out, launch)
