"""Mix-Quant levers beyond the BF16 tail (issue 12): any per-token, per-layer, per-projection precision map.

    python benchmarks/precision_map.py --every 3 --max-reference 16 --levers e2e,tail64,sink16+tail64,...

Each case (an assistant turn of the shipped agent conversations, as in benchmarks/accuracy.py) runs as
ONE causal forward over context + reference tokens, every linear computing each token's row in the
precision the lever's map gives it: reference tokens (the teacher-forced decode steps) always in BF16
(NVFP4 for "e2e"), prompt tokens in NVFP4 unless the lever puts them in BF16. This is what the engine
computes: a token's hidden state depends only on its own rows and on the K/V of the tokens before it,
and NVFP4 activation scales are per token (dynamic) or static, so which forward a token runs in does
not matter. Scores: decode-step KL(BF16 || lever) as in accuracy.py, and its ratio to NVFP4 e2e's.
The cost is the share of prompt linear FLOPs computed in BF16 (for token levers: the share of prompt
tokens). Harness only: the engine is not changed (the linears' forward is swapped inside `mixed_linears`).

Lever names, joined by '+': e2e (NVFP4 everywhere), tailK (last K prompt tokens), tailturn, sinkS (first
S prompt tokens), marks (every <|im_start|> / <|im_end|> token), firstN / lastN / layersA-B (those decoder
layers for every prompt token), proj:NAME (qkv_proj, o_proj, gate_up_proj or down_proj for every prompt
token), kv / kvfirstN / kvlayersA-B (the k and v columns of the qkv projections of all / those layers for
every prompt token), konly / vonly (the k or the v columns of every layer).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import accuracy
import torch
import torch.nn.functional as F

from mixquant_serve.data import read_jsonl
from mixquant_serve.layers.forward_context import ForwardContext, forward_context
from mixquant_serve.layers.linear import LinearBase, QKVLinear
from mixquant_serve.models.embedded import resolve_model_path
from mixquant_serve.tokenizer import Tokenizer

PROJS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


@dataclass(frozen=True)
class Lever:
    """Which prompt rows of which linears run in BF16 (reference rows always do, except for e2e)."""

    name: str
    e2e: bool = False
    tail: int | str = 0
    sinks: int = 0
    layers: frozenset[int] = frozenset()  # every prompt token, every projection
    projs: frozenset[str] = frozenset()  # every prompt token, every layer
    kv_layers: frozenset[int] | None = None  # k/v columns of qkv for every prompt token (None: no layer)
    kv_part: str = "kv"  # which columns kv_layers covers: "kv", "k" or "v"
    marks: frozenset[int] = frozenset()  # token ids computed in BF16 wherever they occur (chat-template marks)


def parse_lever(text: str, num_layers: int, mark_ids: frozenset[int] = frozenset()) -> Lever:
    fields: dict = {"name": text}
    for part in text.split("+"):
        if part == "e2e":
            fields["e2e"] = True
        elif part == "marks":
            fields["marks"] = mark_ids
        elif part.startswith("tail"):
            fields["tail"] = "turn" if part == "tailturn" else int(part[4:])
        elif part.startswith("sink"):
            fields["sinks"] = int(part[4:])
        elif part.startswith(("first", "last", "layers")):
            fields["layers"] = fields.get("layers", frozenset()) | _layer_set(part, num_layers)
        elif part.startswith("proj:"):
            fields["projs"] = fields.get("projs", frozenset()) | {part[5:]}
        elif part in ("konly", "vonly"):
            fields["kv_layers"], fields["kv_part"] = frozenset(range(num_layers)), part[0]
        elif part.startswith("kv"):
            rest = part[2:]
            fields["kv_layers"] = (frozenset(range(num_layers)) if not rest
                                   else _layer_set(rest, num_layers))
        elif part != "tail0":
            raise ValueError(f"unknown lever part {part!r}")
    return Lever(**fields)


def _layer_set(part: str, n: int) -> frozenset[int]:
    if part.startswith("first"):
        return frozenset(range(int(part[5:])))
    if part.startswith("last"):
        return frozenset(range(n - int(part[4:]), n))
    lo, hi = part[6:].split("-")
    return frozenset(range(int(lo), int(hi) + 1))


# -- the mixed forward ------------------------------------------------------------------------------
class CausalAttention:
    """A stand-in attention backend for one sequence: float32 causal attention."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def kv_write(self, layer: int, meta) -> None:
        return None

    def forward(self, layer: int, q, k, v, meta, kv_stored: bool = False) -> torch.Tensor:
        qs, ks, vs = (t.float().transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # [1, H, T, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=self.scale, enable_gqa=True)
        return o[0].transpose(0, 1).reshape(q.shape[0], -1).to(q.dtype)


@dataclass
class RowPlan:
    """BF16 rows per linear (bool [T]) and, for qkv linears, BF16 rows of the k/v columns only."""

    rows: dict[int, torch.Tensor]
    kv_rows: dict[int, torch.Tensor]
    kv_cols: tuple[int, int] = (0, 0)  # output columns of qkv that kv_rows computes in BF16


def _mixed_forward(plan: RowPlan):
    def forward(self: LinearBase, x: torch.Tensor) -> torch.Tensor:
        m = self.methods
        nv = lambda rows: m["nvfp4"].apply(self.impls["nvfp4"], rows, self.bias)  # noqa: E731
        bf = lambda rows: m["bf16"].apply(self.impls["bf16"], rows, self.bias)  # noqa: E731
        mask = plan.rows[id(self)]
        if mask.all():
            return bf(x)
        out = nv(x)
        if mask.any():
            out[mask] = bf(x[mask])
        kv = plan.kv_rows.get(id(self))
        if kv is not None and kv.any():
            lo, hi = plan.kv_cols
            out[kv, lo:hi] = bf(x[kv])[:, lo:hi]
        return out
    return forward


@contextlib.contextmanager
def mixed_linears(plan: RowPlan) -> Iterator[None]:
    original = LinearBase.forward
    LinearBase.forward = _mixed_forward(plan)
    try:
        yield
    finally:
        LinearBase.forward = original


def linears(model) -> list[tuple[int, str, LinearBase]]:
    return [(i, p, getattr(layer.self_attn if p in ("qkv_proj", "o_proj") else layer.mlp, p))
            for i, layer in enumerate(model.model.layers) for p in PROJS]


def row_plan(model, lever: Lever, case: accuracy.Case, total: int) -> tuple[RowPlan, float]:
    """The lever's BF16 rows for this case, and the BF16 share of its prompt linear FLOPs."""
    n = len(case.context)
    decode = torch.zeros(total, dtype=torch.bool)
    decode[n:] = True
    decode[n - 1] = True  # the first decode step's distribution comes from the last context token
    if lever.e2e:
        decode[:] = False
    token = decode.clone()
    if not lever.e2e:
        tail = case.turn if lever.tail == "turn" else lever.tail
        token[max(0, n - max(1, tail)) : n] = True  # the engine always computes >= 1 tail token
        token[: lever.sinks] = True
        if lever.marks:
            ctx = torch.tensor(case.context)
            token[:n] |= torch.isin(ctx, torch.tensor(sorted(lever.marks)))
    rows, kv_rows, bf16_flops, all_flops = {}, {}, 0.0, 0.0
    for i, proj, lin in linears(model):
        whole = i in lever.layers or proj in lever.projs
        mask = torch.ones(total, dtype=torch.bool) if whole and not lever.e2e else token
        mask[n:] |= decode[n:]
        rows[id(lin)] = mask
        flops = lin.input_size * lin.output_size
        bf16_flops += flops * int(mask[:n].sum())
        if isinstance(lin, QKVLinear) and lever.kv_layers is not None and i in lever.kv_layers:
            kv = torch.ones(total, dtype=torch.bool) & ~mask
            kv_rows[id(lin)] = kv
            q, k, v = lin.output_sizes
            cols = {"kv": (q, q + k + v), "k": (q, q + k), "v": (q + k, q + k + v)}[lever.kv_part]
            bf16_flops += lin.input_size * (cols[1] - cols[0]) * int(kv[:n].sum())
        all_flops += flops * n
    return RowPlan(rows, kv_rows, cols if kv_rows else (0, 0)), bf16_flops / all_flops


@torch.inference_mode()
def run_case(model, lever: Lever, case: accuracy.Case) -> tuple[torch.Tensor, float]:
    """Log-probabilities of the decode steps [R, vocab] float32 and the BF16 share of prompt linear FLOPs."""
    ids = torch.tensor(case.context + case.reference[:-1])
    plan, share = row_plan(model, lever, case, len(ids))
    attn = CausalAttention(model.config.head_dim**-0.5)
    with mixed_linears(plan), forward_context(ForwardContext("bf16", attn, None)):
        hidden = model(ids, torch.arange(len(ids)))
    rows = torch.arange(len(case.context) - 1, len(ids))
    logits = model.compute_logits(hidden[rows]).float()
    return torch.log_softmax(logits, -1), share


# -- the sweep --------------------------------------------------------------------------------------
def kl_rows(ref: torch.Tensor, other: torch.Tensor) -> list[float]:
    return (ref.exp() * (ref - other)).sum(-1).clamp_min(0).tolist()


def evaluate(model, levers: list[Lever], cases: list[accuracy.Case]) -> list[dict]:
    base = [run_case(model, Lever("bf16", tail=10**9), c)[0] for c in cases]
    out = []
    for lever in levers:
        start, kls, shares, tokens = time.monotonic(), [], [], 0
        for case, ref in zip(cases, base, strict=True):
            logp, share = run_case(model, lever, case)
            kls += kl_rows(ref, logp)
            shares.append(share * len(case.context))
            tokens += len(case.context)
        out.append({"name": lever.name, "kl": sum(kls) / len(kls), "bf16_share": sum(shares) / tokens,
                    "seconds": time.monotonic() - start})
        print(f"{lever.name:32s} KL {out[-1]['kl']:.4f}  BF16 share {out[-1]['bf16_share'] * 100:5.1f}%  "
              f"{out[-1]['seconds']:.0f}s", file=sys.stderr, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levers", default="e2e,tail64")
    p.add_argument("--nvfp4-weights", choices=["calibrated", "load"], default="calibrated")
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--max-reference", type=int, default=16)
    p.add_argument("--max-context", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model_path = resolve_model_path(None)
    quantized = (accuracy.calibrated_checkpoint(model_path, 64, 256) if args.nvfp4_weights == "calibrated"
                 else None)
    cases = accuracy.build_cases(Tokenizer.from_path(model_path), read_jsonl(accuracy.CONVERSATIONS),
                                 args.max_context, args.max_reference)[:: args.every]
    engine = accuracy.make_engine(model_path, "nvfp4", "bf16", quantized, "bfloat16", 4096, 4096)
    model = engine.runner.model
    n = model.config.num_layers
    tokenizer = Tokenizer.from_path(model_path)
    marks = frozenset(t for m in ("<|im_start|>", "<|im_end|>")
                      for t in tokenizer.encode(m, add_special_tokens=False))
    rows = evaluate(model, [parse_lever(t, n, marks) for t in args.levers.split(",")], cases)
    e2e = next((r["kl"] for r in rows if r["name"] == "e2e"), None)
    print("| lever | BF16 share | KL | KL / NVFP4 e2e | time s |\n|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['kl'] / e2e:.3f}" if e2e else "-"
        print(f"| {r['name']} | {r['bf16_share'] * 100:.1f}% | {r['kl']:.4f} | {ratio} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
