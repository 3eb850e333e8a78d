"""compressed-tensors `nvfp4-pack-quantized` checkpoints (llm-compressor; e.g. RedHatAI's *-NVFP4 models).

Per quantized linear layer: `weight_packed` uint8 [N, K/2] (low nibble first, as Model Optimizer),
`weight_scale` float8_e4m3fn [N, K/16], and `weight_global_scale` / `input_global_scale` fp32, which
DIVIDE to dequantize: they are the reciprocals of Model Optimizer's `weight_scale_2` / `input_scale`.
We load them as float32 reciprocals (``1 / global``), so the packed codes and block scales are used
bit for bit and only the one global factor per GEMM may differ from a division by an ulp.
Activations are quantized with Model Optimizer's rule and the reciprocal input scale; weight-only
checkpoints (no `input_activations`, "NVFP4A16") are refused: our NVFP4 method is W4A4.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mixquant_serve.config import ConfigError
from mixquant_serve.quant.checkpoint import QuantizedCheckpoint, read_json

FORMAT = "nvfp4-pack-quantized"
_RECIPROCAL = {"weight_global_scale": "weight_scale_2", "input_global_scale": "input_scale"}


class CompressedTensorsNVFP4(QuantizedCheckpoint):
    name = "compressed-tensors"
    precision = "nvfp4"

    @classmethod
    def detect(cls, folder: Path) -> bool:
        qcfg = read_json(folder / "config.json").get("quantization_config") or {}
        return qcfg.get("quant_method") == "compressed-tensors"

    def validate(self) -> None:
        qcfg = self.hf_config["quantization_config"]
        groups = qcfg.get("config_groups") or {}
        if not groups:
            raise ConfigError(f"{self.folder}: compressed-tensors config has no config_groups")
        for name, group in groups.items():
            fmt = group.get("format") or qcfg.get("format")
            if fmt != FORMAT:
                raise ConfigError(f"{self.folder}: compressed-tensors format {fmt!r} (group {name}) is not "
                                  f"supported; this engine reads {FORMAT!r}")
            weights = group.get("weights") or {}
            if (weights.get("num_bits"), weights.get("type"), weights.get("group_size")) != (4, "float", 16):
                raise ConfigError(f"{self.folder}: group {name} is not NVFP4 (4-bit float, groups of 16)")
            if not group.get("input_activations"):
                raise ConfigError(f"{self.folder}: group {name} quantizes weights only (NVFP4A16); "
                                  "the nvfp4 precision runs W4A4")

    def translate(self, suffix: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if suffix in ("bias", "weight_zero_point"):
            return None
        if suffix == "weight_packed":
            return "weight", tensor
        if suffix == "weight":  # a layer in the `ignore` list, stored unquantized
            return "weight_unquantized", tensor
        if suffix == "weight_scale":
            return suffix, tensor
        if suffix in _RECIPROCAL:
            return _RECIPROCAL[suffix], torch.reciprocal(tensor.float())
        raise ConfigError(f"{self.folder}: unexpected tensor suffix {suffix!r} in a linear layer")
