"""Quantized checkpoints: a real Model Optimizer NVFP4 export (made here on CPU with mtq.quantize and
export_hf_checkpoint) and a compressed-tensors tensor set derived from it load bit for bit; quantizing
the BF16 checkpoint at load time gives the same weights; broken or foreign checkpoints are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from mixquant_serve.config import ConfigError, ModelConfig
from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.models.loader import build_model

mtq = pytest.importorskip("modelopt.torch.quantization")
export_hf_checkpoint = pytest.importorskip("modelopt.torch.export").export_hf_checkpoint

SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
CPU = torch.device("cpu")
STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


def _hf_config(arch: str):
    if arch == "qwen3":
        return Qwen3Config(head_dim=32, architectures=["Qwen3ForCausalLM"], **SMALL)
    return LlamaConfig(architectures=["LlamaForCausalLM"], **SMALL)


def make_modelopt_export(arch: str, root: Path) -> tuple[str, str]:
    """A BF16 checkpoint with random weights and its Model Optimizer NVFP4 export (calibrated on CPU)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(arch)).to(torch.bfloat16).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    model.save_pretrained(root / "bf16")
    gen = torch.Generator().manual_seed(1)

    def forward_loop(m):
        for _ in range(4):
            m(torch.randint(0, SMALL["vocab_size"], (1, 32), generator=gen))

    with torch.no_grad():
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=root / "nvfp4")
    return str(root / "bf16"), str(root / "nvfp4")


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def export(request, tmp_path_factory):
    return make_modelopt_export(request.param, tmp_path_factory.mktemp(request.param))


def _build(bf16: str, precisions=("bf16", "nvfp4"), quantized: str | None = None, dtype=torch.float32):
    return build_model(ModelConfig.from_path(bf16), precisions, dtype, CPU, progress=False,
                       quantized_path=quantized)


def _tensors(folder: str) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.element_size() == 1 else t.contiguous().view(torch.int32)


