"""NVIDIA Model Optimizer NVFP4 exports (`hf_quant_config.json`, "quant_algo": "NVFP4").

Per quantized linear layer: `weight` uint8 [N, K/2] (two E2M1 codes a byte, low nibble first),
`weight_scale` float8_e4m3fn [N, K/16], `weight_scale_2` fp32 (global weight scale) and `input_scale`
fp32 (static global activation scale), all multiplying to dequantize: the names our NVFP4 method takes.
q/k/v and gate/up carry equal scales in these exports; the method copes with unequal ones too.
Layers in `exclude_modules` are stored in BF16 and stay unquantized in this precision.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from mixquant_serve.config import ConfigError
from mixquant_serve.quant.checkpoint import QuantizedCheckpoint, read_json

log = logging.getLogger("mixquant.quant")

_TAKEN = ("weight_scale", "weight_scale_2", "input_scale")


class ModelOptNVFP4(QuantizedCheckpoint):
    name = "modelopt"
    precision = "nvfp4"

    @classmethod
    def detect(cls, folder: Path) -> bool:
        if (folder / "hf_quant_config.json").is_file():
            return True
        qcfg = read_json(folder / "config.json").get("quantization_config") or {}
        return qcfg.get("quant_method") == "modelopt"

    def quant_config(self) -> dict:
        hf_quant = read_json(self.folder / "hf_quant_config.json").get("quantization")
        return hf_quant if hf_quant is not None else self.hf_config.get("quantization_config") or {}

    def validate(self) -> None:
        qcfg = self.quant_config()
        algo = qcfg.get("quant_algo")
        if algo != "NVFP4":
            raise ConfigError(f"{self.folder}: Model Optimizer quant_algo {algo!r} is not supported "
                              "(this engine reads NVFP4)")
        if int(qcfg.get("group_size", 16)) != 16:
            raise ConfigError(f"{self.folder}: NVFP4 group_size must be 16, got {qcfg.get('group_size')}")
        if qcfg.get("kv_cache_quant_algo"):
            log.warning("%s: ignoring kv_cache_quant_algo=%s; the KV cache stays in the model dtype",
                        self.folder, qcfg["kv_cache_quant_algo"])

    def translate(self, suffix: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        if suffix == "bias":
            return None  # biases are shared across precisions and come from the BF16 checkpoint
        if suffix == "weight":
            return ("weight" if tensor.dtype == torch.uint8 else "weight_unquantized"), tensor
        if suffix in _TAKEN:
            return suffix, tensor
        raise ConfigError(f"{self.folder}: unexpected tensor suffix {suffix!r} in a linear layer")
