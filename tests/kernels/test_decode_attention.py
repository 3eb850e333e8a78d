"""kernels/decode_attention.py against a float64 dense computation over the same paged cache."""

from __future__ import annotations

import json

import pytest
import torch
from kernels.conftest import DOT_DTYPES, ON_GPU
from kernels.paged_ref import attend, page_table, random_cache

from mixquant_serve.kernels.decode_attention import decode_attention, default_num_splits
from mixquant_serve.kernels.tuning import DEFAULTS, config

_ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def _run(device: torch.device, dtype: torch.dtype, heads: int, kv_heads: int, head_dim: int, page_size: int,
         lens: list[int], num_splits: int, seed: int, **launch: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    num_pages = sum(-(-n // page_size) for n in lens) + 3
    k, v = random_cache(num_pages, page_size, kv_heads, head_dim, dtype, device, gen)
    table = page_table(lens, page_size, num_pages, gen).to(device)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype).to(device)
    out = torch.full_like(q, float("nan"))
    scale = head_dim**-0.5
    got = decode_attention(q, k, v, table, torch.tensor(lens, dtype=torch.int32, device=device), page_size, scale,
                           num_splits, out=out, **launch)
    assert got is out and not out.isnan().any(), "every output element must be written"
    for b, n in enumerate(lens):
        want = attend(q[b : b + 1], k, v, table, page_size, [n - 1], n, b, scale)[0] if n else torch.zeros_like(
            out[b], dtype=torch.float64, device="cpu")
        torch.testing.assert_close(out[b].cpu().double(), want, atol=_ATOL[dtype], rtol=0)


@pytest.mark.parametrize("dtype", DOT_DTYPES)
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim", "page_size", "lens", "num_splits"), [
    (2, 2, 64, 16, [1, 15, 16, 17, 33, 0], 1),  # GQA 1, lengths at and across page boundaries, a padding row
    (8, 2, 128, 16, [40, 1, 0, 16, 64, 65], 3),  # GQA 4, splits that cover ragged and empty slices
    (8, 1, 64, 1, [7, 1, 20], 4),  # GQA 8, one token per page
    (4, 1, 128, 64, [64, 65, 3, 130], 8),  # big pages, more splits than keys for short rows
])
def test_matches_dense_float64(device, dtype, heads, kv_heads, head_dim, page_size, lens, num_splits):
    _run(device, dtype, heads, kv_heads, head_dim, page_size, lens, num_splits, seed=len(lens) + num_splits)


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_small_key_blocks_and_odd_head_dim(device, num_splits):
    """Several key blocks per split (block_n 16) and a head_dim that is not a power of two."""
    _run(device, torch.float32, 6, 2, 80, 16, [50, 16, 0, 31], num_splits, seed=num_splits, block_n=16)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [1, 16])
def test_bfloat16_long_context_on_gpu(device, num_splits):
    lens = [4096, 1, 0, 1000, 2049, 17]
    _run(device, torch.bfloat16, 32, 8, 128, 16, lens, num_splits, seed=num_splits)


def test_all_rows_padding_give_zeros(device):
    q = torch.randn(3, 4, 64, device=device)
    k = torch.randn(32, 2, 64, device=device)
    table = torch.zeros(3, 2, dtype=torch.int32, device=device)
    out = decode_attention(q, k, k.clone(), table, torch.zeros(3, dtype=torch.int32, device=device), 16, 0.125, 4)
    assert torch.equal(out, torch.zeros_like(q))


@pytest.mark.parametrize(("cfg", "lens", "num_splits"), [
    ({"block_n": 16, "num_stages": 3}, [100, 0, 17, 1], 12),  # more splits than the 7 key blocks: empty splits
    ({"block_n": 32, "num_warps": 8, "num_stages": 4}, [0, 70, 33], 3),  # a padding row first
    ({"block_n": 128, "num_warps": 2, "num_stages": 1}, [130, 5, 0], 2),  # a block past a short row's end
    ({"block_n": 16, "num_warps": 1}, [300, 0, 16], 40),  # over 32 splits: the merge takes two steps
])
def test_matches_dense_float64_in_other_launch_configs(device, monkeypatch, cfg, lens, num_splits):
    """kernels/tuning.py's fields through MIXQUANT_KERNEL_CONFIGS, as the sweep and another GPU set them."""
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"decode_attention": cfg}))
    _run(device, torch.float32, 4, 1, 64, 16, lens, num_splits, seed=num_splits)


def test_default_num_splits_fills_the_gpu_without_depending_on_lengths(monkeypatch):
    monkeypatch.delenv("MIXQUANT_KERNEL_CONFIGS", raising=False)
    assert default_num_splits(1, 8) == 32  # capped
    assert default_num_splits(8, 8) == 5  # ceil(264 / 64)
    assert default_num_splits(256, 8) == 1
    assert default_num_splits(0, 8) == 32
    assert config("decode_attention") == {"block_n": 64, "num_warps": 4, "num_stages": 2, "split_cap": 32,
                                          "programs_per_sm": 2, "split_block_n": 128, "split_num_stages": 3}
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"decode_attention": {"split_cap": 128,
                                                                                   "programs_per_sm": 8}}))
    assert default_num_splits(1, 8) == 128  # ceil(1056 / 8) capped
    assert default_num_splits(8, 8) == 17
    assert default_num_splits(64, 8) == 3
    assert config("decode_attention")["block_n"] == DEFAULTS["decode_attention"]["block_n"]


