"""Overlapped decode (engine/overlap.py) gives exactly what the synchronous step gives, and leaks nothing.

The overlap is on by default only on CUDA; here it is forced on over the CPU engine, whose arithmetic is
the same either way, so any difference is a bookkeeping error (a token applied to the wrong request, a
finished request decoded on, a page kept)."""

from __future__ import annotations

import pytest

from mixquant_serve import Engine, SamplingParams

PROMPTS = ["The capital of France is", "List three colours:", "def fibonacci(n):", "Once upon a time",
           "The quick brown fox"]


@pytest.fixture(scope="module")
def engines(smollm_path):
    kw = dict(dtype="float32", prefill_precision="bf16", decode_precision="bf16", context_length=512,
              max_total_tokens=4096)
    return Engine(smollm_path, overlap_schedule=True, **kw), Engine(smollm_path, overlap_schedule=False, **kw)


def _no_leak(engine: Engine) -> None:
    assert not engine.has_work and engine._flight is None
    cached = engine.cache.num_pages if engine.cache else 0
    assert engine.pool.num_free + cached == engine.pool.capacity


def _same(a, b) -> None:
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.text for o in a] == [o.text for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]


def test_greedy_and_seeded_sampling_match_the_synchronous_step(engines):
    fast, ref = engines
    assert fast.config.overlap_schedule and not ref.config.overlap_schedule
    params = [SamplingParams(max_tokens=3 + 5 * i, temperature=0 if i % 2 else 0.8, top_p=0.9, seed=i, stop=["\n\n"])
              for i in range(len(PROMPTS))]
    _same(fast.generate(PROMPTS, params), ref.generate(PROMPTS, params))
    _no_leak(fast)


def test_rows_that_need_the_host_run_synchronously_beside_plain_ones(engines):
    fast, ref = engines
    params = [SamplingParams(max_tokens=12, temperature=0, logprobs=2), SamplingParams(max_tokens=12, temperature=0),
              SamplingParams(max_tokens=12, temperature=0, repetition_penalty=1.3, min_tokens=4)]
    got, want = fast.generate(PROMPTS[:3], params), ref.generate(PROMPTS[:3], params)
    _same(got, want)
    assert [lp.logprob for lp in got[0].logprobs] == pytest.approx([lp.logprob for lp in want[0].logprobs])
    _no_leak(fast)


def test_arrivals_and_aborts_while_a_step_is_in_flight(engines):
    fast, ref = engines
    long = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    fast.add_request("a", fast.tokenizer.encode(PROMPTS[0]), long)
    fast.add_request("b", fast.tokenizer.encode(PROMPTS[1]), long)
    tokens: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    steps = 0
    while fast.has_work:
        for out in fast.step():
            tokens[out.rid] += out.token_ids
        steps += 1
        if steps == 6:  # a decode step is in flight now: a new request arrives, another leaves
            assert fast._flight is not None
            fast.add_request("c", fast.tokenizer.encode(PROMPTS[2]), long)
            fast.abort("b")
    want = ref.generate([PROMPTS[0], PROMPTS[2]], long)
    assert tokens["a"] == want[0].token_ids and tokens["c"] == want[1].token_ids
    assert 0 < len(tokens["b"]) < 40
    _no_leak(fast)


def test_a_request_waiting_for_remote_kv_does_not_stop_the_pipeline(engines):
    """Decode-worker shape: one request decodes while another waits for a prefill worker's KV."""
    fast, ref = engines
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    fast.add_request("local", fast.tokenizer.encode(PROMPTS[3]), params)
    fast.add_request("remote", fast.tokenizer.encode(PROMPTS[4] * 4), params, remote_prefill="tcp://nowhere:1")
    tokens: dict[str, list[int]] = {"local": [], "remote": []}
    ran_ahead = 0
    while fast.has_work:
        for out in fast.step():
            tokens[out.rid] += out.token_ids
        ran_ahead += fast._flight is not None and len(tokens["local"]) > 1
        if len(tokens["local"]) == 8 and fast.requests["remote"].awaiting_kv:
            fast.kv_ready("remote", 0)  # its (unwritten) KV "arrived": it joins the decode batch
    assert ran_ahead > 3, "the pipeline kept running while the remote request waited"
    assert tokens["local"] == ref.generate([PROMPTS[3]], params)[0].token_ids
    assert len(tokens["remote"]) == 16
    _no_leak(fast)
