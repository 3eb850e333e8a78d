"""Shared test set-up: GPU tests are skipped without CUDA; without one, Triton kernels run in its interpreter.

Triton reads TRITON_INTERPRET when a kernel is decorated, so it is set here, before any test module
imports a kernel. On CPU the interpreter computes in float16 and float32 like the GPU, but not in bfloat16
(its casts to bfloat16 truncate instead of rounding, and bf16 ``tl.dot`` is wrong): DOT_DTYPES lists the
dtypes a kernel test may use on this machine, bfloat16 only on a GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")
DOT_DTYPES = (torch.float16, torch.float32, torch.bfloat16) if ON_GPU else (torch.float16, torch.float32)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ON_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted once into the cache).

    Offline GPU hosts lack its package: there the tests that need it are skipped; on CPU it must be there."""
    from mixquant_serve.config import ConfigError
    from mixquant_serve.models.embedded import embedded_model_path

    try:
        return str(embedded_model_path())
    except ConfigError as e:
        if ON_GPU:
            pytest.skip(f"the embedded model is not installed on this GPU host ({e})")
        raise