@pytest.mark.parametrize("bad", [
    {"block_n": 48}, {"block_n": 8}, {"num_warps": 3}, {"num_warps": 64}, {"num_warps": 0}, {"num_stages": 0},
    {"split_cap": 0}, {"programs_per_sm": 0}, {"block_m": 64}, {"block_n": -64},
])
def test_bad_launch_config_is_refused(device, monkeypatch, bad):
    q = torch.randn(1, 4, 64, device=device)
    k = torch.randn(32, 2, 64, device=device)
    table = torch.zeros(1, 2, dtype=torch.int32, device=device)
    lens = torch.ones(1, dtype=torch.int32, device=device)
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"decode_attention": bad}))
    with pytest.raises(ValueError, match="MIXQUANT_KERNEL_CONFIGS"):
        decode_attention(q, k, k, table, lens, 16, 0.125, 2)
    if set(bad) & {"split_cap", "programs_per_sm"}:
        with pytest.raises(ValueError, match="MIXQUANT_KERNEL_CONFIGS"):
            default_num_splits(1, 8)
    monkeypatch.delenv("MIXQUANT_KERNEL_CONFIGS")
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        decode_attention(q, k, k, table, lens, 16, 0.125, 2, block_n=24)


def test_rejects_bad_inputs(device):
    q = torch.randn(2, 4, 64, device=device)
    k = torch.randn(32, 2, 64, device=device)
    table = torch.zeros(2, 2, dtype=torch.int32, device=device)
    lens = torch.ones(2, dtype=torch.int32, device=device)
    with pytest.raises(TypeError, match="int32"):
        decode_attention(q, k, k, table.long(), lens, 16, 0.125, 1)
    with pytest.raises(TypeError, match="share"):
        decode_attention(q.half(), k, k, table, lens, 16, 0.125, 1)
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(torch.randn(2, 3, 64, device=device), k, k, table, lens, 16, 0.125, 1)
    with pytest.raises(ValueError, match="seq_lens"):
        decode_attention(q, k, k, table, lens[:1], 16, 0.125, 1)
    with pytest.raises(ValueError, match="num_splits"):
        decode_attention(q, k, k, table, lens, 16, 0.125, 0)


@pytest.mark.skipif(ON_GPU, reason="on a GPU every test compiles and launches the kernels")
def test_compiles_for_hopper_with_pipelined_kv_loads():
    """The default launch and the sweep's largest (benchmarks/attention_kernels.py: 128 keys a step, 4 stages)."""
    from kernels.hopper_compile import compile_for_hopper

    pointers = dict(Q="bf16", K="bf16", V="bf16", PageTable="i32", SeqLens="i32", Out="bf16", PartO="fp32",
                    PartLse="fp32")

    def split_kernel(block_n: int, num_warps: int, num_stages: int) -> dict:
        return dict(module="mixquant_serve.kernels.decode_attention", kernel="_decode_split_kernel", pointers=pointers,
                    options=dict(num_warps=num_warps, num_stages=num_stages),
                    constexprs=dict(G=4, HEAD_DIM=128, PAGE_SIZE=16, SPLIT=True, BLOCK_G=16, BLOCK_N=block_n,
                                    BLOCK_D=128, DOT_PREC="tf32"))

    default, largest, _ = compile_for_hopper([
        split_kernel(64, 4, 2), split_kernel(128, 8, 4),
        dict(module="mixquant_serve.kernels.merge_attention", kernel="_merge_kernel", pointers=pointers,
             options=dict(num_warps=4), ints=("num_splits",), constexprs=dict(HEAD_DIM=128, BLOCK_S=32, BLOCK_D=128)),
    ])
    assert default["async_copies"] >= 2  # K and V tiles prefetched while the previous block computes
    assert largest["async_copies"] >= 2 and largest["shared"] <= 227 * 1024  # fits an H100/H200 SM's shared memory


def test_split_launches_take_the_split_fields(device, monkeypatch):
    """split_block_n / split_num_stages apply to launches with KV splits only; both checked up front."""
    import mixquant_serve.kernels.decode_attention as da

    launches = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: launches.append((kw["BLOCK_N"], kw["num_stages"]))

    monkeypatch.setattr(da, "_decode_split_kernel", Kernel())
    monkeypatch.setattr(da, "merge_attention", lambda *args: None)
    q = torch.randn(1, 4, 64, device=device)
    k = torch.randn(64, 2, 64, device=device)
    table = torch.arange(4, dtype=torch.int32, device=device).view(1, 4)
    lens = torch.tensor([40], dtype=torch.int32, device=device)
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"decode_attention": {"split_block_n": 32}}))
    decode_attention(q, k, k, table, lens, 16, 0.125, 1)
    decode_attention(q, k, k, table, lens, 16, 0.125, 2)
    assert launches == [(64, 2), (32, 3)]
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"decode_attention": {"split_block_n": 0,
                                                                                   "split_num_stages": 0}}))
    decode_attention(q, k, k, table, lens, 16, 0.125, 2)
    assert launches[-1] == (64, 2)  # 0: as unsplit
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", json.dumps({"decode_attention": {"split_block_n": 48}}))
    with pytest.raises(ValueError, match="block_n must be a power of two"):
        decode_attention(q, k, k, table, lens, 16, 0.125, 1)
