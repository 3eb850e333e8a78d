"""kernels/extend_attention.py against a float64 dense computation over the same paged cache."""

from __future__ import annotations

import pytest
import torch
from kernels.conftest import DOT_DTYPES, ON_GPU
from kernels.paged_ref import attend, page_table, random_cache

from mixquant_serve.kernels.extend_attention import (
    default_extend_splits,
    default_grouped_splits,
    extend_attention,
    grouped_block_m,
)

_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _run(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, page_size: int,
         prefix: list[int], new: list[int], seed: int, **launch: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    lens = [p + n for p, n in zip(prefix, new, strict=True)]
    num_pages = sum(-(-n // page_size) for n in lens) + 3
    k, v = random_cache(num_pages, page_size, kv_heads, head_dim, dtype, device, gen)
    table = page_table(lens, page_size, num_pages, gen).to(device)
    q = torch.randn(sum(new), heads, head_dim, generator=gen).to(dtype).to(device)
    starts = [0] + torch.tensor(new).cumsum(0).tolist()
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    got = extend_attention(q, k, v, table, i32(starts), i32(prefix), i32(lens), page_size, scale, max(new),
                           out=out, **launch)
    assert got is out and not out.isnan().any(), "every output element must be written"
    for b, (p, n) in enumerate(zip(prefix, new, strict=True)):
        rows = slice(starts[b], starts[b + 1])
        want = attend(q[rows], k, v, table, page_size, list(range(p, p + n)), p + n, b, scale)
        torch.testing.assert_close(out[rows].cpu().double(), want, atol=_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "page_size", "prefix", "new", "num_splits"), [
    (2, 2, 64, 16, [0, 0, 16], [16, 17, 1], 1),  # GQA 1, page boundaries, a one-token row
    (8, 2, 128, 16, [5, 0, 32], [40, 3, 20], 1),  # GQA 4, prefix hits mid-page and on a page boundary
    (8, 1, 64, 1, [3, 0], [9, 20], 2),  # GQA 8, one token per page
    (4, 1, 128, 64, [64, 70], [1, 60], 2),  # big pages, the new tokens crossing one
])
def test_matches_dense_float64(device, dtype, heads, kv_heads, head_dim, page_size, prefix, new, num_splits):
    _run(device, dtype, heads, kv_heads, head_dim, page_size, prefix, new, seed=sum(new), num_splits=num_splits,
         block_m=16, block_n=16)


def test_default_blocks(device):
    """The default 64x64 blocks: several query blocks for one row, a long prefix, an odd head_dim."""
    _run(device, torch.float32, 2, 1, 96, 16, [100, 0, 7], [130, 64, 2], seed=1)


def test_split_prefix_with_empty_splits(device):
    """More splits than prefix blocks: some programs get no keys (their partials must weigh nothing)."""
    _run(device, torch.float32, 2, 1, 64, 16, [40, 0], [5, 30], seed=3, num_splits=6, block_m=16, block_n=16)


def test_default_extend_splits_only_for_small_launches_over_long_prefixes():
    assert default_extend_splits(32, 1, 200, 8192) == 3  # 32 heads x 4 query blocks: 128 programs
    assert default_extend_splits(32, 1, 50, 8192) == 9  # one query block: 32 programs
    assert default_extend_splits(8, 1, 8, 8192) == 16  # 8 programs; capped
    assert default_extend_splits(32, 1, 50, 2048) == 4  # at least 512 prefix keys a split
    assert default_extend_splits(32, 1, 8, 600) == 1  # too short a prefix to share out
    assert default_extend_splits(32, 8, 2048, 8192) == 1  # already a big launch


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "prefix", "new", "num_splits", "block_m"), [
    (8, 2, [40, 0, 33], [16, 3, 1], 1, 32),  # G 4: 8 tokens a block, two blocks for the 16-token row
    (8, 2, [40, 0, 33], [16, 3, 1], 5, 64),  # one block a row, the prefix shared out (some splits empty)
    (8, 1, [100], [8], 3, 64),  # G 8: 8 tokens x 8 heads
    (4, 2, [17, 64], [5, 2], 2, 16),  # G 2, page boundaries
])
def test_grouped_matches_dense_float64(device, dtype, heads, kv_heads, prefix, new, num_splits, block_m):
    """Few new tokens (Mix-Quant's BF16 tail): a KV head's G query heads are the rows of one program."""
    _run(device, dtype, heads, kv_heads, 64, 16, prefix, new, seed=sum(prefix), num_splits=num_splits,
         block_m=block_m, block_n=16, grouped=True)


