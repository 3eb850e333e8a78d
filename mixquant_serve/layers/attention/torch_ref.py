"""Reference attention backend in plain PyTorch (any device): gathers each sequence's context from the
paged KV storage into contiguous tensors and calls scaled_dot_product_attention.

Decode batches (one new token per sequence) run as one padded SDPA call; prefill batches run one call
per sequence (causal, offset by the sequence's cached prefix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mixquant_serve.layers.attention.base import AttentionBackend, SeqSlice


@dataclass
class _PrefillSeq:
    q_start: int  # row of the sequence's first new token in the batch
    q_len: int
    ctx_slots: torch.Tensor  # [L] slots of positions 0..start+q_len-1
    mask: torch.Tensor | None  # [q_len, L] bool, None when the sequence has no cached prefix (plain causal)


@dataclass
class TorchRefMeta:
    slots: torch.Tensor  # [T] destination slot of each new token
    decode_slots: torch.Tensor | None  # [B, L] context slots, padded with slot 0
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True where a key is valid
    prefill: list[_PrefillSeq]


class TorchRefBackend(AttentionBackend):
    def _slots(self, pages: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ps = self.page_size
        return pages[..., positions // ps] * ps + positions % ps

    def plan(self, seqs: Sequence[SeqSlice]) -> TorchRefMeta:
        dev = self.device
        tables = [torch.tensor(list(s.pages), dtype=torch.long) for s in seqs]
        slots = torch.cat([self._slots(t, torch.arange(s.start, s.start + s.length)) for t, s in zip(tables, seqs)])
        if all(s.length == 1 for s in seqs):
            return self._plan_decode(seqs, tables, slots.to(dev))
        prefill, row = [], 0
        for t, s in zip(tables, seqs):
            ctx = s.start + s.length
            ctx_slots = self._slots(t, torch.arange(ctx)).to(dev)
            mask = None
            if s.start:
                q_pos = torch.arange(s.start, ctx).unsqueeze(1)
                mask = (torch.arange(ctx).unsqueeze(0) <= q_pos).to(dev)
            prefill.append(_PrefillSeq(row, s.length, ctx_slots, mask))
            row += s.length
        return TorchRefMeta(slots.to(dev), None, None, prefill)

    def _plan_decode(self, seqs: Sequence[SeqSlice], tables: list[torch.Tensor], slots: torch.Tensor) -> TorchRefMeta:
        ctx_lens = torch.tensor([s.start + 1 for s in seqs])
        max_len = int(ctx_lens.max())
        max_pages = -(-max_len // self.page_size)
        padded = torch.zeros(len(seqs), max_pages, dtype=torch.long)
        for i, t in enumerate(tables):
            n = min(len(t), max_pages)
            padded[i, :n] = t[:n]
        pos = torch.arange(max_len)
        ctx_slots = self._slots(padded, pos)
        valid = pos.unsqueeze(0) < ctx_lens.unsqueeze(1)
        ctx_slots = torch.where(valid, ctx_slots, 0)
        return TorchRefMeta(slots, ctx_slots.to(self.device), valid[:, None, None, :].to(self.device), [])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                meta: TorchRefMeta) -> torch.Tensor:
        k_cache, v_cache = self.storage.flat(layer)
        k_cache[meta.slots] = k.to(k_cache.dtype)
        v_cache[meta.slots] = v.to(v_cache.dtype)
        if meta.decode_slots is not None:
            return self._decode(q, k_cache, v_cache, meta)
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        for s in meta.prefill:
            qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            ks = k_cache[s.ctx_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, Hkv, L, D]
            vs = v_cache[s.ctx_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=s.mask, is_causal=s.mask is None,
                                               scale=self.scale, enable_gqa=True)
            out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1).reshape(s.q_len, -1)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                meta: TorchRefMeta) -> torch.Tensor:
        b = q.shape[0]
        ks = k_cache[meta.decode_slots].transpose(1, 2).to(q.dtype)  # [B, Hkv, L, D]
        vs = v_cache[meta.decode_slots].transpose(1, 2).to(q.dtype)
        o = F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=meta.decode_mask,
                                           scale=self.scale, enable_gqa=True)  # [B, H, 1, D]
        return o.reshape(b, -1)
