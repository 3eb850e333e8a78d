"""NVFP4 W4A4 linear method: packed E2M1 weights, activations quantized to NVFP4 at run time.

Weights come either from a checkpoint (Model Optimizer's names: ``weight`` uint8 [N, K/2], ``weight_scale``
e4m3 [N, K/16], ``weight_scale_2`` and ``input_scale`` fp32 scalars per projection) or from a BF16
``weight`` quantized at load time. For a merged layer (qkv, gate_up) quantized here, the global scale
comes from the amax of the whole merged weight, as Model Optimizer's exports share ``weight_scale_2``
across q/k/v and gate/up. A checkpoint may give each shard its own ``weight_scale_2``: the GEMM applies
the weight's global scale per output channel, so that stays exact. The activation is quantized once
for the merged GEMM, so it needs one input scale: the largest of the shards' (equal in Model Optimizer
exports; vLLM takes the max too). Without an input scale (quantize-at-load) the scale is dynamic and
per token: ``amax(row) / (6 * 448)`` of each row rounded up to a power of two, so a request's activations
(and the KV they produce) do not depend on the other requests in its batch.

The GEMM (emulated; exact up to float32 accumulation order): both operands dequantized WITHOUT their
global scales (``e2m1 * block_scale`` is exact in bfloat16 and float32), multiplied with float32
accumulation, then multiplied once by ``fl32(input_scale[row] * weight_scale_2[channel])``; this is
``nvfp4_matmul``'s arithmetic. The dequantized weight is cached at load time (float32 on CPU, bfloat16 on
CUDA): 4 (2) bytes per weight instead of 0.5625 packed; the cache is reported apart (``cache_bytes``).
Set MIXQUANT_NVFP4_WEIGHT_CACHE=0 to keep no cache: on CPU the weight is then dequantized per call, on
CUDA the GEMM reads the packed weight and decodes it in registers (``kernels/nvfp4_gemm.py``). On CUDA
the activation is quantized and dequantized by one Triton kernel (``kernels/nvfp4_quant.py``); when the
weight has one global scale (the usual case) the GEMM is cuBLAS's BF16 GEMM on the cached weight with
``alpha`` = that scale (times a static input scale) and the bias in its float32 epilogue, the dynamic
per-token scale being a power of two folded exactly into the activation operand; otherwise (a global scale
per shard) ``kernels/scaled_mm.py`` applies the scales per row and channel in its epilogue. On CPU the
same arithmetic runs in PyTorch.
On Blackwell (sm_100/sm_120) the packed operands go to FP4 tensor cores instead (``nvfp4_blackwell``,
selected by capability; no dequantized weight cache then).

A layer the checkpoint left unquantized (a floating ``weight`` in a quantized checkpoint arrives here
as ``weight_unquantized``) runs as a plain linear in this precision.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch
from torch import nn

from mixquant_serve.quant import nvfp4, nvfp4_blackwell
from mixquant_serve.quant.methods import NVFP4_FOLDED, InputQuant, QuantizedActivation, QuantMethod, Shard

if TYPE_CHECKING:
    from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.quant.nvfp4 import (
    BLOCK_SIZE,
    dequantize_nvfp4_blocks,
    nvfp4_global_scale,
    nvfp4_row_global_scale,
    quantize_nvfp4,
    tensor_amax,
)

_CACHE_ENV = "MIXQUANT_NVFP4_WEIGHT_CACHE"
_SCALAR_SUFFIXES = ("weight_scale_2", "input_scale")


def _shards(layer: LinearBase) -> list[Shard]:
    return [Shard(i, sum(layer.output_sizes[:i]), n) for i, n in enumerate(layer.output_sizes)]


def _shard_of(layer: LinearBase, shard: Shard | None) -> Shard:
    return shard if shard is not None else Shard(0, 0, layer.output_size)


class NVFP4Method(QuantMethod):
    precision = "nvfp4"

    def unsupported(self, layer: LinearBase) -> str | None:
        if layer.input_size % BLOCK_SIZE:
            return f"NVFP4 needs in_features to be a multiple of {BLOCK_SIZE}, got {layer.input_size}"
        return None

    def create_weights(self, layer: LinearBase) -> nn.Module:
        n, k, s = layer.output_size, layer.input_size, len(layer.output_sizes)
        kw = dict(device=layer.device)
        impl = nn.Module()
        impl.register_buffer("weight", torch.zeros(n, -(-k // 2), dtype=torch.uint8, **kw))
        impl.register_buffer("weight_scale", torch.zeros(n, -(-k // BLOCK_SIZE), dtype=torch.float8_e4m3fn,
                                                         **kw))
        impl.register_buffer("weight_scale_2", torch.full((s,), float("nan"), **kw))  # per shard
        impl.register_buffer("input_scale", torch.full((s,), float("nan"), **kw))  # per shard
        impl.loaded = set()  # (suffix, shard index) pairs seen
        impl.staged = None  # floating weight [N, K] waiting for all shards (quantize-at-load)
        impl.dense = None  # floating weight of a layer the checkpoint left unquantized
        impl.channel_scale = None  # float32 [N] weight global scale per output channel
        impl.x_scale = None  # static input global scale (0-d float32) or None: dynamic
        impl.cache = None  # dequantized blocks [N, K] (no global scale), float32 or bfloat16
        impl.alpha = None  # one float32 factor for all of the GEMM's output (see _alpha), or None
        impl.dtype = layer.dtype  # the activations'; the cuBLAS path is for bfloat16 models
        impl.native = None  # Blackwell: the weight as FP4 tensor-core operands (nvfp4_blackwell.NativeWeight)
        return impl

    # -- loading ------------------------------------------------------------------------------------
    def load(self, impl: nn.Module, layer: LinearBase, suffix: str, tensor: torch.Tensor,
             shard: Shard | None) -> bool:
        sh = _shard_of(layer, shard)
        if suffix == "weight" and tensor.is_floating_point():
            self._stage(impl, layer, sh, tensor)  # quantize-at-load once every shard is here
            return True
        if suffix == "weight_unquantized":
            impl.dense = self._dense_rows(impl, layer, sh, tensor)
        elif suffix in ("weight", "weight_scale"):
            self._copy_rows(getattr(impl, suffix), sh, tensor, suffix)
        elif suffix in _SCALAR_SUFFIXES:
            if tensor.numel() != 1:
                raise ValueError(f"{suffix} must hold one value, got shape {tuple(tensor.shape)}")
            getattr(impl, suffix)[sh.index] = tensor.reshape(()).float()
        else:
            return False
        impl.loaded.add((suffix, sh.index))
        return True

    @staticmethod
    def _copy_rows(dst: torch.Tensor, sh: Shard, tensor: torch.Tensor, suffix: str) -> None:
        rows = dst[sh.offset : sh.offset + sh.size]
        if tuple(rows.shape) != tuple(tensor.shape) or tensor.dtype != dst.dtype:
            raise ValueError(f"{suffix}: checkpoint has {tuple(tensor.shape)} {tensor.dtype}, "
                             f"NVFP4 expects {tuple(rows.shape)} {dst.dtype}")
        rows.copy_(tensor)

    @staticmethod
    def _dense_rows(impl: nn.Module, layer: LinearBase, sh: Shard, tensor: torch.Tensor) -> torch.Tensor:
        dense = impl.dense
        if dense is None:
            dense = torch.empty(layer.output_size, layer.input_size, dtype=layer.dtype, device=layer.device)
        NVFP4Method._copy_rows(dense, sh, tensor.to(layer.dtype), "weight")
        return dense

    def _stage(self, impl: nn.Module, layer: LinearBase, sh: Shard, tensor: torch.Tensor) -> None:
        if impl.staged is None:
            impl.staged = torch.empty(layer.output_size, layer.input_size, dtype=tensor.dtype,
                                      device=layer.device)
        self._copy_rows(impl.staged, sh, tensor, "weight")
        impl.loaded.add(("staged", sh.index))
        if all(("staged", s.index) in impl.loaded for s in _shards(layer)):
            self._quantize_staged(impl, layer)

    @staticmethod
    def _quantize_staged(impl: nn.Module, layer: LinearBase) -> None:
        """The whole merged weight has arrived: one global scale from its amax, shared by every shard."""
        w, impl.staged = impl.staged, None
        scale = nvfp4_global_scale(tensor_amax(w))
        impl.weight, impl.weight_scale = quantize_nvfp4(w, scale)
        impl.weight_scale_2.fill_(scale.item())
        for s in _shards(layer):
            impl.loaded.update({("weight", s.index), ("weight_scale", s.index), ("weight_scale_2", s.index)})

    def missing(self, impl: nn.Module, layer: LinearBase) -> list[str]:
        names = {0: ""} if len(layer.output_sizes) == 1 else {s.index: f"[{s.index}]" for s in _shards(layer)}
        if any(("weight_unquantized", i) in impl.loaded for i in names):
            needed = ("weight_unquantized",)
        else:
            needed = ("weight", "weight_scale", "weight_scale_2")
        return [f"{sfx}{tag}" for sfx in needed for i, tag in names.items() if (sfx, i) not in impl.loaded]

    def process_after_loading(self, impl: nn.Module, layer: LinearBase) -> None:
        missing = self.missing(impl, layer)
        if missing or impl.staged is not None:
            raise ValueError(f"NVFP4 weights incomplete: missing {missing or 'shards of the BF16 weight'}")
        if impl.dense is not None:  # left unquantized by the checkpoint: drop the unused NVFP4 buffers
            for name in ("weight", "weight_scale"):
                setattr(impl, name, getattr(impl, name)[:0])
            return
        sizes = torch.tensor(layer.output_sizes, device=layer.device)
        impl.channel_scale = impl.weight_scale_2.repeat_interleave(sizes)
        given = [i for i in range(len(layer.output_sizes)) if ("input_scale", i) in impl.loaded]
        if given:
            impl.x_scale = impl.input_scale[given].max()
        if nvfp4_blackwell.available(layer.device) and nvfp4_blackwell.fits(layer.input_size, layer.output_size):
            impl.native = nvfp4_blackwell.prepare_weight(impl.weight, impl.weight_scale)
        elif os.environ.get(_CACHE_ENV, "1") != "0":
            operand = _operand_dtype(layer.device)
            impl.cache = dequantize_nvfp4_blocks(impl.weight, impl.weight_scale, dtype=operand)
            impl.alpha = _alpha(impl)

    # -- running ------------------------------------------------------------------------------------
    def input_quant(self, impl: nn.Module) -> InputQuant | None:
        """The cuBLAS path with the dynamic scale takes its operand from the producing norm or activation."""
        return NVFP4_FOLDED if impl.alpha is not None and impl.x_scale is None else None

    def apply(self, impl: nn.Module, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor:
        return self._apply(impl, x, bias, slice(None))

    def apply_rows(self, impl: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> torch.Tensor:
        if impl.native is not None:  # Blackwell's swizzled block scales do not slice by rows
            return super().apply_rows(impl, x, bias, rows)
        return self._apply(impl, x, bias, rows)

    def _apply(self, impl: nn.Module, x: torch.Tensor | QuantizedActivation, bias: torch.Tensor | None,
               sl: slice) -> torch.Tensor:
        """The GEMM over the weight's output rows `sl` (all of them for `apply`); bias: those rows'."""
        if isinstance(x, QuantizedActivation):  # NVFP4_FOLDED, made by the producer on CUDA
            rows = x.data.reshape(-1, x.data.shape[-1])
            return self._folded_mm(impl, rows, bias, sl).reshape(*x.data.shape[:-1], -1)
        if impl.dense is not None:
            return torch.nn.functional.linear(x, impl.dense[sl], bias)
        k = x.shape[-1]
        rows = x.reshape(-1, k)
        n = impl.weight[sl].shape[0]
        if rows.shape[0] == 0:
            return x.new_empty(*x.shape[:-1], n)
        if rows.is_cuda:
            return self._apply_cuda(impl, rows.contiguous(), bias, sl).reshape(*x.shape[:-1], n)
        x_scale = impl.x_scale if impl.x_scale is not None else nvfp4_row_global_scale(rows)
        out = self._gemm(impl, rows, x_scale, sl)
        out *= x_scale * impl.channel_scale[sl]  # [T, 1] or scalar times [N]: one float32 product per element
        if bias is not None:
            out += bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], n)

    @staticmethod
    def _apply_cuda(impl: nn.Module, rows: torch.Tensor, bias: torch.Tensor | None, sl: slice) -> torch.Tensor:
        """Triton: fused activation quant-dequant, then the GEMM with global scales and bias in its epilogue."""
        from mixquant_serve.kernels.nvfp4_gemm import nvfp4_gemm
        from mixquant_serve.kernels.nvfp4_quant import nvfp4_quantize, nvfp4_quantize_dequantize
        from mixquant_serve.kernels.scaled_mm import scaled_mm

        if impl.native is not None:  # Blackwell: FP4 tensor cores on the packed operands (all rows: apply_rows)
            packed, scales, x_scale = nvfp4_quantize(rows, impl.x_scale)
            return nvfp4_blackwell.native_mm(packed, scales, impl.native, x_scale, impl.channel_scale, bias,
                                             rows.dtype)

        if impl.alpha is not None:  # cuBLAS, scales folded or in alpha (a bfloat16 model)
            x_op, _ = nvfp4_quantize_dequantize(rows, impl.x_scale, fold_global=impl.x_scale is None)
            return NVFP4Method._folded_mm(impl, x_op, bias, sl)
        x_blocks, x_scale = nvfp4_quantize_dequantize(rows, impl.x_scale, out_dtype=torch.bfloat16)
        if impl.cache is None:  # the packed weight, decoded tile by tile in the GEMM
            return nvfp4_gemm(x_blocks, impl.weight[sl], impl.weight_scale[sl], x_scale, impl.channel_scale[sl],
                              bias, out_dtype=rows.dtype)
        return scaled_mm(x_blocks, impl.cache[sl], x_scale, impl.channel_scale[sl], bias, out_dtype=rows.dtype)

    @staticmethod
    def _folded_mm(impl: nn.Module, x_op: torch.Tensor, bias: torch.Tensor | None, sl: slice) -> torch.Tensor:
        """cuBLAS on the exact operands: the activation's scale folded in (or, static, in alpha with the
        weight's), float32 accumulation, ``alpha`` and the bias in the float32 epilogue, one rounding."""
        w = impl.cache[sl]
        if bias is None:
            return torch.addmm(x_op.new_zeros(()), x_op, w.T, beta=0, alpha=impl.alpha)
        return torch.addmm(bias, x_op, w.T, alpha=impl.alpha)

    @staticmethod
    def _gemm(impl: nn.Module, rows: torch.Tensor, x_scale: torch.Tensor, sl: slice) -> torch.Tensor:
        """float32 ``x_blocks @ w_blocks^T`` without global scales (the emulated FP4 tensor-core GEMM)."""
        operand = _operand_dtype(rows.device)
        x_blocks = dequantize_nvfp4_blocks(*quantize_nvfp4(rows, x_scale), dtype=operand)
        w_blocks = impl.cache[sl] if impl.cache is not None else None
        if w_blocks is None:
            w_blocks = dequantize_nvfp4_blocks(impl.weight[sl], impl.weight_scale[sl], dtype=operand)
        return nvfp4._mm_float32(x_blocks, w_blocks.T)

    # -- memory -------------------------------------------------------------------------------------
    def weight_bytes(self, impl: nn.Module) -> int:
        dense = 0 if impl.dense is None else impl.dense.numel() * impl.dense.element_size()
        return dense + sum(t.numel() * t.element_size() for t in impl.buffers())

    def cache_bytes(self, impl: nn.Module) -> int:
        if impl.native is not None:  # the FP4 operand is a view of the packed weight; the scales are a copy
            return impl.native.scales.numel()
        return 0 if impl.cache is None else impl.cache.numel() * impl.cache.element_size()


def _alpha(impl: nn.Module) -> float | None:
    """The GEMM's one output factor when the weight has one global scale: that scale, times a static input
    scale as float32 (the dynamic per-token scale is folded into the activation instead); else None."""
    ws = impl.weight_scale_2
    if (impl.cache is None or impl.cache.device.type != "cuda" or impl.dtype != torch.bfloat16
            or not bool((ws == ws[0]).all())):
        return None
    return float(ws[0] if impl.x_scale is None else impl.x_scale.float() * ws[0])


def _operand_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA (the Triton GEMM's operands), else float32: both hold the operands exactly."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