def test_grouped_launch_choice():
    assert grouped_block_m(32, 8, 16) == 64  # the 16-token tail of Qwen3-8B: 16 tokens x 4 heads
    assert grouped_block_m(32, 8, 3) == 16
    assert grouped_block_m(32, 8, 17) is None  # more rows than one block: the per-head launch
    assert grouped_block_m(32, 32, 4) is None and grouped_block_m(24, 8, 4) is None  # G 1, G 3
    assert default_grouped_splits(8, 1, 2032) == 15  # at least 128 prefix keys a split
    assert default_grouped_splits(8, 1, 8176) == 32  # capped
    assert default_grouped_splits(8, 64, 8176) == 1  # 512 programs already
    with pytest.raises(ValueError, match="multiple of G"):
        q = torch.randn(2, 8, 64)
        k = torch.randn(32, 1, 64)
        i32 = lambda xs: torch.tensor(xs, dtype=torch.int32)  # noqa: E731
        extend_attention(q, k, k, torch.zeros(1, 2, dtype=torch.int32), i32([0, 2]), i32([0]), i32([2]), 16,
                         0.125, 2, block_m=4, grouped=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_grouped_tail_on_gpu(device, dtype, num_splits):
    _run(device, dtype, 32, 8, 128, 16, [2032, 8176, 0, 5], [16, 16, 9, 1], seed=11, num_splits=num_splits,
         grouped=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_long_batch_on_gpu(device, dtype, num_splits):
    _run(device, dtype, 32, 8, 128, 16, [0, 1000, 4096, 17], [2048, 300, 1, 513], seed=7, num_splits=num_splits)


def test_rejects_bad_inputs(device):
    q = torch.randn(3, 4, 64, device=device)
    k = torch.randn(32, 2, 64, device=device)
    table = torch.zeros(1, 2, dtype=torch.int32, device=device)
    i32 = lambda xs: torch.tensor(xs, dtype=torch.int32, device=device)  # noqa: E731
    with pytest.raises(TypeError, match="int32"):
        extend_attention(q, k, k, table, i32([0, 3]).long(), i32([0]), i32([3]), 16, 0.125, 3)
    with pytest.raises(ValueError, match="q_start_loc"):
        extend_attention(q, k, k, table, i32([0, 1, 3]), i32([0]), i32([3]), 16, 0.125, 3)
    with pytest.raises(ValueError, match="head_dim"):
        extend_attention(q, k[..., :32], k[..., :32], table, i32([0, 3]), i32([0]), i32([3]), 16, 0.125, 3)


@pytest.mark.skipif(ON_GPU, reason="on a GPU every test compiles and launches the kernels")
def test_compiles_for_hopper_with_pipelined_kv_loads():
    from kernels.hopper_compile import compile_for_hopper

    pointers = dict(Q="bf16", K="bf16", V="bf16", Out="bf16", PartO="fp32", PartLse="fp32", PageTable="i32",
                    QStartLoc="i32", PrefixLens="i32")
    kernels = compile_for_hopper([dict(
        module="mixquant_serve.kernels.extend_attention", kernel="_extend_kernel", pointers=pointers,
        options=dict(num_warps=4, num_stages=2), ints=("NUM_SPLITS",), constexprs=dict(
            G=4, HEAD_DIM=128, PAGE_SIZE=16, SPLIT=split, GROUPED=grouped, TOKENS=16 if grouped else 64, BLOCK_M=64,
            BLOCK_N=64, BLOCK_D=128, DOT_PREC="tf32")) for split in (False, True) for grouped in (False, True)])
    assert all(k["async_copies"] >= 2 and k["shared"] <= 200 * 1024 for k in kernels)
