"""Pre-quantized checkpoints: detect a folder's format and translate its linear tensors for a method.

A format is a subclass of QuantizedCheckpoint registered in `_FORMATS`; `open_quantized_checkpoint`
tries each one's `detect`. `translate` maps one tensor of a linear layer (its name suffix, e.g.
"weight_packed") to the suffix and value the precision's QuantMethod takes (e.g. "weight"); None skips it.
Everything that is not a linear layer (embeddings, norms, lm_head) is taken from the BF16 checkpoint.
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import torch

from mixquant_serve.config import ConfigError


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


class QuantizedCheckpoint(ABC):
    name: str  # the format, for logs
    precision: str  # the precision whose weights the checkpoint holds

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.hf_config = read_json(folder / "config.json")
        self.validate()

    @classmethod
    @abstractmethod
    def detect(cls, folder: Path) -> bool:
        """Whether `folder` is in this format (cheap: reads only small JSON files)."""

    @abstractmethod
    def validate(self) -> None:
        """Raise ConfigError if the checkpoint is in this format but holds something we cannot run."""

    @abstractmethod
    def translate(self, suffix: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """One tensor of a linear layer -> (the method's suffix, tensor), or None to skip it."""

    def describe(self) -> str:
        return f"{self.name} {self.precision} checkpoint {self.folder}"


_FORMATS = {
    "modelopt": "mixquant_serve.quant.modelopt:ModelOptNVFP4",
    "compressed-tensors": "mixquant_serve.quant.compressed_tensors:CompressedTensorsNVFP4",
}


def _format_class(target: str) -> type[QuantizedCheckpoint]:
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)


def open_quantized_checkpoint(folder: str | Path) -> QuantizedCheckpoint:
    path = Path(folder)
    if not path.is_dir():
        raise ConfigError(f"--quantized-model-path {str(path)!r} is not a folder")
    for target in _FORMATS.values():
        cls = _format_class(target)
        if cls.detect(path):
            return cls(path)
    raise ConfigError(f"{str(path)!r} is not a quantized checkpoint this engine reads; known formats: "
                      f"{', '.join(_FORMATS)} (NVFP4)")
