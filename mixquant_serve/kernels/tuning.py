"""Launch configurations of the memory-bound Triton kernels, with a per-device override.

The defaults are the ones `benchmarks/quant_kernels.py --sweep` measured best on one H200 (benchmarks/RESULTS.md);
the sweep checks that every configuration writes the same bits. MIXQUANT_KERNEL_CONFIGS, a JSON object
``{"kernel": {"field": value, ...}}``, overrides fields for another GPU (the sweep prints the object to use).
Fields: "silu_mul_fp8": block (columns per step; at least the row width: the whole row stays in registers,
one read of gate_up) and num_warps; "rmsnorm": max_warps; "fp8_per_token": num_warps (0: 4 up to a block of
1024 columns, else 8).
"""

from __future__ import annotations

import json
import os
from functools import cache
from typing import Any

DEFAULTS: dict[str, dict[str, int]] = {
    "silu_mul_fp8": {"block": 4096, "num_warps": 8},  # 0.226 ms at 8k tokens (2048/8 before: 0.234)
    "rmsnorm": {"max_warps": 16},  # fewer warps sum a row in another order: other bits
    "fp8_per_token": {"num_warps": 4},  # 0.035 ms at 8k (8 before: 0.036), 0.033 at 2k (0.039)
}
ENV = "MIXQUANT_KERNEL_CONFIGS"


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
    return data


def config(name: str) -> dict[str, Any]:
    """The launch fields of kernel `name`: DEFAULTS[name] updated by the environment's override."""
    return {**DEFAULTS[name], **_overrides(os.environ.get(ENV, "")).get(name, {})}
