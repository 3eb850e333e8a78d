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
        "silu_mul_fp8": [{"block": 32, "num_warps": 2}, {"block": 128, "num_warps": 4, "programs_per_sm": 1}],
        "rmsnorm": [{"max_warps": 2}, {"max_warps": 16}],
        "fp8_per_token": [{"num_warps": 2}, {"num_warps": 4, "rows": 2, "programs_per_sm": 1}],
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
    rows, best = quant_kernels.sweep([3, 9], copy_gbs=1000.0)  # 9 rows: persistent grids loop (4 SMs on CPU)
    assert len(rows) == 12 and all(r[-1] == "yes" for r in rows)  # same bits in every configuration
    assert best == {"silu_mul_fp8": {"block": 128, "num_warps": 4, "programs_per_sm": 1},
                    "rmsnorm": {"max_warps": 16}, "fp8_per_token": {"num_warps": 4, "rows": 2, "programs_per_sm": 1}}
    assert rows[0][:3] == [3, "silu_mul_fp8", '{"block": 32, "num_warps": 2}']
    assert rows[0][4] == pytest.approx(3 * (4 * 96 + 96 + 4) / 2.0 / 1e6)


def test_attention_sweep_checks_outputs_and_picks_the_fastest(monkeypatch):
    """benchmarks/attention_kernels.py --sweep on tiny shapes: each "decode_attention" configuration's split count
    and output come from the backend under that configuration; a faster one whose output differs is never picked."""
    import json
    import os

    import attention_kernels as ak

    from mixquant_serve.layers.attention.triton_backend import TritonBackend

    monkeypatch.setattr(ak, "SMOKE_SWEEP_DECODE", [(1, 40), (3, 100)])
    bad = {**ak.SMOKE_SWEEP[0], "block_n": 64}
    monkeypatch.setattr(ak, "SMOKE_SWEEP", [*ak.SMOKE_SWEEP, bad])
    forward = TritonBackend.forward

    def off_under_bad(self, *args, **kw):  # a wrong kernel: the right output but for a 5% error under `bad`
        out = forward(self, *args, **kw)
        return out * 1.05 if json.loads(os.environ["MIXQUANT_KERNEL_CONFIGS"])["decode_attention"] == bad else out

    monkeypatch.setattr(TritonBackend, "forward", off_under_bad)
    times = iter([9.0, 2.0, 3.0, 1.0, 0.5] * 2)  # a fake clock (the default's warm-up first): SMOKE_SWEEP[1] wins
    monkeypatch.setattr(ak, "bench", lambda fn, graph=False, rep=200: (fn(), next(times))[1])
    monkeypatch.setenv("MIXQUANT_KERNEL_CONFIGS", '{"rmsnorm": {"max_warps": 8}}')  # kept, and restored after
    device = torch.device("cuda" if ON_GPU else "cpu")
    cases = ak.sweep(True, device, torch.bfloat16 if ON_GPU else torch.float32)
    assert os.environ["MIXQUANT_KERNEL_CONFIGS"] == '{"rmsnorm": {"max_warps": 8}}'
    assert [[r["splits"] for r in c["rows"]] for c in cases] == [[1, 4, 2, 4], [1, 3, 1, 3]] or ON_GPU
    assert [[r["same"] for r in c["rows"]] for c in cases] == [[True, True, True, False]] * 2
    lines = ak.sweep_report(cases, bw=1e12)
    assert lines[-1].endswith(f"""MIXQUANT_KERNEL_CONFIGS='{json.dumps({"decode_attention": ak.SMOKE_SWEEP[1]})}'""")
    assert sum("DIFFERS" in line for line in lines) == 2
    assert "(geometric mean 0.500 of the default's time)" in lines[-1]
