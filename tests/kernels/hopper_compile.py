"""Compile Triton kernels for an H100/H200 (sm_90) without a GPU: catches what the CPU interpreter accepts
but the compiler rejects, and shows whether the gathered K/V loads are pipelined (async copies).

Runs in a subprocess: once Triton is imported under TRITON_INTERPRET=1, its own library functions
(tl.max, ...) are interpreted and cannot be compiled in that process.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]


def compile_for_hopper(specs: list[dict[str, Any]]) -> list[dict[str, int]]:
    """Each spec: module, kernel, pointers (pointer argument -> element type, e.g. "bf16"), constexprs,
    options (num_warps, num_stages), optionally ints (names of i32 run-time arguments). Other arguments
    are i32 strides (stride_*, taken as 16-divisible as a real launch specializes them) or fp32 scalars.
    Returns per kernel: async_copies, shared (bytes)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(_ROOT)
    run = subprocess.run([sys.executable, __file__], input=json.dumps(specs), capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    if run.returncode:
        raise AssertionError(f"compiling for sm_90 failed:\n{run.stderr[-6000:]}")
    return json.loads(run.stdout.splitlines()[-1])


def _compile(module: str, kernel: str, pointers: dict[str, str], constexprs: dict[str, Any],
             options: dict[str, int], ints: tuple[str, ...] = ()) -> dict[str, int]:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(module), kernel)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name], attrs[(i,)] = "*" + pointers[name], [["tt.divisibility", 16]]
        elif name in ints:
            sig[name] = "i32"
        elif name.startswith("stride"):
            sig[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
    return {"async_copies": compiled.asm["ttgir"].count("async_copy_global_to_local"),
            "shared": compiled.metadata.shared}


if __name__ == "__main__":
    print(json.dumps([_compile(**spec) for spec in json.load(sys.stdin)]))
