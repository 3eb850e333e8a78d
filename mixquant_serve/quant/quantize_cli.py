"""`mixquant-serve quantize`: calibrate a BF16 checkpoint to NVFP4 with NVIDIA Model Optimizer.

    mixquant-serve quantize --model-path DIR --output DIR [--calib-samples N] [--calib-seq-len L]

Runs Model Optimizer's NVFP4_DEFAULT_CFG (weights and activations NVFP4, lm_head excluded) over windows
of the calibration texts shipped in mixquant_serve/data/calibration.jsonl (chat records rendered with
the model's chat template), so every linear layer gets a static input scale, then writes Model
Optimizer's Hugging Face export (format (b): hf_quant_config.json, packed uint8 weights, e4m3 block
scales, fp32 weight_scale_2 / input_scale) plus the tokenizer files. Serve it with
`--quantized-model-path OUT --model-path DIR`. Calibration runs on CPU or CUDA; it needs the `quant`
extra (nvidia-modelopt).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mixquant_serve.config import ConfigError
from mixquant_serve.data import read_jsonl

if TYPE_CHECKING:  # torch, transformers and modelopt load only when quantizing (add_parser stays cheap)
    import torch

    from mixquant_serve.tokenizer import Tokenizer

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                    "tokenizer.model")
CALIBRATION_FILE = "calibration.jsonl"


def calibration_token_ids(tokenizer: Tokenizer, records: list[dict[str, Any]]) -> list[int]:
    """All records as one token stream: texts as they are, chats through the chat template."""
    ids: list[int] = []
    for rec in records:
        if "messages" in rec and tokenizer.has_chat_template:
            ids += tokenizer.encode_chat(rec["messages"], add_generation_prompt=False)
        elif "messages" in rec:
            ids += tokenizer.encode("\n".join(m["content"] for m in rec["messages"]))
        else:
            ids += tokenizer.encode(rec["text"])
    return ids


def calibration_windows(ids: list[int], samples: int, seq_len: int) -> list[list[int]]:
    """Up to `samples` non-overlapping windows of `seq_len` tokens (fewer if the stream is short)."""
    if seq_len < 1 or samples < 1:
        raise ConfigError("--calib-samples and --calib-seq-len must be positive")
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
    if not windows:  # a stream shorter than one window: use it whole
        windows = [ids]
    return windows


def _modelopt():
    try:
        import modelopt.torch.quantization as mtq
        from modelopt.torch.export import export_hf_checkpoint
    except ImportError:
        raise ConfigError("quantize needs NVIDIA Model Optimizer: pip install 'mixquant-serve[quant]'"
                          ) from None
    return mtq, export_hf_checkpoint


def _load_hf_model(model_path: str, device: torch.device) -> torch.nn.Module:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).to(device).eval()
    return model


def quantize_checkpoint(model_path: str, output: str, calib_samples: int = 64, calib_seq_len: int = 256,
                        device: str = "auto", records: list[dict[str, Any]] | None = None,
                        progress: bool = True) -> Path:
    """Calibrate `model_path` with NVFP4_DEFAULT_CFG and write the Model Optimizer export to `output`."""
    import torch
    from tqdm import tqdm

    from mixquant_serve.tokenizer import Tokenizer

    mtq, export_hf_checkpoint = _modelopt()
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = Tokenizer.from_path(model_path)
    source = CALIBRATION_FILE if records is None else "caller's records"
    records = records if records is not None else read_jsonl(CALIBRATION_FILE)
    windows = calibration_windows(calibration_token_ids(tokenizer, records), calib_samples, calib_seq_len)
    _say(f"calibrating {model_path} on {len(windows)} x {len(windows[0])} tokens ({dev})", progress)
    model = _load_hf_model(model_path, dev)

    def forward_loop(m: torch.nn.Module) -> None:
        for ids in tqdm(windows, desc="Calibrating", unit="sample", disable=not progress, leave=False):
            m(torch.tensor([ids], device=dev))

    start = time.monotonic()
    with torch.no_grad():
        mtq.quantize(model, mtq.NVFP4_DEFAULT_CFG, forward_loop)
    out = Path(output)
    export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=out)
    _copy_tokenizer(Path(model_path), out)
    meta = {"source": str(model_path), "config": "NVFP4_DEFAULT_CFG", "calib_samples": len(windows),
            "calib_seq_len": len(windows[0]), "calib_texts": source}
    (out / "mixquant_quantize.json").write_text(json.dumps(meta, indent=2))
    _say(f"wrote {out} in {time.monotonic() - start:.1f} s", progress)
    return out


def _copy_tokenizer(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


def _say(message: str, progress: bool) -> None:
    if progress:
        print(f"[mixquant] {message}", file=sys.stderr, flush=True)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `quantize` on the `mixquant-serve` command's subparsers."""
    p = subparsers.add_parser(
        "quantize", help="calibrate a BF16 checkpoint to NVFP4 (Model Optimizer export)",
        description="Calibrate a BF16 checkpoint with NVIDIA Model Optimizer (NVFP4_DEFAULT_CFG) on the "
                    "shipped calibration texts and write an NVFP4 checkpoint for --quantized-model-path.")
    p.add_argument("--model-path", default=None,
                   help="BF16 Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--output", required=True, help="folder to write the NVFP4 checkpoint to")
    p.add_argument("--calib-samples", type=int, default=64, help="calibration windows (default: 64)")
    p.add_argument("--calib-seq-len", type=int, default=256, help="tokens per window (default: 256)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from mixquant_serve.models.embedded import resolve_model_path

    try:
        model_path = resolve_model_path(args.model_path)
        quantize_checkpoint(model_path, args.output, args.calib_samples, args.calib_seq_len, args.device)
    except ConfigError as e:
        print(f"mixquant-serve quantize: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mixquant-serve")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["quantize", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
