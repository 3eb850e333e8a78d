"""A real decode worker driven over ZMQ with fuzzed GenerateReq/AbortReq: well-typed messages with any
values (invalid sampling parameters, token ids outside the vocabulary, prompts longer than the context,
reused request ids, aborts of anything, a prefill worker that does not exist). The worker stays up,
answers every request id it was sent with a final output, and ends idle with every KV page back."""

from __future__ import annotations

import time

from cluster import WorkerProc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mixquant_serve.protocol.messages import AbortReq, GenerateReq
from mixquant_serve.sampling_params import SamplingParams

ints = st.one_of(st.integers(-3, 300), st.sampled_from([0, 1, 49151, 49152, 2**31 - 1, 2**62, -(2**62)]))
floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, 1.0, -1.0, 1e-300]))
params = st.builds(
    SamplingParams, max_tokens=st.one_of(st.none(), ints), min_tokens=ints, temperature=floats, top_p=floats,
    top_k=ints, min_p=floats, frequency_penalty=floats, presence_penalty=floats, repetition_penalty=floats,
    seed=st.one_of(st.none(), ints), stop=st.lists(st.text(max_size=3), max_size=3).map(tuple),
    stop_token_ids=st.lists(ints, max_size=3).map(tuple), ignore_eos=st.booleans(),
    logprobs=st.one_of(st.none(), ints), skip_special_tokens=st.booleans(),
    json_schema=st.one_of(st.none(), st.sampled_from(['{"type": "object"}', "{", '{"type": 5}', "[]"])))
prompts = st.one_of(st.lists(st.integers(0, 49151), max_size=300), st.lists(ints, max_size=5))


def test_fuzzed_control_messages_never_break_a_decode_worker(smollm_path):
    w = WorkerProc("decode_worker", "--model-path", smollm_path, "--transfer-timeout", "3", "--context-length",
                   "256", "--max-total-tokens", "1024", "--chunked-prefill-size", "64", "--max-running-requests",
                   "4", name="fuzzed").wait_ready()
    sent: list[str] = []

    @settings(max_examples=150, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(rid=st.sampled_from("abcde"), fresh=st.booleans(), ids=prompts, p=params,
           local=st.one_of(st.none(), ints), prefill=st.sampled_from([None, None, "tcp://127.0.0.1:1"]),
           abort=st.integers(-1, 400))
    def send(rid, fresh, ids, p, local, prefill, abort):
        rid = f"{rid}{len(sent)}" if fresh else rid
        w.link.send(GenerateReq(rid=rid, input_ids=ids, params=p, local_prefill_max_tokens=local,
                                prefill_url=prefill))
        sent.append(rid)
        if abort >= 0:
            w.link.send(AbortReq(sent[abort % len(sent)]))
        w.pump(0.02)
        assert w.proc.poll() is None, "the worker died"

    try:
        send()
        deadline = time.monotonic() + 120
        while True:
            w.pump(0.3)
            s = w.fresh_stats()
            if s.num_running == s.num_waiting == 0 and s.free_pages + s.cached_pages == s.total_pages:
                break
            assert time.monotonic() < deadline, f"not idle or KV pages leaked: {s}"
        unanswered = [r for r in set(sent) if not (w.outputs.get(r) and w.outputs[r][-1].finished)]
        assert not unanswered and w.proc.poll() is None
    finally:
        w.stop()
