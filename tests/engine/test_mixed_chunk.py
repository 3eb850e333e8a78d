"""Mixed chunks (--enable-mixed-chunk, on by default on CUDA): decoding requests take their next token inside
prompt batches that run in the decode precision. The arithmetic of every row is that of its own request, so
forced on over the float32 CPU engine the tokens must equal those of the engine that alternates phases."""

from __future__ import annotations

import pytest

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.engine.scheduler import Phase

LONG = "Summarise the following notes in one sentence. " + " ".join(f"Note {i}: moved." for i in range(12))


def _engines(smollm_path: str, **kw) -> tuple[Engine, Engine]:
    kw = dict(dtype="float32", decode_precision="bf16", context_length=1024, max_total_tokens=4096,
              chunked_prefill_size=32, **kw)
    return Engine(smollm_path, enable_mixed_chunk=True, **kw), Engine(smollm_path, enable_mixed_chunk=False, **kw)


def _batches(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> list:
    seen = []
    make = engine.scheduler.next_batch

    def spy():
        batch = make()
        if batch is not None:
            seen.append((batch.phase, batch.num_decode, batch.num_tokens))
        return batch

    monkeypatch.setattr(engine.scheduler, "next_batch", spy)
    return seen


def _staggered(engine: Engine) -> dict[str, list[int]]:
    """Two short prompts start decoding, then a long one arrives and is prefilled in chunks beside them."""
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    engine.add_request("a", engine.tokenizer.encode("The capital of France is"), params)
    engine.add_request("b", engine.tokenizer.encode("def fibonacci(n):"), params)
    steps = 0
    while engine.has_work:
        for o in engine.step():
            out[o.rid] += o.token_ids
        steps += 1
        if steps == 2:
            engine.add_request("c", engine.tokenizer.encode(LONG), params)
    return out


def _no_leak(engine: Engine) -> None:
    assert not engine.has_work
    assert engine.pool.num_free + engine.cache.num_pages == engine.pool.capacity


def test_decode_rows_ride_along_prefill_chunks(smollm_path, monkeypatch):
    mixed, ref = _engines(smollm_path, prefill_precision="bf16")
    assert mixed.scheduler.mix_phases == {Phase.PREFILL, Phase.TAIL} and not ref.scheduler.mix_phases
    seen = _batches(mixed, monkeypatch)
    assert _staggered(mixed) == _staggered(ref)
    carried = [b for b in seen if b[1]]
    # every chunk of c's prompt (>= 3 of at most 30 tokens) carried a and b; no decode-only step in between
    assert len(carried) >= 3 and all(b == (Phase.PREFILL, 2, 32) for b in carried[:-1])
    first, last = seen.index(carried[0]), seen.index(carried[-1])
    assert all(phase is Phase.PREFILL for phase, _, _ in seen[first : last + 1])
    _no_leak(mixed)


def test_mix_quant_keeps_decode_rows_out_of_quantized_prefill(smollm_path, monkeypatch):
    """Prefill in FP8: its chunks never carry decode rows (they would run quantized); BF16 tails do."""
    mixed, ref = _engines(smollm_path, prefill_precision="fp8", bf16_tail_tokens=16)
    assert mixed.scheduler.mix_phases == {Phase.TAIL}
    seen = _batches(mixed, monkeypatch)
    assert _staggered(mixed) == _staggered(ref)
    assert all(num_decode == 0 for phase, num_decode, _ in seen if phase is Phase.PREFILL)
    assert any(num_decode == 2 for phase, num_decode, _ in seen if phase is Phase.TAIL)
    assert mixed.scheduler.num_tail_tokens == ref.scheduler.num_tail_tokens  # decode rows are not tail tokens
    _no_leak(mixed)
