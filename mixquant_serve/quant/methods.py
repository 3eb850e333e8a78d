"""The quantization-method interface: how a linear layer holds, loads and applies weights in one precision.

A linear layer holds one method (and one parameter module) per precision the engine runs; the forward
context says which precision the current phase uses. Model files therefore contain no precision branches.
Methods are registered by name and imported lazily by `create_quant_method`.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from mixquant_serve.kernels.tuning import config

if TYPE_CHECKING:
    from mixquant_serve.layers.linear import LinearBase


class Shard(NamedTuple):
    """Where a checkpoint tensor goes in a merged layer: output rows [offset, offset + size)."""

    index: int
    offset: int
    size: int


class InputQuant(NamedTuple):
    """How a linear's method wants its input quantized by the layer that produces it, fused there.

    ``kind`` names the format; a format with parameters (e.g. a static input scale) adds them as fields.
    A producer without a fused kernel for the kind (or off CUDA) passes the plain tensor, which every
    method must still take.
    """

    kind: str


# E4M3 codes and float32 scales per token, as kernels/fp8_quant.py's fp8_quantize_per_token gives them
FP8_PER_TOKEN = InputQuant("fp8_per_token")
# the NVFP4 operand with the per-token power-of-two scale folded in, in the activation's dtype, and those
# scales, as kernels/nvfp4_quant.py's nvfp4_quantize_dequantize(x, fold_global=True) gives them
NVFP4_FOLDED = InputQuant("nvfp4_folded")


# the producer's own inputs instead of its output (DeferredRMSNorm, DeferredSiluMul), for a small-batch GEMV that
# computes the producer in its prologue (kernels/gemv.py); producers defer only where `small_batch_gemv` says
GEMV_PROLOGUE = InputQuant("gemv_prologue")


class DeferredRMSNorm(NamedTuple):
    """``rmsnorm(x + residual)`` not yet computed: the GEMV's prologue computes it and writes ``x + residual`` to
    ``residual_out`` (which the producer already returned as the new residual stream)."""

    x: torch.Tensor
    residual: torch.Tensor | None
    weight: torch.Tensor
    eps: float
    residual_out: torch.Tensor | None


class DeferredSiluMul(NamedTuple):
    """``silu(gate) * up`` of a merged ``gate_up [T, 2I]``, not yet computed."""

    gate_up: torch.Tensor


_graph_warmup = False


@contextmanager
def graph_warmup() -> Iterator[None]:
    """Around the eager warm-up forward before a CUDA-graph capture: it takes the paths the capture will (so
    their kernels compile outside it)."""
    global _graph_warmup
    prev, _graph_warmup = _graph_warmup, True
    try:
        yield
    finally:
        _graph_warmup = prev


def small_batch_gemv(x: torch.Tensor) -> bool:
    """Whether a 16-bit linear on ``x [T, K]`` runs kernels/gemv.py (its producer fused): T at most the "gemv"
    max_rows of kernels/tuning.py, on CUDA (or Triton's interpreter), and, unless graph_only is 0, only inside a
    CUDA graph (its capture or `graph_warmup`: eagerly its launches cost more than cuBLAS's)."""
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    cfg = config("gemv")
    if not 0 < x.shape[0] <= cfg["max_rows"]:
        return False
    in_graph = _graph_warmup or (x.is_cuda and torch.cuda.is_current_stream_capturing())
    if not cfg["graph_only"] or in_graph:
        return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return False


class QuantizedActivation(NamedTuple):
    """A linear's input already quantized by its producer (RMSNorm, GatedAct) as its `InputQuant` asked.

    For FP8_PER_TOKEN: ``data [..., K]`` float8_e4m3fn and ``scale [..., 1]`` float32, both contiguous;
    for NVFP4_FOLDED: ``data [..., K]`` the folded NVFP4 operand in ``dtype`` and ``scale`` the folded scales.
    ``dtype`` is the activation's own dtype (e.g. bfloat16), which the linear's output takes.
    """

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype


class QuantMethod(ABC):
    precision: str

    @abstractmethod
    def create_weights(self, layer: LinearBase) -> nn.Module:
        """A module holding this precision's parameters for `layer` (shapes from layer's sizes)."""

    @abstractmethod
    def load(self, impl: nn.Module, layer: LinearBase, suffix: str, tensor: torch.Tensor,
             shard: Shard | None) -> bool:
        """Take one checkpoint tensor (`suffix` e.g. "weight", "weight_scale"); False if not ours."""

    def unsupported(self, layer: LinearBase) -> str | None:
        """Why this method cannot hold `layer` (e.g. a shape the format cannot take), or None."""
        return None

    def missing(self, impl: nn.Module, layer: LinearBase) -> list[str]:
        """Tensors still to load, e.g. ["weight_scale[1]"]; the loader checks this for quantized layers."""
        return []

    def process_after_loading(self, impl: nn.Module, layer: LinearBase) -> None:
        """Finish the weights once every tensor is loaded (e.g. quantize a staged BF16 weight)."""
        return None

    @abstractmethod
    def apply(self, impl: nn.Module, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor:
        """y = x @ W^T (+ bias) for x of shape [T, in_features].

        x is a QuantizedActivation only if `input_quant` asked for one (and the producer could fuse it).
        """

    def apply_rows(self, impl: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> torch.Tensor:
        """Output columns `rows` of `apply` (bias: already those rows'); methods that can restrict their
        GEMM to those weight rows override this."""
        full = self.apply(impl, x, None)[..., rows]
        return full if bias is None else full + bias

    def input_quant(self, impl: nn.Module) -> InputQuant | None:
        """The input this method would take quantized from the layer before (on CUDA), or None: plain x."""
        return None

    def weight_bytes(self, impl: nn.Module) -> int:
        """Bytes of the weights in their stored format (packed data and scales for a quantized method)."""
        tensors = list(impl.parameters()) + list(impl.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def cache_bytes(self, impl: nn.Module) -> int:
        """Bytes of run-time copies kept beside the weights (e.g. dequantized weights of an emulated GEMM)."""
        return 0


class Unquantized(QuantMethod):
    """BF16 (or the model dtype): the weight as stored."""

    precision = "bf16"

    def create_weights(self, layer: LinearBase) -> nn.Module:
        impl = nn.Module()
        impl.weight = nn.Parameter(
            torch.empty(layer.output_size, layer.input_size, dtype=layer.dtype, device=layer.device),
            requires_grad=False,
        )
        return impl

    def load(self, impl: nn.Module, layer: LinearBase, suffix: str, tensor: torch.Tensor,
             shard: Shard | None) -> bool:
        if suffix != "weight":
            return False
        dst = impl.weight if shard is None else impl.weight[shard.offset : shard.offset + shard.size]
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"weight shape {tuple(tensor.shape)} does not fit {tuple(dst.shape)}")
        dst.copy_(tensor)
        return True

    def apply(self, impl: nn.Module, x: torch.Tensor | DeferredRMSNorm | DeferredSiluMul,
              bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, DeferredRMSNorm | DeferredSiluMul) or small_batch_gemv(x):
            return self._gemv(impl, x, bias)
        return torch.nn.functional.linear(x, impl.weight, bias)

    @staticmethod
    def _gemv(impl: nn.Module, x: torch.Tensor | DeferredRMSNorm | DeferredSiluMul,
              bias: torch.Tensor | None) -> torch.Tensor:
        from mixquant_serve.kernels.gemv import gemv, rmsnorm_gemv, silu_mul_gemv

        if isinstance(x, DeferredRMSNorm):
            out = rmsnorm_gemv(x.x, x.residual, x.weight, x.eps, impl.weight, residual_out=x.residual_out)
        elif isinstance(x, DeferredSiluMul):
            out = silu_mul_gemv(x.gate_up, impl.weight)
        else:
            out = gemv(x, impl.weight)
        return out if bias is None else out + bias

    def input_quant(self, impl: nn.Module) -> InputQuant:
        return GEMV_PROLOGUE

    def apply_rows(self, impl: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, rows: slice) -> torch.Tensor:
        return torch.nn.functional.linear(x, impl.weight[rows], bias)


_REGISTRY: dict[str, str] = {
    "bf16": "mixquant_serve.quant.methods:Unquantized",
    "nvfp4": "mixquant_serve.quant.nvfp4_method:NVFP4Method",
    "fp8": "mixquant_serve.quant.fp8_method:FP8Method",
}


def register_quant_method(precision: str, target: str) -> None:
    """target is "module:Class"; the module is imported only when the precision is used."""
    _REGISTRY[precision] = target


def create_quant_method(precision: str) -> QuantMethod:
    if precision not in _REGISTRY:
        raise ValueError(f"unknown precision {precision!r}; known: {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[precision].split(":")
    return getattr(importlib.import_module(module), cls)()
