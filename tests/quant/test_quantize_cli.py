"""`mixquant-serve quantize`: calibration windows, the shipped calibration set, and an end-to-end run on a
tiny random model whose output the engine's loader reads back (static input scales, same weights)."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3Config

from mixquant_serve.config import ModelConfig
from mixquant_serve.data import read_jsonl
from mixquant_serve.layers.linear import LinearBase
from mixquant_serve.models.loader import build_model
from mixquant_serve.quant import quantize_cli
from mixquant_serve.quant.quantize_cli import add_parser, calibration_token_ids, calibration_windows
from mixquant_serve.tokenizer import Tokenizer

pytest.importorskip("modelopt.torch.quantization")


def test_windows_do_not_overlap_and_respect_the_sample_count():
    ids = list(range(100))
    assert calibration_windows(ids, 3, 30) == [ids[0:30], ids[30:60], ids[60:90]]
    assert len(calibration_windows(ids, 50, 30)) == 3  # the stream holds only three full windows
    assert calibration_windows(ids[:10], 4, 30) == [ids[:10]]  # shorter than a window: used whole


def test_shipped_calibration_set_renders_chats(smollm_path):
    records = read_jsonl("calibration.jsonl")
    assert len(records) >= 20 and any("messages" in r for r in records) and any("text" in r for r in records)
    tok = Tokenizer.from_path(smollm_path)
    ids = calibration_token_ids(tok, records)
    assert len(ids) > 4000
    im_start = tok.encode("<|im_start|>", add_special_tokens=False)
    assert ids.count(im_start[0]) >= sum(len(r.get("messages", [])) for r in records)


def test_parser_defaults():
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["quantize", "--output", "/tmp/x"])
    assert (args.calib_samples, args.calib_seq_len, args.model_path) == (64, 256, None)
    assert args.func is quantize_cli.run


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, smollm_path) -> str:
    folder = tmp_path_factory.mktemp("tiny") / "bf16"
    cfg = Qwen3Config(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                      architectures=["Qwen3ForCausalLM"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(Path(smollm_path) / f, folder / f)
    return str(folder)


def test_quantize_writes_a_checkpoint_the_engine_loads(tiny_model, tmp_path, capsys):
    out = tmp_path / "nvfp4"
    rc = quantize_cli.main(["--model-path", tiny_model, "--output", str(out), "--calib-samples", "4",
                            "--calib-seq-len", "48"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "calibrating" in err and "4 x 48 tokens" in err and "wrote" in err
    qcfg = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert qcfg["quant_algo"] == "NVFP4" and qcfg["group_size"] == 16
    assert (out / "tokenizer.json").is_file() and (out / "chat_template.jinja").is_file()
    meta = json.loads((out / "mixquant_quantize.json").read_text())
    assert (meta["calib_samples"], meta["calib_seq_len"], meta["config"]) == (4, 48, "NVFP4_DEFAULT_CFG")

    cfg = ModelConfig.from_path(tiny_model)
    loaded = build_model(cfg, ("bf16", "nvfp4"), torch.bfloat16, torch.device("cpu"), progress=False,
                         quantized_path=str(out))
    at_load = build_model(cfg, ("bf16", "nvfp4"), torch.bfloat16, torch.device("cpu"), progress=False)
    pairs = zip(loaded.modules(), at_load.modules(), strict=True)
    layers = [(a, b) for a, b in pairs if isinstance(a, LinearBase)]
    assert len(layers) == 2 * 4
    for a, b in layers:
        qa, qb = a.impls["nvfp4"], b.impls["nvfp4"]
        assert torch.equal(qa.weight, qb.weight) and torch.equal(qa.weight_scale_2, qb.weight_scale_2)
        assert qa.x_scale is not None and qa.x_scale > 0 and qb.x_scale is None  # calibrated: static scale


def test_bad_model_path_exits_2(tmp_path, capsys):
    argv = ["--model-path", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]
    assert quantize_cli.main(argv) == 2
    assert "not a folder" in capsys.readouterr().err
