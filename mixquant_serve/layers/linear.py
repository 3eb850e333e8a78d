"""Linear layers with column-/row-parallel shapes (tensor parallelism of size 1 for now).

Each layer holds one quantization method and parameter module per precision in use; `forward` applies
the one the forward context names. The bias (if any) is shared across precisions. `input_quant` tells the
layer before what input the method takes pre-quantized (e.g. FP8 per token from a fused RMSNorm).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mixquant_serve.layers.forward_context import get_forward_context
from mixquant_serve.quant.methods import InputQuant, QuantizedActivation, QuantMethod, Shard, create_quant_method


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool, precisions: Sequence[str],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.dtype, self.device = dtype, torch.device(device)
        self.bias = (nn.Parameter(torch.zeros(self.output_size, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        self.methods: dict[str, QuantMethod] = {p: create_quant_method(p) for p in precisions}
        self.impls = nn.ModuleDict({p: m.create_weights(self) for p, m in self.methods.items()})

    def shard(self, shard_id: int | None) -> Shard | None:
        if shard_id is None:
            return None
        offset = sum(self.output_sizes[:shard_id])
        return Shard(shard_id, offset, self.output_sizes[shard_id])

    def load(self, suffix: str, tensor: torch.Tensor, shard_id: int | None = None) -> None:
        """Route one checkpoint tensor of this layer to the bias or to every precision's method."""
        shard = self.shard(shard_id)
        if suffix == "bias":
            dst = self.bias if shard is None else self.bias[shard.offset : shard.offset + shard.size]
            dst.copy_(tensor)
            return
        taken = [m.load(self.impls[p], self, suffix, tensor, shard) for p, m in self.methods.items()]
        if not any(taken):
            raise ValueError(f"no precision of this layer ({list(self.methods)}) takes tensor {suffix!r}")

    def process_after_loading(self) -> None:
        for p, m in self.methods.items():
            m.process_after_loading(self.impls[p], self)

    def weight_bytes(self) -> dict[str, int]:
        return {p: m.weight_bytes(self.impls[p]) for p, m in self.methods.items()}

    def input_quant(self) -> InputQuant | None:
        """How the current precision's method wants this layer's input quantized by the layer that produces
        it (None: a plain tensor). The producer fuses it on CUDA and passes the plain tensor elsewhere."""
        p = get_forward_context().precision
        return self.methods[p].input_quant(self.impls[p])

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        p = get_forward_context().precision
        return self.methods[p].apply(self.impls[p], x, self.bias)


class ColumnLinear(LinearBase):
    """Output features split across ranks (one shard today)."""

    def __init__(self, input_size: int, output_size: int, bias: bool, precisions: Sequence[str],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(input_size, [output_size], bias, precisions, dtype, device)


class MergedColumnLinear(LinearBase):
    """Several column projections of the same input in one GEMM (gate_up)."""


class QKVLinear(LinearBase):
    """q, k and v projections in one GEMM; checkpoint shards "q", "k", "v".

    When the forward context names a `kv_precision` other than its precision (Mix-Quant's BF16 K/V
    projections during a quantized prefill), the k and v columns come from that precision's weights: the
    prompt's KV, which every later decode step reads, then carries no error of the quantized projection."""

    SHARDS = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool,
                 precisions: Sequence[str], dtype: torch.dtype, device: torch.device | str) -> None:
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden, sizes, bias, precisions, dtype, device)

    def _kv_precision(self) -> str | None:
        ctx = get_forward_context()
        return ctx.kv_precision if ctx.kv_precision not in (None, ctx.precision) else None

    def input_quant(self) -> InputQuant | None:
        return None if self._kv_precision() else super().input_quant()  # k/v need the plain input

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        if (kv := self._kv_precision()) is None:
            return super().forward(x)
        p, q = get_forward_context().precision, self.output_sizes[0]
        parts = [(p, slice(0, q)), (kv, slice(q, None))]  # q rows in the phase's precision, k/v rows in kv's
        return torch.cat([self.methods[m].apply_rows(self.impls[m], x, None if self.bias is None else self.bias[sl], sl)
                          for m, sl in parts], dim=-1)


class RowLinear(LinearBase):
    """Input features split across ranks (o_proj, down_proj); would all-reduce under tensor parallelism."""

    def __init__(self, input_size: int, output_size: int, bias: bool, precisions: Sequence[str],
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(input_size, [output_size], bias, precisions, dtype, device)
