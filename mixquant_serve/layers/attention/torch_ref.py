"""Reference attention backend in plain PyTorch (any device): gathers each sequence's context from the
paged KV storage into contiguous tensors and calls scaled_dot_product_attention.

Decode batches (one new token per sequence) gather whole pages into one padded batch and attend in
float32 with plain matmuls (CPU SDPA spends ~2 ms per call on a single query row; this takes ~0.2 ms);
prefill batches run one SDPA call per sequence (causal, offset by the sequence's cached prefix).
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
    decode_pages: torch.Tensor | None  # [B, P] page table, padded with page 0
    decode_mask: torch.Tensor | None  # [B, 1, 1, P * page_size] True where a key is valid
    prefill: list[_PrefillSeq]


class TorchRefBackend(AttentionBackend):
    def _slots(self, pages: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ps = self.page_size
        return pages[..., positions // ps] * ps + positions % ps

    def plan(self, seqs: Sequence[SeqSlice]) -> TorchRefMeta:
        dev = self.device
        tables = [torch.tensor(list(s.pages), dtype=torch.long) for s in seqs]
        slots = torch.cat([self._slots(t, torch.arange(s.start, s.start + s.length))
                           for t, s in zip(tables, seqs, strict=True)])
        if all(s.length == 1 for s in seqs):
            return self._plan_decode(seqs, tables, slots.to(dev))
        prefill, row = [], 0
        for t, s in zip(tables, seqs, strict=True):
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
        max_pages = -(-int(ctx_lens.max()) // self.page_size)
        padded = torch.zeros(len(seqs), max_pages, dtype=torch.long)
        for i, t in enumerate(tables):
            n = min(len(t), max_pages)
            padded[i, :n] = t[:n]
        valid = torch.arange(max_pages * self.page_size).unsqueeze(0) < ctx_lens.unsqueeze(1)
        return TorchRefMeta(slots, padded.to(self.device), valid[:, None, None, :].to(self.device), [])

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor,
                meta: TorchRefMeta, kv_stored: bool = False) -> torch.Tensor:
        k_cache, v_cache = self.storage.flat(layer)
        if not kv_stored:
            k_cache[meta.slots] = k.to(k_cache.dtype)
            v_cache[meta.slots] = v.to(v_cache.dtype)
        if meta.decode_pages is not None:
            return self._decode(layer, q, meta)
        out = torch.empty(q.shape[0], self.num_heads * self.head_dim, dtype=q.dtype, device=q.device)
        for s in meta.prefill:
            qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, D]
            ks = k_cache[s.ctx_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, Hkv, L, D]
            vs = v_cache[s.ctx_slots].transpose(0, 1).unsqueeze(0).to(q.dtype)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=s.mask, is_causal=s.mask is None,
                                               scale=self.scale, enable_gqa=True)
            out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1).reshape(s.q_len, -1)
        return out

    def _decode(self, layer: int, q: torch.Tensor, meta: TorchRefMeta) -> torch.Tensor:
        b, hkv = q.shape[0], self.num_kv_heads
        k, v = (self._gather_f32(c[meta.decode_pages]) for c in (self.storage.k[layer], self.storage.v[layer]))
        qg = q.float().view(b, hkv, -1, self.head_dim)  # query heads grouped by their KV head
        scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(self.scale).masked_fill_(~meta.decode_mask,
                                                                                      float("-inf"))
        out = torch.matmul(scores.softmax(-1), v)  # [B, Hkv, G, D]
        return out.reshape(b, -1).to(q.dtype)

    @staticmethod
    def _gather_f32(pages: torch.Tensor) -> torch.Tensor:
        """[B, P, page, Hkv, D] -> contiguous float32 [B, Hkv, P*page, D] in one copy."""
        return pages.flatten(1, 2).transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)
