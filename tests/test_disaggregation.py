"""Prefill/decode disaggregation on CPU with real worker processes and the tcp transfer backend.

The test plays the router: it sends GenerateReq (naming the prefill worker) to the decode worker over
ZMQ and reads the outputs, so that what is checked here is exactly the two workers and their transfer.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import pytest
from cluster import WorkerProc

from mixquant_serve import Engine, SamplingParams
from mixquant_serve.config import KVLayout
from mixquant_serve.kvcache.storage import KVStorage
from mixquant_serve.tokenizer import Tokenizer

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def model_args(path: str, chunk: int = 256) -> list[str]:
    return ["--model-path", path, "--dtype", "float32", "--context-length", "2048", "--max-total-tokens", "8192",
            "--chunked-prefill-size", str(chunk)]


def start_pair(path: str, name: str, chunk: int = 256, timeout: float = 8.0, prefill_precision: str = "bf16"
               ) -> tuple[WorkerProc, WorkerProc]:
    p = WorkerProc("prefill_worker", *model_args(path, chunk), "--prefill-precision", prefill_precision,
                   "--decode-precision", prefill_precision, "--transfer-timeout", str(timeout), name=f"{name}-p")
    d = WorkerProc("decode_worker", *model_args(path), "--transfer-timeout", str(timeout), "--bf16-tail-tokens", "1",
                   name=f"{name}-d")  # the last prompt token only: the byte counts below assume it
    return p.wait_ready(), d.wait_ready()


def wait_clean(w: WorkerProc, timeout: float = 20.0):
    """Until the worker is idle with every KV page free or held by its prefix cache."""
    deadline = time.monotonic() + timeout
    while True:
        s = w.fresh_stats()
        idle = s.num_running == 0 and s.num_waiting == 0 and not any(s.gauges.values())
        if idle and s.free_pages + s.cached_pages == s.total_pages:
            return s
        assert time.monotonic() < deadline, f"{w.url} not clean: {s}"


@pytest.fixture(scope="module")
def pair(smollm_path):
    p, d = start_pair(smollm_path, "pd")
    yield p, d
    p.stop(), d.stop()


@pytest.fixture(scope="module")
def colocated(smollm_path):
    return Engine(smollm_path, dtype="float32", prefill_precision="bf16", decode_precision="bf16",
                  context_length=2048, max_total_tokens=8192, chunked_prefill_size=256)


@pytest.fixture(scope="module")
def tok(smollm_path):
    return Tokenizer.from_path(smollm_path)


def chat(tok, *turns: str) -> list[int]:
    messages = [{"role": "system", "content": "You are a careful assistant that uses tools."}]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return tok.encode_chat(messages)


def test_disaggregated_greedy_equals_colocated(pair, colocated, tok):
    p, d = pair
    prompts = [chat(tok, "What is the capital of France?"),
               chat(tok, "Summarise this log:\n" + "ERROR disk full on /var\n" * 30),
               chat(tok, "Write a haiku about the sea.")]
    for i, ids in enumerate(prompts):
        d.submit(f"eq{i}", ids, GREEDY, prefill_url=p.url)
    reference = colocated.generate(prompts, GREEDY)
    for i, ref in enumerate(reference):
        tokens, final = d.result(f"eq{i}")
        assert final.finish_reason == "length" and final.error is None
        assert tokens == ref.token_ids
    stats = wait_clean(d)
    assert stats.counters["kv_transfers_ok"] >= 3 and stats.counters["remote_prefill_tokens"] > 0
    wait_clean(p)


def test_nvfp4_prefill_disaggregated_equals_colocated_mixquant(smollm_path, tok):
    """Mix-Quant split over two processes (NVFP4 prompt KV from the prefill worker; the BF16 tail, the last K
    prompt tokens, and every decode step in BF16 on the decode worker) gives the colocated Mix-Quant engine's
    tokens and log-probabilities bit for bit, for every K tested (K=1: the last prompt token only, the split
    before the tail existed; K=64 is longer than two of the prompts, which then never leave the decode
    worker); and they differ from BF16 end to end. The prefill worker holds BF16 weights too, as `launch` gives
    it, so the prompt's K/V projections run in BF16 on both sides (--bf16-kv-proj, the default)."""
    p = WorkerProc("prefill_worker", *model_args(smollm_path), "--prefill-precision", "nvfp4",
                   "--decode-precision", "bf16", name="mq-p").wait_ready()
    assert p.info.bf16_kv_proj
    kw = dict(dtype="float32", decode_precision="bf16", context_length=2048, max_total_tokens=8192,
              chunked_prefill_size=256)
    mixquant = Engine(smollm_path, prefill_precision="nvfp4", **kw)
    bf16 = Engine(smollm_path, prefill_precision="bf16", **kw)
    log = "".join(f"WARN retry {i} on /dev/sd{i % 4}\n" for i in range(40))
    questions = ["What is the capital of France?", "Summarise this log:\n" + log, "Write a haiku about the sea."]

    def prompts(k: int) -> list[list[int]]:  # a system prompt of their own: no page is shared through a cache
        return [tok.encode_chat([{"role": "system", "content": f"Run {k}.{i}: you are a careful assistant."},
                                 {"role": "user", "content": q}]) for i, q in enumerate(questions)]

    assert min(map(len, prompts(1))) < 64 < max(map(len, prompts(1)))
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    plain = bf16.generate(prompts(1), params)
    del bf16
    gaps = []
    try:
        for k in (1, 16, 64):
            d = WorkerProc("decode_worker", *model_args(smollm_path), "--bf16-tail-tokens", str(k),
                           name=f"mq-d{k}").wait_ready()
            try:
                assert (p.info.prefill_precision, d.info.decode_precision, d.info.bf16_tail_tokens) == (
                    "nvfp4", "bf16", k)
                mixquant.config = dataclasses.replace(mixquant.config, bf16_tail_tokens=k)
                for i, ids in enumerate(prompts(k)):
                    d.submit(f"mq{k}-{i}", ids, params, prefill_url=p.url)
                    tokens, final = d.result(f"mq{k}-{i}")
                    assert final.error is None and final.finish_reason == "length" and final.cached_tokens == 0
                    ours = [lp.logprob for o in d.outputs[f"mq{k}-{i}"] for lp in (o.logprobs or [])]
                    ref = mixquant.generate([ids], params)[0]
                    assert tokens == ref.token_ids, (k, i)
                    assert ours == [lp.logprob for lp in ref.logprobs], (k, i)  # bit for bit
                    if k == 1 and plain[i].token_ids[:1] == tokens[:1]:
                        gaps.append(abs(ours[0] - plain[i].logprobs[0].logprob))
                stats = wait_clean(d)
                remote = [len(ids) - k for ids in prompts(k) if len(ids) > k]
                assert stats.counters["kv_transfers_ok"] == len(remote)
                assert stats.counters["remote_prefill_tokens"] == sum(remote)  # the prefill worker stops K short
                tail = sum(min(k, len(ids)) for ids in prompts(k)) if k > 1 else 0
                assert stats.counters["bf16_tail_tokens_computed"] == tail
            finally:
                d.stop()
        assert max(gaps) > 1e-3, f"NVFP4 prompt KV gave BF16's first-token logprobs ({gaps}): precision not seen"
        wait_clean(p)
    finally:
        p.stop()


