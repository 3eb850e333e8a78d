"""Kernel tests: Triton kernels run on the GPU when there is one, else in Triton's interpreter on CPU.

The interpreter must be chosen before any kernel module is imported (``triton.jit`` reads it when it
decorates), which conftest guarantees. On CPU the interpreter computes ``tl.dot`` correctly in float16
and float32 but not in bfloat16, so CPU cases use those dtypes; bfloat16 cases run on the GPU only.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="the kernel tests need triton (the dev extra installs it)")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


# dtypes a kernel test may use for tl.dot operands on this machine
DOT_DTYPES = (torch.float16, torch.float32, torch.bfloat16) if ON_GPU else (torch.float16, torch.float32)