def _layer_names(model) -> list[tuple[str, LinearBase, list[str]]]:
    """(our module, layer, checkpoint prefixes of its shards in order)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, LinearBase):
            parent, leaf = name.rsplit(".", 1)
            shards = [k for k, (ours, _) in STACKED.items() if ours == leaf]
            out.append((name, m, [f"{parent}.{s}" for s in shards] or [name]))
    return out


def test_modelopt_export_loads_bit_for_bit(export):
    bf16, nvfp4 = export
    ckpt = _tensors(nvfp4)
    model = _build(bf16, quantized=nvfp4)
    for _name, layer, prefixes in _layer_names(model):
        impl = layer.impls["nvfp4"]
        for suffix in ("weight", "weight_scale"):
            expected = torch.cat([ckpt[f"{p}.{suffix}"] for p in prefixes])
            assert torch.equal(_bits(getattr(impl, suffix)), _bits(expected))
        w2 = torch.stack([ckpt[f"{p}.weight_scale_2"] for p in prefixes])
        assert torch.equal(_bits(impl.weight_scale_2), _bits(w2))
        inputs = torch.stack([ckpt[f"{p}.input_scale"] for p in prefixes])
        assert torch.equal(_bits(impl.x_scale), _bits(inputs.max()))
        assert len(set(w2.tolist())) == 1 and len(set(inputs.tolist())) == 1  # Model Optimizer shares them
        assert impl.cache is not None


def test_quantize_at_load_equals_modelopt_weights(export):
    """(a) == (b): the global scale of a merged layer comes from the merged weight, as in the export."""
    bf16, nvfp4 = export
    ckpt = _tensors(nvfp4)
    model = _build(bf16, dtype=torch.bfloat16)
    for _name, layer, prefixes in _layer_names(model):
        impl = layer.impls["nvfp4"]
        assert torch.equal(impl.weight, torch.cat([ckpt[f"{p}.weight"] for p in prefixes]))
        block_scales = torch.cat([ckpt[f"{p}.weight_scale"] for p in prefixes])
        assert torch.equal(_bits(impl.weight_scale), _bits(block_scales))
        assert torch.equal(impl.weight_scale_2, torch.stack([ckpt[f"{p}.weight_scale_2"] for p in prefixes]))
        assert impl.x_scale is None  # no calibration: dynamic activation scales


def make_compressed_tensors(nvfp4: str, out: Path, ignore_layer: str | None = None) -> str:
    """The export rewritten as a compressed-tensors nvfp4-pack-quantized checkpoint."""
    out.mkdir()
    tensors = {}
    for name, t in _tensors(nvfp4).items():
        prefix, suffix = name.rsplit(".", 1)
        if suffix == "weight" and t.dtype == torch.uint8:
            tensors[f"{prefix}.weight_packed"] = t
        elif suffix == "weight_scale_2":
            tensors[f"{prefix}.weight_global_scale"] = torch.reciprocal(t).reshape(1)
        elif suffix == "input_scale":
            tensors[f"{prefix}.input_global_scale"] = torch.reciprocal(t).reshape(1)
        else:
            tensors[name] = t
    save_file(tensors, str(out / "model.safetensors"))
    cfg = json.loads((Path(nvfp4) / "config.json").read_text())
    scheme = {"num_bits": 4, "type": "float", "group_size": 16, "strategy": "tensor_group", "symmetric": True}
    cfg["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {**scheme, "dynamic": False},
                                      "input_activations": {**scheme, "dynamic": "local"}}},
        "ignore": ["lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    return str(out)


def test_compressed_tensors_loads_bit_for_bit(export, tmp_path):
    bf16, nvfp4 = export
    ct = make_compressed_tensors(nvfp4, tmp_path / "ct")
    ct_tensors, mo_tensors = _tensors(ct), _tensors(nvfp4)
    model = _build(bf16, quantized=ct)
    reference = _build(bf16, quantized=nvfp4)
    for (_name, layer, prefixes), (_, ref_layer, _) in zip(_layer_names(model), _layer_names(reference),
                                                          strict=True):
        impl, ref = layer.impls["nvfp4"], ref_layer.impls["nvfp4"]
        packed = torch.cat([ct_tensors[f"{p}.weight_packed"] for p in prefixes])
        assert torch.equal(impl.weight, packed) and torch.equal(impl.weight, ref.weight)
        assert torch.equal(_bits(impl.weight_scale), _bits(ref.weight_scale))
        # the global scales are float32 reciprocals of compressed-tensors' ...
        recip = torch.reciprocal(torch.cat([ct_tensors[f"{p}.weight_global_scale"] for p in prefixes]))
        assert torch.equal(impl.weight_scale_2, recip)
        # ... which round-trip to Model Optimizer's within one float32 ulp
        mo = torch.stack([mo_tensors[f"{p}.weight_scale_2"] for p in prefixes])
        assert ((_bits(impl.weight_scale_2) - _bits(mo)).abs() <= 1).all()
        assert ((_bits(impl.x_scale) - _bits(ref.x_scale)).abs() <= 1).all()
    x = torch.randn(5, SMALL["hidden_size"], generator=torch.Generator().manual_seed(3))
    with forward_context(ForwardContext("nvfp4", None, None)):
        mlp, ref_mlp = model.model.layers[0].mlp, reference.model.layers[0].mlp
        assert torch.allclose(mlp(x), ref_mlp(x), rtol=1e-5, atol=1e-6)


def _copy_export(nvfp4: str, out: Path, edit) -> str:
    shutil.copytree(nvfp4, out)
    tensors = _tensors(nvfp4)
    edit(tensors)
    for f in out.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, str(out / "model.safetensors"))
    return str(out)


def test_incomplete_checkpoint_names_the_layer(export, tmp_path):
    bf16, nvfp4 = export
    broken = _copy_export(nvfp4, tmp_path / "broken",
                          lambda t: t.pop("model.layers.1.mlp.up_proj.weight_scale"))
    named = r"model\.layers\.1\.mlp\.gate_up_proj \(nvfp4\): weight_scale\[1\]"
    with pytest.raises(ConfigError, match=named):
        _build(bf16, quantized=broken)


def test_checkpoint_of_another_model_is_refused(export, tmp_path):
    bf16, nvfp4 = export
    other = _copy_export(nvfp4, tmp_path / "other",
                         lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.bfloat16)}))
    with pytest.raises(ConfigError, match="different models"):
        _build(bf16, quantized=other)
    wrong = _copy_export(nvfp4, tmp_path / "wrong", lambda t: t.update(
        {"model.layers.0.self_attn.o_proj.weight": torch.zeros(64, 16, dtype=torch.uint8)}))
    with pytest.raises(ConfigError, match="o_proj"):
        _build(bf16, quantized=wrong)


def test_excluded_layer_runs_unquantized(export, tmp_path):
    bf16, nvfp4 = export
    w = _tensors(bf16)["model.layers.0.self_attn.o_proj.weight"]

    def exclude(t):
        for s in ("weight_scale", "weight_scale_2", "input_scale"):
            t.pop(f"model.layers.0.self_attn.o_proj.{s}")
        t["model.layers.0.self_attn.o_proj.weight"] = w

    model = _build(bf16, quantized=_copy_export(nvfp4, tmp_path / "excl", exclude))
    layer = model.model.layers[0].self_attn.o_proj
    x = torch.randn(3, layer.input_size)
    with forward_context(ForwardContext("nvfp4", None, None)):
        assert torch.equal(layer(x), torch.nn.functional.linear(x, w.float()))


def test_unsupported_checkpoints_are_refused(export, tmp_path):
    bf16, nvfp4 = export
    fp8 = shutil.copytree(nvfp4, tmp_path / "fp8")
    qcfg = json.loads((fp8 / "hf_quant_config.json").read_text())
    qcfg["quantization"]["quant_algo"] = "FP8"
    (fp8 / "hf_quant_config.json").write_text(json.dumps(qcfg))
    with pytest.raises(ConfigError, match="FP8"):
        _build(bf16, quantized=str(fp8))
    w4a16 = Path(make_compressed_tensors(nvfp4, tmp_path / "w4a16"))
    cfg = json.loads((w4a16 / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["input_activations"] = None
    (w4a16 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="weights only"):
        _build(bf16, quantized=str(w4a16))
    with pytest.raises(ConfigError, match="not a quantized checkpoint"):
        _build(bf16, quantized=bf16)
    with pytest.raises(ConfigError, match="no phase runs nvfp4"):
        _build(bf16, precisions=("bf16", "fp8"), quantized=nvfp4)


def test_bf16_weights_skipped_when_every_precision_is_quantized(export):
    """prefill = decode = nvfp4 from a checkpoint: no BF16 linear weights are held or needed."""
    bf16, nvfp4 = export
    model = _build(bf16, precisions=("nvfp4",), quantized=nvfp4)
    assert all(set(m.impls) == {"nvfp4"} for _, m, _ in _layer_names(model))


def test_k_not_multiple_of_16_names_the_layer():
    hf = dict(SMALL, hidden_size=72, architectures=["LlamaForCausalLM"])
    cfg = ModelConfig.from_dict(hf, path="/nonexistent")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.self_attn\.qkv_proj cannot run in nvfp4"):
        build_model(cfg, ("bf16", "nvfp4"), torch.float32, CPU, progress=False)
