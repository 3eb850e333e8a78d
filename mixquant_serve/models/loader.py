"""Build a model from a Hugging Face folder: instantiate, stream safetensors into it, finish quantization.

Checkpoint names are routed to our modules: q/k/v and gate/up projections go to the merged layers as
shards, every linear tensor goes through the layer's quantization methods, the rest is copied as is.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from mixquant_serve.config import ConfigError, ModelConfig
from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.models.registry import model_class

_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(folder: str) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model folder {folder!r} has no *.safetensors weights")
    return files


def build_model(cfg: ModelConfig, precisions: tuple[str, ...], dtype: torch.dtype,
                device: torch.device, progress: bool = True) -> nn.Module:
    model = model_class(cfg)(cfg, precisions, dtype, device)
    load_weights(model, cfg.path, progress)
    for m in model.modules():
        if isinstance(m, LinearBase):
            m.process_after_loading()
    return model.eval()


def load_weights(model: nn.Module, folder: str, progress: bool = True) -> None:
    files = checkpoint_files(folder)
    expected = _expected_targets(model)
    loaded: set[tuple[str, str, int | None]] = set()
    bar = tqdm(total=sum(_count(f) for f in files), desc="Loading weights", unit="tensor",
               disable=not progress, leave=False)
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                bar.update()
                target = _route(model, name)
                if target is not None:
                    _load_one(model, target, st.get_tensor(name))
                    loaded.add(target)
    bar.close()
    missing = sorted(f"{m}.{s}" + ("" if i is None else f"[{i}]") for m, s, i in expected - loaded)
    if missing:
        raise ConfigError(f"checkpoint in {folder!r} lacks {len(missing)} weights, e.g. {missing[:5]}")


def _count(path: Path) -> int:
    with safe_open(str(path), framework="pt", device="cpu") as st:
        return len(list(st.keys()))


def _route(model: nn.Module, name: str) -> tuple[str, str, int | None] | None:
    """Checkpoint name -> (our module path, tensor suffix, shard index) or None to skip it."""
    if name.endswith(_SKIP_SUFFIXES):
        return None
    *path, suffix = name.split(".")
    shard = None
    if path and path[-1] in model.stacked:
        path[-1], shard = model.stacked[path[-1]]
    module_path = ".".join(path)
    if module_path == "lm_head" and model.config.tie_word_embeddings:
        return None
    try:
        model.get_submodule(module_path)
    except AttributeError:
        raise ConfigError(f"checkpoint tensor {name!r} matches no module of {type(model).__name__}") from None
    return module_path, suffix, shard


def _load_one(model: nn.Module, target: tuple[str, str, int | None], tensor: torch.Tensor) -> None:
    module_path, suffix, shard = target
    module = model.get_submodule(module_path)
    if isinstance(module, LinearBase):
        module.load(suffix, tensor, shard)
        return
    param = getattr(module, suffix)
    if tuple(param.shape) != tuple(tensor.shape):
        raise ConfigError(f"{module_path}.{suffix}: checkpoint shape {tuple(tensor.shape)}, "
                          f"model expects {tuple(param.shape)}")
    param.data.copy_(tensor)


def _expected_targets(model: nn.Module) -> set[tuple[str, str, int | None]]:
    """What a BF16 checkpoint must provide: each linear weight shard and bias, and every other parameter."""
    out: set[tuple[str, str, int | None]] = set()
    linear_params: set[str] = set()
    for path, m in model.named_modules():
        if isinstance(m, LinearBase):
            shards = [None] if len(m.output_sizes) == 1 else list(range(len(m.output_sizes)))
            out.update((path, "weight", s) for s in shards)
            if m.bias is not None:
                out.update((path, "bias", s) for s in shards)
            linear_params.update(f"{path}.{n}" for n, _ in m.named_parameters())
    for name, _ in model.named_parameters():
        if name not in linear_params:
            *path, suffix = name.split(".")
            out.add((".".join(path), suffix, None))
    return out


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights per precision: the linear layers' own weights plus the shared BF16 tensors."""
    per: dict[str, int] = {}
    linear_ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, LinearBase):
            for p, b in m.weight_bytes().items():
                per[p] = per.get(p, 0) + b
            linear_ids.update(id(t) for t in m.impls.parameters())
            linear_ids.update(id(t) for t in m.impls.buffers())
    shared = sum(t.numel() * t.element_size() for t in model.parameters() if id(t) not in linear_ids)
    per["shared"] = shared
    return per
