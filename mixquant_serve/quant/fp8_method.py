"""FP8 W8A8 linear method: E4M3 weights with per-output-channel scales, per-token dynamic activations.

The BF16 weight is quantized at load time, one shard at a time (per-channel scales make a merged layer
the same as its parts). The GEMM is ``fp8_linear`` (``torch._scaled_mm`` with row-wise scales): the
fast prefill precision on Hopper, which has FP8 but no FP4 tensor cores. On CUDA the layer before
(RMSNorm, GatedAct) quantizes the input in its own kernel when the linear asks (`input_quant`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from mixquant_serve.quant.fp8 import FP8_DTYPE, fp8_linear, fp8_scaled_mm, quantize_fp8_per_channel
from mixquant_serve.quant.methods import FP8_PER_TOKEN, InputQuant, QuantizedActivation, QuantMethod, Shard

if TYPE_CHECKING:
    from mixquant_serve.layers.linear import LinearBase


class FP8Method(QuantMethod):
    precision = "fp8"

    def unsupported(self, layer: LinearBase) -> str | None:
        if layer.device.type == "cuda" and (layer.input_size % 16 or layer.output_size % 16):
            return f"FP8 on CUDA needs in/out features that are multiples of 16, got {layer.input_size}, " \
                   f"{layer.output_size}"
        return None

    def create_weights(self, layer: LinearBase) -> nn.Module:
        impl = nn.Module()
        impl.register_buffer("weight", torch.zeros(layer.output_size, layer.input_size, dtype=FP8_DTYPE,
                                                   device=layer.device))
        impl.register_buffer("weight_scale", torch.zeros(layer.output_size, device=layer.device))
        impl.loaded = set()
        return impl

    def load(self, impl: nn.Module, layer: LinearBase, suffix: str, tensor: torch.Tensor,
             shard: Shard | None) -> bool:
        if suffix != "weight":
            return False
        sh = shard if shard is not None else Shard(0, 0, layer.output_size)
        rows = slice(sh.offset, sh.offset + sh.size)
        want = tuple(impl.weight[rows].shape)
        if want != tuple(tensor.shape):
            raise ValueError(f"weight shape {tuple(tensor.shape)} does not fit {want}")
        impl.weight[rows], impl.weight_scale[rows] = quantize_fp8_per_channel(tensor.to(layer.device))
        impl.loaded.add(sh.index)
        return True

    def missing(self, impl: nn.Module, layer: LinearBase) -> list[str]:
        if len(layer.output_sizes) == 1:
            return [] if impl.loaded else ["weight"]
        return [f"weight[{i}]" for i in range(len(layer.output_sizes)) if i not in impl.loaded]

    def input_quant(self, impl: nn.Module) -> InputQuant:
        return FP8_PER_TOKEN

    def apply(self, impl: nn.Module, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            return fp8_scaled_mm(x.data, x.scale, impl.weight, impl.weight_scale, bias, x.dtype)
        return fp8_linear(x, impl.weight, impl.weight_scale, bias, out_dtype=x.dtype)

    def apply_rows(self, impl: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> torch.Tensor:
        return fp8_linear(x, impl.weight[rows], impl.weight_scale[rows], bias, out_dtype=x.dtype)
