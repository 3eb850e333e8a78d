"""Launch configurations of the memory-bound Triton kernels, with a per-device override.

The defaults are the ones `benchmarks/quant_kernels.py --sweep` measured best on one H200 (benchmarks/RESULTS.md);
the sweep checks that every configuration writes the same bits. MIXQUANT_KERNEL_CONFIGS, a JSON object
``{"kernel": {"field": value, ...}}``, overrides fields for another GPU (the sweep prints the object to use).
Fields: "silu_mul_fp8": block (columns per step, a power of two; at least the row width: the whole row stays in
registers as two power-of-two pieces, one read of gate_up), num_warps and programs_per_sm (0: one program per
row; n: a persistent grid of at most n programs per SM, each looping over rows pid, pid + grid, ...);
"rmsnorm": max_warps; "fp8_per_token": num_warps (0: 4 up to a block of 1024 columns, else 8), rows (rows per
program, a power of two: one [rows, K] tile) and programs_per_sm (as for SiLU-mul, over groups of rows);
"decode_attention" (`benchmarks/attention_kernels.py --sweep` times it in a CUDA graph): block_n (keys per step,
a power of two >= 16), num_warps, num_stages, the KV splits of a decode batch of B rows (about programs_per_sm x
SMs programs over B x kv heads, at most split_cap), and split_block_n / split_num_stages: block_n and num_stages
of a launch that splits the KV (0: the same as unsplit); "gemv": max_rows (linears of up to that many rows in a
16-bit dtype run kernels/gemv.py with the RMSNorm or SiLU-mul before them fused; 0: never) and graph_only (1: only
while a CUDA graph is being captured, where its launches cost nothing; 0: also eagerly, e.g. CPU tests).
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

import torch

DEFAULTS: dict[str, dict[str, int]] = {
    # the row held in registers: 0.167 ms at 8k tokens, 73% of the copy bandwidth (4096/8: 0.207 ms; RESULTS.md)
    "silu_mul_fp8": {"block": 16384, "num_warps": 8, "programs_per_sm": 0},
    "rmsnorm": {"max_warps": 16},  # fewer warps sum a row in another order: other bits
    "fp8_per_token": {"num_warps": 4, "rows": 1, "programs_per_sm": 0},  # 0.035 ms at 8k (8 warps: 0.036)
    # a launch that splits the KV (small batches) reads 128 keys a step with 3 stages: 41.3 against 50.0 us a
    # layer at batch 1, 32k context (77% of the copy bandwidth); unsplit (batch 64) 64 keys stay faster (RESULTS.md)
    # kernels/gemv.py for 16-bit linears of up to max_rows rows, producer fused (0: cuBLAS), only while a CUDA
    # graph captures unless graph_only is 0; off until measured end to end (kernel level: RESULTS.md)
    "gemv": {"max_rows": 0, "graph_only": 1},
    "decode_attention": {"block_n": 64, "num_warps": 4, "num_stages": 2, "split_cap": 32, "programs_per_sm": 2,
                         "split_block_n": 128, "split_num_stages": 3},
}
ENV = "MIXQUANT_KERNEL_CONFIGS"
INTERPRETER_SMS = 4  # the SM count a persistent grid assumes in Triton's CPU interpreter (tests loop over rows)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


# (kernel, field) -> (test, what the field must be), beyond "a non-negative integer"
RULES = {
    ("silu_mul_fp8", "block"): (_pow2, "a power of two"),
    ("silu_mul_fp8", "num_warps"): (lambda v: _pow2(v) and v <= 32, "a power of two up to 32"),
    ("fp8_per_token", "num_warps"): (lambda v: v == 0 or _pow2(v) and v <= 32, "0 or a power of two up to 32"),
    ("fp8_per_token", "rows"): (_pow2, "a power of two"),
}


@cache
def _overrides(text: str) -> dict[str, dict[str, int]]:
    try:
        data = json.loads(text) if text else {}
    except ValueError as e:
        raise ValueError(f"{ENV} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{ENV} must be a JSON object of kernel -> fields, got {text!r}")
    for name, fields in data.items():
        if name not in DEFAULTS or not isinstance(fields, dict) or set(fields) - set(DEFAULTS[name]):
            raise ValueError(f"{ENV}: unknown kernel or field in {name!r}: {fields!r}; known: {DEFAULTS}")
        if not all(isinstance(v, int) and v >= 0 for v in fields.values()):
            raise ValueError(f"{ENV}: {name} fields must be non-negative integers, got {fields!r}")
        for field, v in fields.items():
            test, want = RULES.get((name, field), (None, ""))
            if test is not None and not test(v):
                raise ValueError(f"{ENV}: {name} {field} must be {want}, got {v}")
    return data


def config(name: str) -> dict[str, Any]:
    """The launch fields of kernel `name`: DEFAULTS[name] updated by the environment's override."""
    return {**DEFAULTS[name], **_overrides(os.environ.get(ENV, "")).get(name, {})}


def launch_grid(rows: int, programs_per_sm: int, device: torch.device) -> int:
    """Programs for `rows` rows (or row groups): one each for programs_per_sm 0, else at most programs_per_sm per
    SM (a persistent grid; the kernel loops)."""
    return rows if programs_per_sm == 0 else min(rows, programs_per_sm * num_sms(device))


def num_sms(device: torch.device) -> int:
    """The device's SM count; INTERPRETER_SMS in Triton's CPU interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
