"""Build a model from a Hugging Face folder: instantiate, stream safetensors into it, finish quantization.

Checkpoint names are routed to our modules: q/k/v and gate/up projections go to the merged layers as
shards, every linear tensor goes through the layer's quantization methods, the rest is copied as is.

Weights of each precision come from one of two places:
- the BF16 checkpoint (`model_path`): every non-linear tensor (embeddings, norms, lm_head: held once,
  shared by all precisions), the linear biases (shared too), and the linear weights of every precision
  not covered by a quantized checkpoint; quantized methods quantize them at load time (a);
- a quantized checkpoint (`quantized_path`: Model Optimizer (b) or compressed-tensors (c) NVFP4): the
  linear weights of its precision only. It must cover every linear layer; its other tensors are only
  checked for shape (they are expected to equal the BF16 ones).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from tqdm import tqdm

from mixquant_serve.config import ConfigError, ModelConfig
from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.models.registry import model_class
from mixquant_serve.quant.checkpoint import QuantizedCheckpoint, open_quantized_checkpoint

log = logging.getLogger("mixquant.loader")

_SKIP_SUFFIXES = ("rotary_emb.inv_freq",)
Target = tuple[str, str, "int | None"]


def checkpoint_files(folder: str | Path) -> list[Path]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model folder {str(folder)!r} has no *.safetensors weights")
    return files


def build_model(cfg: ModelConfig, precisions: tuple[str, ...], dtype: torch.dtype,
                device: torch.device, progress: bool = True, quantized_path: str | None = None) -> nn.Module:
    model = model_class(cfg)(cfg, precisions, dtype, device)
    _check_supported(model)
    quantized = _open_quantized(quantized_path, precisions)
    from_bf16 = tuple(p for p in precisions if quantized is None or p != quantized.precision)
    load_weights(model, cfg.path, progress, from_bf16)
    if quantized is not None:
        load_quantized(model, quantized, progress)
    _finish_linears(model)
    return model.eval()


def _open_quantized(path: str | None, precisions: Sequence[str]) -> QuantizedCheckpoint | None:
    if not path:
        return None
    ckpt = open_quantized_checkpoint(path)
    if ckpt.precision not in precisions:
        raise ConfigError(f"--quantized-model-path holds {ckpt.precision} weights, but no phase runs "
                          f"{ckpt.precision} (precisions: {', '.join(precisions)})")
    log.info("%s weights from %s", ckpt.precision, ckpt.describe())
    return ckpt


def _linears(model: nn.Module) -> Iterator[tuple[str, LinearBase]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LinearBase))


def _check_supported(model: nn.Module) -> None:
    for name, layer in _linears(model):
        for p, method in layer.methods.items():
            if reason := method.unsupported(layer):
                raise ConfigError(f"{name} cannot run in {p}: {reason}")


def _tensors(files: list[Path], desc: str, progress: bool) -> Iterator[tuple[str, safe_open]]:
    """(name, open file) for every tensor of `files`, with a progress bar."""
    total = sum(_count(f) for f in files)
    bar = tqdm(total=total, desc=desc, unit="tensor", disable=not progress, leave=False)
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a mapping)
                bar.update()
                yield name, st
    bar.close()


def load_weights(model: nn.Module, folder: str, progress: bool = True,
                 precisions: Sequence[str] | None = None) -> None:
    """Load the BF16 checkpoint; linear weights go to `precisions` (None: every precision of the layer)."""
    linear_weights = precisions is None or bool(precisions)
    expected = _expected_targets(model, linear_weights)
    loaded: set[Target] = set()
    for name, st in _tensors(checkpoint_files(folder), "Loading weights", progress):
        target = _route(model, name)
        if target is None or (not linear_weights and target[1] == "weight"
                              and isinstance(model.get_submodule(target[0]), LinearBase)):
            continue  # every precision's linear weights come from the quantized checkpoint
        _load_one(model, target, st.get_tensor(name), precisions)
        loaded.add(target)
    missing = sorted(f"{m}.{s}" + ("" if i is None else f"[{i}]") for m, s, i in expected - loaded)
    if missing:
        raise ConfigError(f"checkpoint in {folder!r} lacks {len(missing)} weights, e.g. {missing[:5]}")


def _count(path: Path) -> int:
    with safe_open(str(path), framework="pt", device="cpu") as st:
        return len(list(st.keys()))


def _route(model: nn.Module, name: str) -> Target | None:
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


def _load_one(model: nn.Module, target: Target, tensor: torch.Tensor,
              precisions: Sequence[str] | None = None) -> None:
    module_path, suffix, shard = target
    module = model.get_submodule(module_path)
    if isinstance(module, LinearBase):
        if precisions is None or suffix == "bias":
            module.load(suffix, tensor, shard)
        else:
            _load_linear(module, module_path, precisions, suffix, tensor, shard)
        return
    param = getattr(module, suffix)
    if tuple(param.shape) != tuple(tensor.shape):
        raise ConfigError(f"{module_path}.{suffix}: checkpoint shape {tuple(tensor.shape)}, "
                          f"model expects {tuple(param.shape)}")
    param.data.copy_(tensor)


def _load_linear(layer: LinearBase, path: str, precisions: Sequence[str], suffix: str, tensor: torch.Tensor,
                 shard_id: int | None) -> None:
    """One linear tensor into the given precisions of `layer` only."""
    shard = layer.shard(shard_id)
    taken = [layer.methods[p].load(layer.impls[p], layer, suffix, tensor, shard) for p in precisions]
    if not any(taken):
        raise ConfigError(f"{path}: no precision among {list(precisions)} takes tensor {suffix!r}")


def _expected_targets(model: nn.Module, linear_weights: bool = True) -> set[Target]:
    """What a BF16 checkpoint must provide: each linear weight shard and bias, and every other parameter."""
    out: set[Target] = set()
    linear_params: set[str] = set()
    for path, m in _linears(model):
        shards = [None] if len(m.output_sizes) == 1 else list(range(len(m.output_sizes)))
        if linear_weights:
            out.update((path, "weight", s) for s in shards)
        if m.bias is not None:
            out.update((path, "bias", s) for s in shards)
        linear_params.update(f"{path}.{n}" for n, _ in m.named_parameters())
    for name, _ in model.named_parameters():
        if name not in linear_params:
            *path, suffix = name.split(".")
            out.add((".".join(path), suffix, None))
    return out


def load_quantized(model: nn.Module, ckpt: QuantizedCheckpoint, progress: bool = True) -> None:
    """The linear tensors of a quantized checkpoint into its precision; the rest is checked for shape."""
    ignored: list[str] = []
    for name, st in _tensors(checkpoint_files(ckpt.folder), f"Loading {ckpt.precision} weights", progress):
        target = _route_quantized(model, name)
        if target is None:
            ignored.append(name)
            continue
        module_path, suffix, shard = target
        module = model.get_submodule(module_path)
        if not isinstance(module, LinearBase):
            _check_shape(module, module_path, suffix, st.get_slice(name).get_shape(), ckpt)
            continue
        translated = ckpt.translate(suffix, st.get_tensor(name))
        if translated is not None:
            try:
                _load_linear(module, module_path, (ckpt.precision,), *translated, shard)
            except ValueError as e:
                raise ConfigError(f"{ckpt.folder}: {name}: {e}") from None
    if ignored:
        log.warning("ignored %d tensors of %s that match nothing here, e.g. %s", len(ignored), ckpt.folder,
                    ignored[:3])


def _route_quantized(model: nn.Module, name: str) -> Target | None:
    try:
        target = _route(model, name)
    except ConfigError:
        return None
    if target is None:
        return None
    module = model.get_submodule(target[0])
    if not isinstance(module, LinearBase) and not hasattr(module, target[1]):
        return None
    return target


def _check_shape(module: nn.Module, path: str, suffix: str, shape: list[int],
                 ckpt: QuantizedCheckpoint) -> None:
    param = getattr(module, suffix)
    if tuple(param.shape) != tuple(shape):
        raise ConfigError(f"{ckpt.folder} holds {path}.{suffix} of shape {tuple(shape)}, the BF16 model "
                          f"{tuple(param.shape)}: the two checkpoints are of different models")


def _finish_linears(model: nn.Module) -> None:
    """Check that every quantized layer got all its tensors, then let each method finish its weights."""
    gaps = [f"{name} ({p}): {', '.join(missing)}" for name, layer in _linears(model)
            for p, method in layer.methods.items() if (missing := method.missing(layer.impls[p], layer))]
    if gaps:
        raise ConfigError(f"the checkpoints do not cover {len(gaps)} linear layers, "
                          f"e.g. {'; '.join(gaps[:3])}")
    for name, layer in _linears(model):
        try:
            layer.process_after_loading()
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of weights per precision (as stored), `<precision>_cache` for run-time copies (emulated
    GEMMs), and `shared` for the tensors every precision uses (embeddings, norms, lm_head, biases)."""
    per: dict[str, int] = {}
    linear_ids: set[int] = set()
    for _, m in _linears(model):
        for p, method in m.methods.items():
            impl = m.impls[p]
            per[p] = per.get(p, 0) + method.weight_bytes(impl)
            if cache := method.cache_bytes(impl):
                per[f"{p}_cache"] = per.get(f"{p}_cache", 0) + cache
        linear_ids.update(id(t) for t in m.impls.parameters())
        linear_ids.update(id(t) for t in m.impls.buffers())
    per["shared"] = sum(t.numel() * t.element_size() for t in model.parameters() if id(t) not in linear_ids)
    return per
