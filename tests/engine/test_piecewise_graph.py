"""Piecewise graphs of prompt batches (engine/piecewise_graph.py): the model split into the stretches between
attentions, padded to a captured token count. On CPU the pieces run eagerly (capture=False) over the same
static buffers; every row's arithmetic is its own, so the float32 engine's tokens must equal those of the plain
forward and its logprobs must agree to rounding (a padded GEMM may block its rows differently). On CUDA the
captured graphs are compared with the eager engine (`gpu` test in tests/engine/test_gpu_fast_path.py)."""

from __future__ import annotations

import pytest
import torch

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.engine.piecewise_graph import PiecewiseGraphs, capture_sizes
from mixquant_serve.layers.attention.base import KVWrite, SeqSlice

LONG = "Summarise the following notes in one sentence. " + " ".join(f"Note {i}: moved." for i in range(12))
PROMPTS = ["The capital of France is", "def fibonacci(n):", LONG]


def test_capture_sizes_cover_every_count_up_to_the_largest():
    sizes = capture_sizes(4096)
    assert sizes[:6] == [16, 32, 64, 128, 256, 512] and sizes[-1] == 4096
    assert all(b - a <= 256 for a, b in zip(sizes[5:], sizes[6:], strict=False))
    assert capture_sizes(100) == [16, 32, 64, 100]


def _engine(smollm_path: str, piecewise: int, kv_in_pieces: bool = False, **kw) -> Engine:
    """kv_in_pieces: the pieces store K/V through static slots, as with the Triton backend on CUDA (padding rows
    into slot 0), instead of leaving it to the reference backend's forward."""
    kw = dict(dtype="float32", context_length=1024, max_total_tokens=4096, chunked_prefill_size=48, **kw)
    engine = Engine(smollm_path, **kw)
    if kv_in_pieces:
        attn = engine.runner.attn
        attn.static_kv_write = lambda layer, slots: KVWrite(*attn.storage.flat(layer), slots, keep_k=True)
    if piecewise:
        cfg = engine.config
        keys = [(cfg.prefill_precision, cfg.kv_proj_precision), (cfg.decode_precision, None)]
        engine.runner.piecewise = PiecewiseGraphs(engine.runner.model, engine.runner.attn, keys, piecewise,
                                                  engine.runner.device, capture=False)
    return engine


def _run(engine: Engine, calls: list) -> dict[str, tuple[list[int], list[float]]]:
    """Two turns: the prompts, then each prompt + its answer + more (prefix-cache hits, chunked prefill)."""
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=0)
    first = engine.generate(PROMPTS, params)
    again = [p + engine.tokenizer.decode(o.token_ids) + " And then?" for p, o in zip(PROMPTS, first, strict=True)]
    outs = first + engine.generate(again, params)
    return {f"{i}": (o.token_ids, [lp.logprob for lp in o.logprobs]) for i, o in enumerate(outs)}


@pytest.mark.parametrize(("precisions", "kv_in_pieces"), [(("bf16", "bf16"), False), (("fp8", "bf16"), True)])
def test_pieces_equal_the_plain_forward(smollm_path, monkeypatch, precisions, kv_in_pieces):
    prefill, decode = precisions
    plain = _engine(smollm_path, 0, prefill_precision=prefill, decode_precision=decode, bf16_tail_tokens=4)
    pieces = _engine(smollm_path, 64, kv_in_pieces, prefill_precision=prefill, decode_precision=decode,
                     bf16_tail_tokens=4)
    assert pieces.runner.piecewise.writes_kv == kv_in_pieces
    used = []
    run = pieces.runner.piecewise.run
    monkeypatch.setattr(pieces.runner.piecewise, "run", lambda key, ids, *a: used.append((key, len(ids))) or
                        run(key, ids, *a))
    got, want = _run(pieces, used), _run(plain, [])
    assert {k: v[0] for k, v in got.items()} == {k: v[0] for k, v in want.items()}
    for k in want:
        assert got[k][1] == pytest.approx(want[k][1], abs=1e-4), k
    keys = {key for key, _ in used}
    assert (prefill, None) in keys and (decode, None) in keys  # prompt chunks and BF16 tails / decode steps
    assert max(n for _, n in used) > 16 and {n for _, n in used} - {16, 32, 48, 64}  # prompt batches, padded
    assert pieces.pool.num_free + pieces.cache.num_pages == pieces.pool.capacity


def test_batches_over_the_largest_count_run_eagerly(smollm_path, monkeypatch):
    engine = _engine(smollm_path, 16, prefill_precision="bf16", decode_precision="bf16")
    used = []
    run = engine.runner.piecewise.run
    monkeypatch.setattr(engine.runner.piecewise, "run", lambda key, ids, *a: used.append(len(ids)) or
                        run(key, ids, *a))
    engine.generate([LONG], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    assert used and max(used) <= 16  # the 48-token chunk ran eagerly; the decode steps through the pieces


def test_layer_done_follows_each_layer(smollm_path):
    """The disaggregated prefill's per-layer hook (KV transfer) sees every layer once, in order."""
    engine = _engine(smollm_path, 32, prefill_precision="bf16", decode_precision="bf16")
    graphs = engine.runner.piecewise
    ids = torch.tensor(engine.tokenizer.encode(PROMPTS[0]))
    pages = engine.pool.alloc(-(-len(ids) // engine.config.page_size))
    meta = engine.runner.attn.plan([SeqSlice(pages, 0, len(ids))])
    seen = []
    hidden = graphs.run(("bf16", None), ids, torch.arange(len(ids)), meta, seen.append)
    assert seen == list(range(engine.model_config.num_layers))
    assert hidden.shape == (len(ids), engine.model_config.hidden_size) and torch.isfinite(hidden).all()
