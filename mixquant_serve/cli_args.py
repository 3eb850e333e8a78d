"""argparse flags generated from the frozen config dataclasses, so that defaults live in one place.

Field `max_running_requests` becomes `--max-running-requests`; booleans get `--x/--no-x`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Iterable
from typing import Any, TypeVar

from mixquant_serve.config import DTYPES, PRECISIONS, EngineConfig

T = TypeVar("T")

_CHOICES = {"prefill_precision": PRECISIONS, "decode_precision": PRECISIONS, "dtype": DTYPES}
_HELP = {
    "model_path": "Hugging Face model folder (Llama, Qwen2, Qwen3); default: the embedded SmolLM2-135M-Instruct",
    "quantized_model_path": "pre-quantized checkpoint for the prefill precision (Model Optimizer or "
                            "compressed-tensors NVFP4); default: quantize --model-path at load time",
    "max_total_tokens": "KV cache size in tokens (default: from --cpu-kv-cache-gb or --mem-fraction-static)",
    "chunked_prefill_size": "token budget of one prefill step (long prompts are chunked); "
                            "default 8192 on a GPU, 2048 on CPU",
    "max_running_requests": "requests running at once; default 256 on a GPU, 64 on CPU",
    "attention_backend": "attention kernels: triton (default on CUDA), torch_ref (default on CPU)",
    "disable_cuda_graph": "run the decode step eagerly instead of replaying CUDA graphs",
    "cuda_graph_max_bs": "largest decode batch captured in a CUDA graph (default: --max-running-requests)",
    "piecewise_cuda_graph_max_tokens": "prompt batches of up to this many tokens replay CUDA graphs of everything "
                                       "but attention, captured per token count at start-up (default: 4096 on "
                                       "CUDA; 0: off; off with --disable-cuda-graph)",
    "overlap_schedule": "launch each decode step before the host reads the previous step's tokens "
                        "(default: on for CUDA, off on CPU)",
    "enable_mixed_chunk": "decoding requests take their next token inside prompt batches that run in the decode "
                          "precision (BF16 tails; prefill chunks when --prefill-precision is the decode one) "
                          "instead of alternating with them (default: on for CUDA, off on CPU)",
    "context_length": "longest prompt + output (default: the model's max_position_embeddings)",
    "bf16_kv_proj": "Mix-Quant: while prefill runs in --prefill-precision, the k and v columns of every qkv "
                    "projection are computed in the decode precision (BF16), so the prompt's KV carries no "
                    "NVFP4/FP8 projection error (~4-6%% of prefill linear FLOPs in BF16; default: on for NVFP4 "
                    "prefill, off for FP8)",
    "fp8_fast_accum": "FP8 GEMMs on CUDA accumulate in the tensor cores without promoting partial sums to float32 "
                      "(cuBLAS use_fast_accum, as the FP8 GEMMs of vLLM and SGLang do): faster prefill, slightly "
                      "less precise (relative error 2-3e-3 against 1.7e-3 on Qwen3-8B shapes); "
                      "process-wide; no effect on CPU",
    "bf16_tail_tokens": "Mix-Quant: the last N prompt tokens of each request are computed in the decode precision "
                        "(BF16), on the decode worker when disaggregated, the rest in the prefill precision; "
                        "with session affinity only a turn's new tokens can be in the tail",
}


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, skip: Iterable[str] = ()) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or f.default is dataclasses.MISSING:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _base_type(hints[f.name])
        help_text = _HELP.get(f.name, "") + f" (default: {f.default})"
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        else:
            parser.add_argument(flag, type=kind, default=f.default, choices=_CHOICES.get(f.name), help=help_text)


def _base_type(hint: Any) -> type:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def dataclass_from_args(cls: type[T], args: argparse.Namespace, **overrides: Any) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return cls(**values)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    add_dataclass_args(parser, EngineConfig, skip=("extra",))


def engine_args_to_argv(config: EngineConfig) -> list[str]:
    """The flags that reproduce `config` on a child process's command line (non-defaults only)."""
    argv = []
    for f in dataclasses.fields(EngineConfig):
        value = getattr(config, f.name)
        if f.name == "extra" or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, str(value)]
    return argv
