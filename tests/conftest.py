"""Shared test set-up: GPU tests are skipped without CUDA."""

from __future__ import annotations

import pytest


def _has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm_path() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted once into the cache)."""
    from mixquant_serve.models.embedded import embedded_model_path

    return str(embedded_model_path())
