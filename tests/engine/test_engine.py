"""The engine end to end on the embedded SmolLM2-135M (float32 where exactness matters): prefix reuse,
preemption under a tiny KV pool, aborts, finish reasons, seeded sampling, logprobs, request validation
and recovery from a failing forward. Expected outputs always come from a second run of the real model
(alone, on a fresh or roomy engine), never from constants."""

from __future__ import annotations

import pytest
import torch
from logit_spy import LogitSpy

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.engine.engine import RequestError
from mixquant_serve.sampling_params import InvalidSamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
STORY = ("Once upon a time, in a village at the edge of a great forest, there lived an old clockmaker "
         "who repaired every clock in the valley. One winter morning a stranger knocked at his door and")
CHAT_EOS = [{"role": "user", "content": "What is 2+2? Answer with one number."}]


def make_engine(path: str, **kw) -> Engine:
    """BF16 weights in both phases: these tests are about scheduling, and NVFP4's dynamic activation
    scales (from each batch's amax) would make outputs depend on batch composition."""
    opts = dict(dtype="float32", context_length=256, max_total_tokens=2048, prefill_precision="bf16",
                decode_precision="bf16") | kw
    return Engine(path, **opts)


@pytest.fixture(scope="module")
def engine(smollm_path) -> Engine:
    """A roomy float32 engine shared by tests that leave it idle (every request finished or aborted)."""
    return make_engine(smollm_path)


def assert_no_leak(engine: Engine) -> None:
    assert not engine.has_work and not engine.requests
    cached = engine.cache.num_pages if engine.cache else 0
    assert engine.pool.num_free + cached == engine.pool.capacity
    if engine.cache:
        engine.cache.reset()
    assert engine.pool.num_free == engine.pool.capacity


def drain(engine: Engine) -> dict[str, list]:
    """Step until idle; every output increment per request id."""
    outs: dict[str, list] = {}
    while engine.has_work:
        for out in engine.step():
            outs.setdefault(out.rid, []).append(out)
    return outs


