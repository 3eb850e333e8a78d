"""Architecture name (config.json "architectures") -> model class, imported lazily."""

from __future__ import annotations

import importlib

from mixquant_serve.config import ConfigError, ModelConfig

_ARCHS = {
    "LlamaForCausalLM": "mixquant_serve.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "mixquant_serve.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "mixquant_serve.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "mixquant_serve.models.qwen3:Qwen3ForCausalLM",
}


def supported_architectures() -> list[str]:
    return sorted(_ARCHS)


def check_architecture(cfg: ModelConfig) -> None:
    if cfg.architecture not in _ARCHS:
        raise ConfigError(
            f"model {cfg.path!r} has architecture {cfg.architecture!r}, which mixquant-serve does not "
            f"support; supported: {', '.join(supported_architectures())}"
        )


def model_class(cfg: ModelConfig) -> type:
    check_architecture(cfg)
    module, cls = _ARCHS[cfg.architecture].split(":")
    return getattr(importlib.import_module(module), cls)
