"""Float64 reference for paged attention tests: build a random paged KV cache and attend densely."""

from __future__ import annotations

import torch


def random_cache(num_pages: int, page_size: int, hkv: int, d: int, dtype: torch.dtype,
                 device: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random K/V caches as [num_pages * page_size, Hkv, D] (page 0 included, as in KVStorage.flat)."""
    shape = (num_pages * page_size, hkv, d)
    k = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    v = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    return k.to(device), v.to(device)


def page_table(seq_lens: list[int], page_size: int, num_pages: int, gen: torch.Generator,
               extra_cols: int = 1) -> torch.Tensor:
    """Distinct random pages (never page 0) for each row, padded with page 0 (and `extra_cols` more)."""
    need = [-(-n // page_size) for n in seq_lens]
    cols = max(need + [1]) + extra_cols
    perm = torch.randperm(num_pages - 1, generator=gen) + 1
    if sum(need) > num_pages - 1:
        raise ValueError("test cache too small")
    table = torch.zeros(len(seq_lens), cols, dtype=torch.int32)
    used = 0
    for i, n in enumerate(need):
        table[i, :n] = perm[used : used + n]
        used += n
    return table


def attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, page_size: int,
           q_pos: list[int], seq_len: int, row: int, scale: float) -> torch.Tensor:
    """q [n, H, D] at positions q_pos of sequence `row` -> float64 [n, H, D] (causal, keys < seq_len)."""
    pos = torch.arange(seq_len)
    slots = table.cpu()[row, pos // page_size].long() * page_size + pos % page_size
    k, v = k_cache.cpu()[slots].double(), v_cache.cpu()[slots].double()  # [L, Hkv, D]
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = torch.einsum("nhd,lhd->hnl", q.cpu().double(), k) * scale
    visible = pos[None, :] <= torch.tensor(q_pos)[:, None]
    scores = scores.masked_fill(~visible[None], float("-inf"))
    return torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)
