"""benchmarks/quant_kernels.py --sweep on tiny shapes (Triton's interpreter on CPU, the GPU when there is one):
every launch configuration of kernels/tuning.py is timed, checked bit for bit against the default, and the
fastest one per kernel is what it reports for MIXQUANT_KERNEL_CONFIGS."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import ON_GPU

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import quant_kernels  # noqa: E402


def test_sweep_checks_bits_and_picks_the_fastest(monkeypatch):
    monkeypatch.setattr(quant_kernels, "HIDDEN", 64)
    monkeypatch.setattr(quant_kernels, "INTER", 96)
    monkeypatch.setattr(quant_kernels, "SWEEP", {
        "silu_mul_fp8": [{"block": 32, "num_warps": 2}, {"block": 128, "num_warps": 4}],
        "rmsnorm": [{"max_warps": 2}, {"max_warps": 16}],
        "fp8_per_token": [{"num_warps": 2}, {"num_warps": 4}],
    })
    if not ON_GPU:  # the benchmark builds its inputs on "cuda" in bfloat16: the interpreter takes CPU float16
        real_randn, real_rand = torch.randn, torch.rand

        def cpu(fn):
            return lambda *a, device=None, dtype=None, **k: fn(*a, **k).to(torch.float16)

        monkeypatch.setattr(torch, "randn", cpu(real_randn))
        monkeypatch.setattr(torch, "rand", cpu(real_rand))
    # a fake clock: the second configuration of each kernel is the faster one
    times = iter([2.0, 1.0] * 6)
    monkeypatch.setattr(quant_kernels, "bench", lambda fn: (fn(), next(times))[1])
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", "{}")  # the sweep sets it per configuration; restored after
    rows, best = quant_kernels.sweep([3, 5], copy_gbs=1000.0)
    assert len(rows) == 12 and all(r[-1] == "yes" for r in rows)  # same bits in every configuration
    assert best == {"silu_mul_fp8": {"block": 128, "num_warps": 4}, "rmsnorm": {"max_warps": 16},
                    "fp8_per_token": {"num_warps": 4}}
    assert rows[0][:3] == [3, "silu_mul_fp8", '{"block": 32, "num_warps": 2}']
    assert rows[0][4] == pytest.approx(3 * (4 * 96 + 96 + 4) / 2.0 / 1e6)