# ------------------------------------------------------------------------------------ prefix reuse
def test_shared_prefix_reuses_pages_and_matches_a_fresh_engine(smollm_path):
    eng = make_engine(smollm_path)
    first, second = eng.generate([STORY + " asked", STORY + " said"], GREEDY)
    assert first.cached_tokens == 0
    again = eng.generate(STORY + " said quietly", GREEDY)[0]
    prompt = again.prompt_token_ids
    shared = next(i for i, (a, b) in enumerate(zip(prompt, first.prompt_token_ids, strict=False)) if a != b)
    ps = eng.config.page_size
    assert shared >= 2 * ps
    assert again.cached_tokens > 0 and again.cached_tokens % ps == 0
    assert again.cached_tokens >= (min(shared, len(prompt) - 1) // ps) * ps  # the second run left more
    fresh = make_engine(smollm_path, enable_prefix_caching=False).generate(prompt, GREEDY)[0]
    assert again.token_ids == fresh.token_ids and fresh.cached_tokens == 0
    assert_no_leak(eng)


# ------------------------------------------------------------------------------ tiny pool, preemption
def test_tiny_pool_preempts_and_finishes_everything_like_a_roomy_engine(smollm_path, engine):
    prompts = [f"Question {i}: name a colour that starts with the letter {c}."
               for i, c in enumerate("BGRYPO")]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    want = engine.generate(prompts, params)
    tiny = make_engine(smollm_path, max_total_tokens=96, context_length=64)
    assert tiny.pool.capacity == 6
    got = tiny.generate(prompts, params)
    assert tiny.scheduler.num_preemptions > 0
    for g, w in zip(got, want, strict=True):
        assert g.finish_reason == "length" and g.token_ids == w.token_ids and g.text == w.text
    assert_no_leak(tiny)
    assert_no_leak(engine)


# -------------------------------------------------------------------------------------------- abort
def test_abort_of_waiting_and_running_requests_frees_their_pages(smollm_path):
    eng = make_engine(smollm_path, max_running_requests=1, enable_prefix_caching=False)
    ids = eng.tokenizer.encode(STORY)
    eng.add_request("run", ids, GREEDY)
    eng.add_request("wait", ids[:20], GREEDY)
    eng.step()
    eng.step()
    assert [r.rid for r in eng.scheduler.running] == ["run"] and eng.pool.num_free < eng.pool.capacity
    out = eng.abort("wait")
    assert out.finished and out.finish_reason == "abort" and out.rid == "wait"
    out = eng.abort("run")
    assert out.finish_reason == "abort" and out.completion_tokens == 2 and out.prompt_tokens == len(ids)
    assert eng.abort("run") is None and eng.abort("never") is None
    assert eng.counters["requests_aborted"] == 2 and eng.step() == []
    assert_no_leak(eng)


# ----------------------------------------------------------------------------------- finish reasons
def test_length_and_stop_strings(engine):
    full = engine.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0,
                                                                       ignore_eos=True))[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    cut = engine.generate("The capital of France is", SamplingParams(max_tokens=12, temperature=0,
                                                                      stop=(stop,)))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    assert stop not in cut.text and cut.token_ids == full.token_ids[: len(cut.token_ids)]
    assert len(cut.token_ids) < 12
    assert_no_leak(engine)


def test_stop_token_ids(engine):
    full = engine.generate("The capital of France is", SamplingParams(max_tokens=8, temperature=0))[0]
    j = next(i for i, t in enumerate(full.token_ids) if i >= 2 and t not in full.token_ids[:i])
    out = engine.generate("The capital of France is", SamplingParams(
        max_tokens=8, temperature=0, stop_token_ids=(full.token_ids[j],)))[0]
    assert out.finish_reason == "stop" and out.token_ids == full.token_ids[: j + 1]


def test_eos_min_tokens_and_ignore_eos(engine):
    ids = engine.tokenizer.encode_chat(CHAT_EOS)
    free = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0))[0]
    k = len(free.token_ids)
    assert free.finish_reason == "stop" and free.token_ids[-1] in engine.eos_ids and k < 24
    assert engine.tokenizer.decode(free.token_ids) == free.text  # the EOS adds no text

    deferred = engine.generate(ids, SamplingParams(max_tokens=24, temperature=0, min_tokens=k + 2))[0]
    assert len(deferred.token_ids) >= k + 2
    assert not set(deferred.token_ids[: k + 2]) & engine.eos_ids
    assert deferred.token_ids[: k - 1] == free.token_ids[: k - 1]  # only the EOS logit was masked

    ignored = engine.generate(ids, SamplingParams(max_tokens=k + 3, temperature=0, ignore_eos=True))[0]
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == k + 3
    assert ignored.token_ids[:k] == free.token_ids  # the EOS is generated, but does not stop
    assert_no_leak(engine)


# --------------------------------------------------------------------------------- seeded sampling
def test_seeded_sampling_is_reproducible_across_engines_and_batches(smollm_path, engine):
    seeded = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    other = SamplingParams(max_tokens=5, temperature=1.0, seed=7, ignore_eos=True)
    alone = engine.generate("My favourite animal is", seeded)[0]
    fresh = make_engine(smollm_path, max_running_requests=3)
    batch = fresh.generate(["Tell me a joke.", "My favourite animal is", "Zebras are"],
                           [SamplingParams(max_tokens=6, temperature=1.0, ignore_eos=True), seeded, other])
    assert batch[1].token_ids == alone.token_ids and batch[1].text == alone.text
    reseeded = engine.generate("My favourite animal is", SamplingParams(
        max_tokens=8, temperature=0.9, top_p=0.95, seed=4321, ignore_eos=True))[0]
    assert reseeded.token_ids != alone.token_ids  # the seed, not the prompt, decides the draws


# ----------------------------------------------------------------------------------------- logprobs
@pytest.mark.parametrize("k", [0, 3])
def test_logprobs_are_log_softmax_of_the_logits(engine, k):
    spy = LogitSpy(engine)
    try:
        out = engine.generate("The weather today is", SamplingParams(max_tokens=4, temperature=0.8, seed=3,
                                                                     logprobs=k, ignore_eos=True))[0]
    finally:
        engine.sampler = spy.inner
    rows = spy.rows[out.rid]
    assert len(out.logprobs) == len(out.token_ids) == len(rows) == 4
    for token, lp, row in zip(out.token_ids, out.logprobs, rows, strict=True):
        logp = torch.log_softmax(row.double(), dim=-1)
        assert lp.token_id == token
        assert lp.logprob == pytest.approx(logp[token].item(), abs=1e-4)
        assert len(lp.top) == k
        if k:
            want = logp.topk(k)
            assert [t for t, _ in lp.top] == want.indices.tolist()
            assert [v for _, v in lp.top] == pytest.approx(want.values.tolist(), abs=1e-4)
    plain = engine.generate("The weather today is", SamplingParams(max_tokens=2, temperature=0))[0]
    assert plain.logprobs == []


