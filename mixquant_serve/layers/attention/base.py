"""The attention-backend interface, its registry, and the Attention layer that models use.

A backend plans a batch once (`plan`), then for each layer writes the new tokens' K/V into the paged
KV storage and attends over each sequence's whole context (`forward`). A backend may instead hand out a
layer's cache rows (`kv_write`): the rotary layer stores K/V there as it makes them, and `forward` is told so.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.layers.forward_context import get_forward_context


class SeqSlice(NamedTuple):
    """One sequence's part of a forward batch: `length` new tokens at positions start..start+length-1."""

    pages: Sequence[int]  # page table, covering at least start + length positions
    start: int
    length: int


class KVWrite(NamedTuple):
    """Where one layer's new K/V go: row ``slots[i]`` of the flat caches ([num_slots, Hkv, D]) for token i."""

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor  # int64 [T]
    keep_k: bool  # forward still reads k (v is always passed: a view of the projection costs nothing)
    # where q, k (if kept) and a contiguous v go instead of new tensors (the static buffers of a CUDA graph)
    q_out: torch.Tensor | None = None
    k_out: torch.Tensor | None = None
    v_out: torch.Tensor | None = None


class AttentionBackend(ABC):
    def __init__(self, storage: KVStorage, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device) -> None:
        self.storage = storage
        self.page_size = storage.layout.page_size
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.device = device

    @abstractmethod
    def plan(self, seqs: Sequence[SeqSlice]) -> Any:
        """Per-batch metadata (slot mapping, context layout); built once, used by every layer."""

    @abstractmethod
    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, meta: Any,
                kv_stored: bool = False) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] of the new tokens -> attention output [T, H*D].

        kv_stored: K/V are already where `kv_write` said (k is None unless it asked to keep k)."""

    def kv_write(self, layer: int, meta: Any) -> KVWrite | None:
        """Where the caller should store this layer's new K/V itself, or None: `forward` stores them."""
        return None

    def static_kv_write(self, layer: int, slots: torch.Tensor) -> KVWrite | None:
        """`kv_write` for a CUDA graph of the layers around attention: into `slots` (a static buffer), keeping
        k for `forward`; None if this backend stores K/V in `forward` (then the graph leaves it to it)."""
        return None

    def static_decode_meta(self, max_batch: int, max_pages: int) -> Any:
        """Preallocated decode metadata for CUDA graphs: up to max_batch rows of up to max_pages pages."""
        raise NotImplementedError(f"{type(self).__name__} has no CUDA-graph decode metadata")

    def load_decode_meta(self, static: Any, seqs: Sequence[SeqSlice], padded_batch: int) -> Any:
        """Refill `static` in place for decode `seqs` padded to padded_batch rows; returns views of it."""
        raise NotImplementedError(f"{type(self).__name__} has no CUDA-graph decode metadata")


_REGISTRY = {
    "torch_ref": "mixquant_serve.layers.attention.torch_ref:TorchRefBackend",
    "triton": "mixquant_serve.layers.attention.triton_backend:TritonBackend",
}


def create_attention_backend(name: str, *args: Any, **kwargs: Any) -> AttentionBackend:
    if name not in _REGISTRY:
        raise ValueError(f"unknown attention backend {name!r}; known: {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)(*args, **kwargs)


class Attention(nn.Module):
    def __init__(self, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id

    def kv_write(self) -> KVWrite | None:
        """Where the backend wants this layer's new K/V stored before `forward`, or None."""
        ctx = get_forward_context()
        return ctx.attn_backend.kv_write(self.layer_id, ctx.attn_meta)

    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor,
                kv_stored: bool = False) -> torch.Tensor:
        ctx = get_forward_context()
        return ctx.attn_backend.forward(self.layer_id, q, k, v, ctx.attn_meta, kv_stored)
