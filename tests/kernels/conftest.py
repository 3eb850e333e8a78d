"""Kernel tests: on the GPU when there is one, else in Triton's interpreter (tests/conftest.py sets it up)."""

from __future__ import annotations

import pytest
import torch
from conftest import DOT_DTYPES, ON_GPU

pytest.importorskip("triton", reason="the kernel tests need triton (the dev extra installs it)")


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


__all__ = ["DOT_DTYPES", "ON_GPU"]