def test_second_turn_transfers_only_the_new_tokens(pair, colocated, tok):
    p, d = pair
    first = chat(tok, "Here is a tool result: " + ", ".join(f"item {i}" for i in range(60)) + ". Count them.")
    d.submit("t1", first, GREEDY, prefill_url=p.url)
    answer, _ = d.result("t1")
    second = chat(tok, "Here is a tool result: " + ", ".join(f"item {i}" for i in range(60)) + ". Count them.",
                  tok.decode(answer), "Now list the even ones.")
    before = wait_clean(d).counters["kv_bytes_received"]
    d.submit("t2", second, GREEDY, prefill_url=p.url)
    tokens, final = d.result("t2")
    received = wait_clean(d).counters["kv_bytes_received"] - before

    layout = KVLayout(**d.info.kv_layout)
    ps, cached = layout.page_size, final.cached_tokens
    assert cached % ps == 0 and cached >= len(first) // ps * ps - ps  # the first turn's pages were reused
    needed_pages = -(-(len(second) - 1) // ps) - cached // ps  # pages holding positions [cached, n-1)
    assert received == needed_pages * KVStorage.bytes_per_page(layout)
    assert received < (len(second) - 1) // ps * KVStorage.bytes_per_page(layout) / 2  # a delta, not the prompt
    cold = Engine(d.info.model_path, dtype="float32", prefill_precision="bf16", decode_precision="bf16",
                  context_length=2048, max_total_tokens=8192).generate([second], GREEDY)[0]
    assert tokens == cold.token_ids


def _long_prompt(tok) -> list[int]:
    return chat(tok, "Read this file and find the bug:\n" + "".join(f"line {i}: x = x + {i}\n" for i in range(110)))


def _wait_for(cond, timeout: float, what: str, *workers: WorkerProc) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for w in workers:
            w.pump(0.05)


def test_killing_the_prefill_worker_fails_its_requests_and_frees_pages(smollm_path, tok):
    p, d = start_pair(smollm_path, "killp", chunk=16, timeout=6.0)
    try:
        d.submit("victim", _long_prompt(tok), GREEDY, prefill_url=p.url)
        _wait_for(lambda: p.stats and p.stats.gauges.get("queue_computing", 0) >= 1, 60, "prefill to start", p, d)
        os.kill(p.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        _, final = d.result("victim", timeout=30)
        assert final.finish_reason == "error" and "KV transfer" in final.error
        assert time.monotonic() - killed < 6.0 + 3.0
        wait_clean(d)
        d.submit("alive", chat(tok, "Hello!"), GREEDY)  # no prefill worker named: the decode worker prefills
        tokens, final = d.result("alive")
        assert final.error is None and len(tokens) == 24
    finally:
        p.stop(), d.stop()


def test_killing_the_decode_worker_frees_the_prefill_side(smollm_path, tok):
    p, d = start_pair(smollm_path, "killd", chunk=16, timeout=6.0)
    try:
        d.submit("victim", _long_prompt(tok), GREEDY, prefill_url=p.url)
        _wait_for(lambda: p.stats and p.stats.gauges.get("queue_computing", 0) >= 1, 60, "prefill to start", p, d)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.stop()
        _wait_for(lambda: p.stats and p.stats.counters.get("kv_transfers_failed", 0) >= 1, 60, "the failure", p)
        wait_clean(p)
        d2 = WorkerProc("decode_worker", *model_args(smollm_path), name="killd-d2").wait_ready()
        try:
            d2.submit("after", chat(tok, "What is 2 + 2?"), GREEDY, prefill_url=p.url)
            tokens, final = d2.result("after")
            assert final.error is None and len(tokens) == 24
        finally:
            d2.stop()
    finally:
        p.stop()


def test_a_prefill_worker_with_another_kv_layout_is_refused(smollm_path, tok):
    p = WorkerProc("prefill_worker", *model_args(smollm_path), "--page-size", "32", "--prefill-precision", "bf16",
                   "--decode-precision", "bf16", name="layout-p").wait_ready()
    d = WorkerProc("decode_worker", *model_args(smollm_path), "--bf16-tail-tokens", "1",  # the prompt is short
                   name="layout-d").wait_ready()
    try:
        d.submit("mismatch", chat(tok, "Hello there, how are you today?"), GREEDY, prefill_url=p.url)
        _, final = d.result("mismatch", timeout=30)
        assert final.finish_reason == "error" and "page_size: 32 here vs 16 there" in final.error
        wait_clean(d), wait_clean(p)
    finally:
        p.stop(), d.stop()
