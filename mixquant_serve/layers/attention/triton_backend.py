"""Triton attention backend (the GPU fast path): paged decode split over the KV length, paged extend for
prefill batches with cached prefixes; a single sequence without a cached prefix may use PyTorch's SDPA.

`plan` builds all host metadata in one int32 buffer (slots are int64 pairs at its head) and copies it to
the device once. `kv_write` hands each layer's cache rows to the rotary kernel, which stores the new K/V
as it makes them (no copy in `forward`). For CUDA graphs, `static_decode_meta` preallocates the decode
metadata and `load_decode_meta` refills it in place, so a captured decode step replays with new lengths and
pages.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.nn.functional as F

from mixquant_serve.kernels.decode_attention import decode_attention, default_num_splits
from mixquant_serve.kernels.extend_attention import (
    default_extend_splits,
    default_grouped_splits,
    extend_attention,
    grouped_block_m,
)
from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.layers.attention.base import AttentionBackend, KVWrite, SeqSlice


@dataclass
class TritonMeta:
    slots: torch.Tensor  # int64 [T] destination slot of each new token
    page_table: torch.Tensor  # int32 [B, P] pages of each sequence, padded with page 0
    seq_lens: torch.Tensor  # int32 [B] prefix + new tokens (0 on a padding row)
    prefix_lens: torch.Tensor  # int32 [B] cached tokens before this batch's
    q_start_loc: torch.Tensor  # int32 [B+1] first row of each sequence's new tokens in q
    max_q_len: int
    is_decode: bool  # every sequence has one new token
    num_splits: int  # KV splits of the kernel this batch runs (decode or extend)
    sdpa: bool  # one sequence, no cached prefix: causal SDPA on the new tokens' q/k/v
    buf: torch.Tensor  # int32, the one device buffer that all the tensors above view
    grouped: bool = False  # extend: a program per KV head with its G query heads as rows (few new tokens)


def _page_table(seqs: Sequence[SeqSlice], seq_lens: np.ndarray, page_size: int, cols: int) -> np.ndarray:
    """[len(seqs), cols] the pages each sequence needs for its seq_lens tokens, padded with page 0."""
    n = len(seqs)
    need = -(-seq_lens // page_size)
    have = np.fromiter((len(s.pages) for s in seqs), np.int64, n)
    for i in np.flatnonzero(have < need):
        raise ValueError(f"a sequence of {seq_lens[i]} tokens needs {need[i]} pages, has {have[i]}")
    flat = np.fromiter(chain.from_iterable(s.pages for s in seqs), np.int64, int(have.sum()))
    col = np.arange(cols)
    valid = col < need[:, None]
    if not flat.size:
        return np.zeros((n, cols), np.int64)
    return np.where(valid, flat[np.where(valid, (np.cumsum(have) - have)[:, None] + col, 0)], 0)


def _host_layout(seqs: Sequence[SeqSlice], page_size: int, rows: int, cols: int, pad_len: int = 0,
                 pinned: bool = False) -> torch.Tensor:
    """One int32 host buffer: [slots as int64 (2T words) | seq_lens [rows] | prefix_lens [rows] |
    q_start_loc [rows+1] | page table [len(seqs), cols]].

    Rows past len(seqs) (up to `rows`) are padding: `pad_len` tokens each, in slot 0 (page 0), seq_len 0."""
    n = len(seqs)
    prefix, lengths = np.zeros(rows, np.int64), np.full(rows, pad_len, np.int64)
    prefix[:n] = np.fromiter((s.start for s in seqs), np.int64, n)
    lengths[:n] = np.fromiter((s.length for s in seqs), np.int64, n)
    q_start = np.zeros(rows + 1, np.int64)
    np.cumsum(lengths, out=q_start[1:])
    table = _page_table(seqs, prefix[:n] + lengths[:n], page_size, cols)
    t, real = int(q_start[-1]), int(q_start[n])
    host = torch.empty(2 * t + 3 * rows + 1 + n * cols, dtype=torch.int32, pin_memory=pinned)
    buf = host.numpy()
    slots = buf[: 2 * t].view(np.int64)
    row = np.repeat(np.arange(n), lengths[:n])
    pos = np.arange(real) - q_start[row] + prefix[row]
    slots[:real] = table[row, pos // page_size] * page_size + pos % page_size
    slots[real:] = 0  # padding tokens write into page 0
    ints = buf[2 * t :]
    ints[:rows] = prefix + lengths
    ints[n:rows] = 0
    ints[rows : 2 * rows] = prefix
    ints[2 * rows : 3 * rows + 1] = q_start
    ints[3 * rows + 1 :] = table.ravel()
    return host


class TritonBackend(AttentionBackend):
    def __init__(self, storage: KVStorage, num_heads: int, num_kv_heads: int, head_dim: int,
                 device: torch.device, sdpa_prefill: bool | None = None, decode_splits: int | None = None,
                 extend_splits: int | None = None) -> None:
        """sdpa_prefill: see _sdpa_prefill (default: env MIXQUANT_SDPA_PREFILL, on unless "0");
        decode_splits / extend_splits: fixed KV splits (default: by launch size, see default_num_splits and
        default_extend_splits)."""
        device = torch.device(device)
        super().__init__(storage, num_heads, num_kv_heads, head_dim, device)
        if sdpa_prefill is None:
            sdpa_prefill = os.environ.get("MIXQUANT_SDPA_PREFILL", "1") != "0"
        self.sdpa_prefill, self.decode_splits, self.extend_splits = sdpa_prefill, decode_splits, extend_splits
        # off the GPU (Triton's interpreter) splitting only adds work
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1

    def _num_splits(self, batch: int) -> int:
        return self.decode_splits or default_num_splits(batch, self.num_kv_heads, self.num_sms)

    def _extend_launch(self, seqs: Sequence[SeqSlice], max_q_len: int) -> tuple[int, bool]:
        """(KV splits, grouped) of an extend batch: grouped when every sequence has few new tokens (the BF16
        tail, a short turn), see kernels/extend_attention.py."""
        max_prefix = max(s.start for s in seqs)
        if self.extend_splits:
            return self.extend_splits, False
        if grouped_block_m(self.num_heads, self.num_kv_heads, max_q_len) is not None:
            return default_grouped_splits(self.num_kv_heads, len(seqs), max_prefix, self.num_sms), True
        return default_extend_splits(self.num_heads, len(seqs), max_q_len, max_prefix, self.num_sms), False

    def plan(self, seqs: Sequence[SeqSlice]) -> TritonMeta:
        if not seqs:
            raise ValueError("an attention plan needs at least one sequence")
        b, t = len(seqs), sum(s.length for s in seqs)
        cols = max(-(-(s.start + s.length) // self.page_size) for s in seqs)
        host = _host_layout(seqs, self.page_size, b, cols, pinned=self.device.type == "cuda")
        buf = host.to(self.device, non_blocking=True)
        max_q_len = max(s.length for s in seqs)
        if max_q_len == 1:
            return self._meta(buf, b, t, cols, 1, True, self._num_splits(b), False)
        sdpa = self.sdpa_prefill and b == 1 and seqs[0].start == 0
        splits, grouped = self._extend_launch(seqs, max_q_len)
        return self._meta(buf, b, t, cols, max_q_len, False, splits, sdpa, grouped)

    @staticmethod
    def _meta(buf: torch.Tensor, b: int, t: int, cols: int, max_q_len: int, is_decode: bool, num_splits: int,
              sdpa: bool, grouped: bool = False) -> TritonMeta:
        """Views of a buffer laid out as _host_layout writes it (b rows, t new tokens, cols pages a row)."""
        ints = buf[2 * t :]
        seq_lens, prefix, q_start = ints[:b], ints[b : 2 * b], ints[2 * b : 3 * b + 1]
        table = ints[3 * b + 1 : 3 * b + 1 + b * cols].view(b, cols)
        return TritonMeta(buf[: 2 * t].view(torch.int64), table, seq_lens, prefix, q_start, max_q_len, is_decode,
                          num_splits, sdpa, buf, grouped)

    def static_decode_meta(self, max_batch: int, max_pages: int) -> TritonMeta:
        """Device buffers for decode batches of up to max_batch rows and max_pages pages per row."""
        buf = torch.zeros(5 * max_batch + 1 + max_batch * max_pages, dtype=torch.int32, device=self.device)
        return self._meta(buf, max_batch, max_batch, max_pages, 1, True, self._num_splits(max_batch), False)

    def load_decode_meta(self, static: TritonMeta, seqs: Sequence[SeqSlice], padded_batch: int) -> TritonMeta:
        """Fill `static` in place with decode `seqs` padded to padded_batch rows (padding rows: one token in
        slot 0, seq_len 0); returns views of it. Two host-to-device copies, no synchronisation."""
        max_batch, max_pages = static.page_table.shape
        if not 0 < len(seqs) <= padded_batch <= max_batch or any(s.length != 1 for s in seqs):
            raise ValueError(f"want 1..{padded_batch} decode sequences and padded_batch <= {max_batch}")
        cols = max(-(-(s.start + 1) // self.page_size) for s in seqs)
        if cols > max_pages:
            raise ValueError(f"a sequence needs {cols} pages; the static table holds {max_pages}")
        # the header has the static buffer's layout (max_batch rows); rows len(seqs).. of the table keep stale
        # pages, never read: their seq_len is 0
        host = _host_layout(seqs, self.page_size, max_batch, cols, pad_len=1, pinned=self.device.type == "cuda")
        head, p, n = 5 * max_batch + 1, padded_batch, len(seqs)
        static.buf[:head].copy_(host[:head], non_blocking=True)
        static.page_table[:n, :cols].copy_(host[head:].view(n, cols), non_blocking=True)
        return TritonMeta(static.slots[:p], static.page_table[:p], static.seq_lens[:p], static.prefix_lens[:p],
                          static.q_start_loc[: p + 1], 1, True, self._num_splits(p), False, static.buf)

    def kv_write(self, layer: int, meta: TritonMeta) -> KVWrite:
        """The new K/V go straight into the cache rows; only the SDPA prefill reads k afterwards."""
        return KVWrite(*self.storage.flat(layer), meta.slots, keep_k=meta.sdpa)

    def static_kv_write(self, layer: int, slots: torch.Tensor) -> KVWrite:
        return KVWrite(*self.storage.flat(layer), slots, keep_k=True)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor, meta: TritonMeta,
                kv_stored: bool = False) -> torch.Tensor:
        k_cache, v_cache = self.storage.flat(layer)
        if not kv_stored:
            k_cache.index_copy_(0, meta.slots, k.to(k_cache.dtype))
            v_cache.index_copy_(0, meta.slots, v.to(v_cache.dtype))
        if meta.sdpa:
            return self._sdpa_prefill(q, k, v)
        qc = q.to(k_cache.dtype)
        if meta.is_decode:
            out = decode_attention(qc, k_cache, v_cache, meta.page_table, meta.seq_lens, self.page_size,
                                   self.scale, meta.num_splits)
        else:
            out = extend_attention(qc, k_cache, v_cache, meta.page_table, meta.q_start_loc, meta.prefix_lens,
                                   meta.seq_lens, self.page_size, self.scale, meta.max_q_len,
                                   num_splits=meta.num_splits, grouped=meta.grouped)
        return out.view(q.shape[0], -1).to(q.dtype)

    def _sdpa_prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A whole new sequence: causal SDPA straight on its q/k/v (no gather from the cache)."""
        qs, ks, vs = (x.transpose(0, 1).unsqueeze(0) for x in (q, k.to(q.dtype), v.to(q.dtype)))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(q.shape[0], -1)