# ----------------------------------------------------------------------------------- bad requests
def engine_state(engine: Engine) -> tuple:
    s = engine.scheduler
    return (sorted(engine.requests), [r.rid for r in s.waiting], [r.rid for r in s.running],
            engine.pool.num_free, dict(engine.counters))


def test_bad_requests_are_refused_without_changing_state(engine):
    ctx, vocab = engine.config.context_length, engine.model_config.vocab_size
    engine.add_request("ok", [1, 2, 3], GREEDY)
    before = engine_state(engine)
    refused = [
        ("empty", [], GREEDY),
        ("at_ctx", [5] * ctx, GREEDY),
        ("over_ctx", [5] * (ctx + 1), GREEDY),
        ("too_long", [5] * (ctx - 4), SamplingParams(max_tokens=5)),
        ("vocab", [1, vocab], GREEDY),
        ("negative", [1, -1], GREEDY),
        ("ok", [1, 2, 3], GREEDY),  # duplicate rid
    ]
    for rid, ids, params in refused:
        with pytest.raises(RequestError):
            engine.add_request(rid, ids, params)
        assert engine_state(engine) == before, rid
    with pytest.raises(RequestError, match="bf16_tail_tokens must be at least 1"):
        engine.add_request("no_tail", [1, 2, 3], GREEDY, bf16_tail_tokens=0)
    assert engine_state(engine) == before
    for params in (SamplingParams(temperature=3.0), SamplingParams(top_p=0.0), SamplingParams(logprobs=21),
                   SamplingParams(max_tokens=2, min_tokens=3)):
        with pytest.raises(InvalidSamplingParams):
            engine.add_request("bad_params", [1, 2], params)
        assert engine_state(engine) == before
    engine.add_request("edge", [5] * (ctx - 5), SamplingParams(max_tokens=5))  # exactly fills the context
    assert engine.abort("ok") is not None and engine.abort("edge") is not None
    assert_no_leak(engine)


# ---------------------------------------------------------------------------------- forward failure
def test_a_failing_forward_fails_only_its_batch(engine, monkeypatch):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    want = engine.generate("The sky is", params)[0].token_ids
    inner, calls = engine.runner.forward, []

    def forward(batch, *args, **kw):
        if any(r.rid == "victim" for r in batch.reqs) and not calls:
            calls.append(batch)
            raise RuntimeError("device fault")
        return inner(batch, *args, **kw)

    monkeypatch.setattr(engine.runner, "forward", forward)
    engine.add_request("survivor", engine.tokenizer.encode("The sky is"), params)
    (head,) = engine.step()  # survivor's prefill
    engine.add_request("victim", engine.tokenizer.encode("Rivers flow into the"), params)
    outs = drain(engine)
    assert len(calls) == 1 and [r.rid for r in calls[0].reqs] == ["victim"]
    (err,) = outs["victim"]
    assert err.finished and err.finish_reason == "error" and "device fault" in err.error
    assert head.token_ids + [t for o in outs["survivor"] for t in o.token_ids] == want
    assert outs["survivor"][-1].finish_reason == "length"
    assert engine.counters["requests_failed"] == 1
    again = engine.generate("Rivers flow into the", params)[0]  # the engine keeps serving
    assert again.finish_reason == "length" and len(again.token_ids) == 5
    assert_no_leak(engine)


def test_a_refused_prompt_in_generate_leaves_nothing_behind(smollm_path):
    eng = make_engine(smollm_path)
    with pytest.raises(RequestError):
        eng.generate(["The sky is", [1, eng.model_config.vocab_size]], GREEDY)
    assert not eng.has_work and not eng.requests
    assert len(eng.generate("The sky is", GREEDY)[0].token_ids) == 6
