"""The scheduler without a model: a fake forward writes, for every computed position, the token prefix
that produced it into the position's KV slot, and checks before each batch that every request's context
slots hold exactly its own prefix. The "model" picks the next token as a hash of the sequence, so each
request's output must equal what it produces alone, however it was batched, chunked or preempted."""

from __future__ import annotations

import random

import pytest

from mixquant_serve.engine.request import Request, Status
from mixquant_serve.engine.scheduler import Batch, Phase, Scheduler
from mixquant_serve.kvcache.page_pool import PagePool
from mixquant_serve.kvcache.radix_cache import RadixCache
from mixquant_serve.sampling_params import SamplingParams

PS = 4
VOCAB = 50


def next_token(ids: list[int]) -> int:
    return (sum((i + 1) * t for i, t in enumerate(ids)) * 2654435761 + len(ids)) % VOCAB


def expected_output(req: Request) -> list[int]:
    ids, out = list(req.prompt_ids), []
    while True:
        out.append(next_token(ids))
        ids.append(out[-1])
        stopped = out[-1] in req.stop_token_set and len(out) > req.params.min_tokens
        if stopped or len(out) >= req.max_new_tokens:
            return out


def make_req(rid: str, prompt: list[int], max_new: int = 4, *, sample_in_prefill: bool = True,
             stop: frozenset[int] = frozenset(), arrival: float | None = None, tail: int = 1) -> Request:
    kw = {} if arrival is None else {"arrival": arrival}
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_new), max_new_tokens=max_new,
                   stop_token_set=stop, sample_in_prefill=sample_in_prefill, bf16_tail=tail, **kw)


class Sim:
    """Drives a Scheduler the way the engine does and checks its invariants after every step."""

    def __init__(self, num_pages: int, *, max_running: int = 8, budget: int = 16, cache: bool = True,
                 mix: frozenset[Phase] = frozenset()) -> None:
        self.pool = PagePool(num_pages, PS)
        self.cache = RadixCache(self.pool) if cache else None
        self.sched = Scheduler(self.pool, self.cache, max_running, budget, mix)
        self.kv: dict[int, tuple[int, ...]] = {}  # slot -> the token prefix whose last token's KV it holds
        self.batches: list[Batch] = []
        self.finished: list[Request] = []

    def add(self, *reqs: Request) -> None:
        for req in reqs:
            self.sched.add(req)

    def step(self) -> Batch | None:
        batch = self.sched.next_batch()
        if batch is None:
            return None
        self.check_batch(batch)
        for req, n in zip(batch.reqs, batch.lengths, strict=True):
            for pos in range(req.num_computed, req.num_computed + n):
                self.kv[self.slot(req, pos)] = tuple(req.token_ids[: pos + 1])
        self.sched.commit(batch)
        for req, sample in zip(batch.reqs, batch.sample, strict=True):
            if sample:
                req.append(next_token(req.token_ids), None)
                if req.finish_reason is not None:
                    self.sched.finish(req)
                    self.finished.append(req)
        self.batches.append(batch)
        self.check_state()
        return batch

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if not self.sched.has_work:
                return
            assert self.step() is not None, "the scheduler has work but makes no batch (livelock)"
        raise AssertionError("requests did not finish")

    @staticmethod
    def slot(req: Request, pos: int) -> int:
        return req.pages[pos // PS] * PS + pos % PS

    def check_batch(self, batch: Batch) -> None:
        assert len(set(map(id, batch.reqs))) == len(batch.reqs), "a request twice in one batch"
        split = len(batch.reqs) - batch.num_decode
        decode_rows = list(zip(batch.reqs, batch.lengths, batch.sample, strict=True))[split:]
        prompt_rows = list(zip(batch.reqs, batch.lengths, batch.sample, strict=True))[:split]
        if batch.num_decode:  # decode rows riding along a prompt batch: decoding requests (all with a page), last
            assert batch.phase in self.sched.mix_phases and prompt_rows
            assert {r for r, _, _ in decode_rows} <= {r for r in self.sched.running if r.decoding}
            assert batch.num_tokens <= max(self.sched.token_budget, batch.num_decode + 1)
        for r, n, s in decode_rows:
            assert n == 1 and s and r.num_computed == r.num_tokens - 1
        if batch.phase is Phase.DECODE:
            assert batch.lengths == [1] * len(batch.reqs) and all(batch.sample)
            assert all(r.num_computed == r.num_tokens - 1 for r in batch.reqs)
        elif batch.phase is Phase.TAIL:  # past the prefill target, up to the newest token, which samples
            assert 0 < batch.num_prompt_tokens <= self.sched.token_budget
            for r, n, s in prompt_rows:
                assert not r.sample_in_prefill and not r.output_ids and r.bf16_tail > 1
                assert n > 0 and r.prefill_target <= r.num_computed and r.num_computed + n <= r.num_tokens
                assert r.num_computed + n > r.num_tokens - r.bf16_tail
                assert s == (r.num_computed + n == r.num_tokens)
        else:
            assert 0 < batch.num_prompt_tokens <= self.sched.token_budget
            for r, n, s in prompt_rows:
                assert n > 0 and r.num_computed + n <= r.prefill_target
                # logits are wanted only where the chunk ends at the newest token (never in Mix-Quant)
                assert s == (r.num_computed + n == r.num_tokens) and not (s and not r.sample_in_prefill)
        for req, n in zip(batch.reqs, batch.lengths, strict=True):
            assert req in self.sched.running and req.status is Status.RUNNING
            assert len(req.pages) * PS >= req.num_computed + n
            for pos in range(req.num_computed):  # the context the forward attends to
                assert self.kv[self.slot(req, pos)] == tuple(req.token_ids[: pos + 1]), (req.rid, pos)
            for pos in range(req.num_computed, req.num_computed + n):  # never written while shared
                assert self.pool.refcount[req.pages[pos // PS]] == 1

    def check_state(self) -> None:
        sched, pool = self.sched, self.pool
        assert len(sched.running) <= sched.max_running
        assert all(not r.pages and r.num_computed == 0 and r.status is Status.WAITING for r in sched.waiting)
        holders = [0] * pool.num_pages
        for req in sched.running:
            assert len(set(req.pages)) == len(req.pages) and 0 not in req.pages
            assert req.num_computed <= len(req.pages) * PS
            for p in req.pages:
                holders[p] += 1
        tree_refs = [rc - h for rc, h in zip(pool.refcount, holders, strict=True)]
        assert all(t in (0, 1) for t in tree_refs)  # the tree holds at most one reference per page
        assert sum(tree_refs) == (self.cache.num_pages if self.cache else 0)
        assert pool.num_free == sum(1 for p in range(1, pool.num_pages) if pool.refcount[p] == 0)

    def check_all_pages_back(self) -> None:
        cached = self.cache.num_pages if self.cache else 0
        assert self.pool.num_free + cached == self.pool.capacity
        if self.cache:
            self.cache.reset()
        assert self.pool.num_free == self.pool.capacity


def test_chunked_prefill_respects_the_budget_and_resumes():
    sim = Sim(num_pages=40, budget=16)
    req = make_req("a", list(range(1, 38)), max_new=3)
    sim.add(req)
    sim.run()
    prefill = [b for b in sim.batches if b.phase is Phase.PREFILL]
    assert [b.lengths for b in prefill] == [[16], [16], [5]]
    assert [b.sample for b in prefill] == [[False], [False], [True]]
    assert [b.phase for b in sim.batches[3:]] == [Phase.DECODE, Phase.DECODE]
    assert req.output_ids == expected_output(req) and req.finish_reason == "length"
    sim.check_all_pages_back()


def test_budget_is_shared_across_requests_in_arrival_order():
    sim = Sim(num_pages=40, budget=10)
    a, b = make_req("a", list(range(1, 8))), make_req("b", list(range(20, 28)))
    sim.add(a, b)
    first = sim.step()
    assert first.reqs == [a, b] and first.lengths == [7, 3] and first.sample == [True, False]
    sim.run()
    assert a.output_ids == expected_output(a) and b.output_ids == expected_output(b)


@pytest.mark.parametrize("extra", [0, 1, 3])
def test_prefix_reuse_is_page_aligned_and_leaves_a_token_to_compute(extra):
    sim = Sim(num_pages=40)
    shared = list(range(1, 17))  # four pages
    sim.add(make_req("a", shared + [40, 41], max_new=2))
    sim.run()
    b = make_req("b", shared + [42] * extra, max_new=2)
    sim.add(b)
    first = sim.step()
    # a whole-page prefix is reused, but at least the last prompt token is computed for its logits
    want = 16 if extra else 12
    assert b.cached_tokens == want and first.lengths == [len(b.prompt_ids) - want]
    sim.run()
    assert b.output_ids == expected_output(b)
    sim.check_all_pages_back()


def test_no_prefix_caching():
    sim = Sim(num_pages=40, cache=False)
    a, b = make_req("a", list(range(1, 17))), make_req("b", list(range(1, 17)))
    sim.add(a)
    sim.run()
    sim.add(b)
    sim.run()
    assert b.cached_tokens == 0 and b.output_ids == a.output_ids == expected_output(a)
    sim.check_all_pages_back()


def test_admission_waits_for_pages_and_resumes():
    sim = Sim(num_pages=7, budget=32)  # 6 pages
    a = make_req("a", list(range(1, 22)), max_new=4)  # computes 24 tokens: all six pages
    b = make_req("b", list(range(30, 35)), max_new=2)
    sim.add(a, b)
    while a.status is not Status.FINISHED:
        sim.step()
        assert len(a.pages) == 6 or a.finished
        assert b.status is Status.WAITING and b in sim.sched.waiting  # waits, is never dropped
    sim.run()
    assert sim.sched.num_preemptions == 0
    assert b.output_ids == expected_output(b)
    sim.check_all_pages_back()


def test_decode_under_pressure_preempts_the_newest_and_the_oldest_progresses():
    sim = Sim(num_pages=9, budget=64)  # 8 pages: three 8-token prompts fit, their growth does not
    reqs = [make_req(f"r{i}", [i + 1] * 8, max_new=9) for i in range(3)]
    sim.add(*reqs)
    preempted_order = []
    while sim.sched.has_work:
        before = sim.sched.num_preemptions
        running = list(sim.sched.running)
        batch = sim.step()
        if sim.sched.num_preemptions > before:
            gone = [r for r in running if r not in sim.sched.running and not r.finished]
            newest = max(running, key=lambda r: r.arrival)
            assert newest in gone
            preempted_order += [r.rid for r in gone]
        oldest = min((r for r in sim.sched.running + sim.finished), key=lambda r: r.arrival)
        if batch.phase is Phase.DECODE and not oldest.finished:
            assert oldest in batch.reqs  # the oldest request progresses in every decode step
    assert sim.sched.num_preemptions > 0 and "r0" not in preempted_order
    for r in reqs:
        assert r.output_ids == expected_output(r), r.rid
        assert r.cached_tokens == 0  # reported at first admission, not after a recompute
    sim.check_all_pages_back()


def test_equal_arrival_times_do_not_livelock():
    sim = Sim(num_pages=9, budget=64)
    reqs = [make_req(f"r{i}", [i + 1] * 8, max_new=9, arrival=0.0) for i in range(3)]
    sim.add(*reqs)
    sim.run()
    assert sim.sched.num_preemptions > 0
    assert all(r.output_ids == expected_output(r) for r in reqs)


def test_a_partly_reused_cached_leaf_does_not_starve_the_only_request():
    """The cache holds A's three pages; B reuses only the first. With 4 pages B can finish only if
    the two pages it does not use are evicted from under the head it does."""
    sim = Sim(num_pages=5)
    a = make_req("a", [1] * 4 + [2] * 4 + [3] * 4, max_new=1)
    sim.add(a)
    sim.run()
    b = make_req("b", [1] * 4 + [9], max_new=11)  # 16 tokens: all four pages
    sim.add(b)
    sim.run()
    assert b.cached_tokens == 4 and b.output_ids == expected_output(b)
    sim.check_all_pages_back()


def test_cached_tokens_come_from_the_admission_that_succeeded():
    sim = Sim(num_pages=6)  # 5 pages
    shared = [7] * 8
    sim.add(make_req("a", shared + [1], max_new=1))
    sim.run()  # the cache holds the two shared pages
    hog = make_req("hog", [5] * 11, max_new=5)  # three pages, four while decoding
    sim.add(hog)
    sim.step()
    b = make_req("b", shared + [2] * 8, max_new=1)  # reuses 2 pages but needs a third to start
    sim.add(b)
    sim.step()
    sim.step()
    assert b.status is Status.WAITING  # admission was tried and failed for lack of a page
    sim.run()  # meanwhile hog's growth evicted the shared prefix: b computed everything itself
    computed = [n for batch in sim.batches for r, n in zip(batch.reqs, batch.lengths, strict=True) if r is b]
    assert sum(computed) == 16
    assert b.cached_tokens == 0 and b.output_ids == expected_output(b)


def test_phases_alternate_when_both_kinds_of_work_exist():
    sim = Sim(num_pages=40, budget=8)
    short = make_req("short", [1, 2, 3], max_new=8)
    sim.add(short)
    sim.step()  # short is decoding now
    long = make_req("long", list(range(10, 50)), max_new=2)  # five chunks of prefill
    sim.add(long)
    phases = [sim.step().phase for _ in range(8)]
    assert phases == [Phase.DECODE, Phase.PREFILL] * 4
    sim.run()
    assert long.output_ids == expected_output(long) and short.output_ids == expected_output(short)


def test_mixed_chunks_carry_every_decoding_request_under_the_budget():
    sim = Sim(num_pages=60, budget=8, mix=frozenset({Phase.PREFILL, Phase.TAIL}))
    short, other = make_req("short", [1, 2, 3], max_new=12), make_req("other", [4, 5], max_new=12)
    sim.add(short, other)
    sim.step()  # both prefilled together: now decoding
    long = make_req("long", list(range(10, 40)), max_new=2)  # 30 tokens: five chunks of 6
    sim.add(long)
    batches = [sim.step() for _ in range(5)]
    assert [(b.phase, b.num_decode, b.num_tokens) for b in batches] == [(Phase.PREFILL, 2, 8)] * 5
    assert all(b.reqs[:1] == [long] and b.lengths[0] == 6 for b in batches)
    assert long.output_ids == [expected_output(long)[0]]  # its last chunk sampled its first token
    sim.run()
    assert all(r.output_ids == expected_output(r) for r in (short, other, long))


def test_mixing_only_joins_the_phases_it_names():
    sim = Sim(num_pages=60, budget=8, mix=frozenset({Phase.TAIL}))  # Mix-Quant: prefill is another precision
    a = make_req("a", [1, 2, 3], max_new=12, sample_in_prefill=False, tail=1)
    sim.add(a)
    sim.step(), sim.step()  # a: prefill, then its first decode step
    b = make_req("b", list(range(20, 40)), max_new=2, sample_in_prefill=False, tail=6)
    sim.add(b)
    steps = [sim.step() for _ in range(4)]
    # b's prefill (14 tokens: 8 + 6) alternates with a's decode steps; its tail carries a
    assert [(s.phase, s.num_decode, s.num_tokens) for s in steps] == [
        (Phase.PREFILL, 0, 8), (Phase.DECODE, 0, 1), (Phase.PREFILL, 0, 6), (Phase.DECODE, 0, 1)]
    tail = sim.step()
    assert (tail.phase, tail.num_decode, tail.reqs) == (Phase.TAIL, 1, [b, a])
    sim.run()
    assert a.output_ids == expected_output(a) and b.output_ids == expected_output(b)


def test_max_running_requests_is_honoured():
    sim = Sim(num_pages=60, max_running=2)
    reqs = [make_req(f"r{i}", [i + 1] * 5, max_new=3) for i in range(5)]
    sim.add(*reqs)
    peak = 0
    while sim.sched.has_work:
        sim.step()
        peak = max(peak, len(sim.sched.running))
    assert peak == 2 and all(r.output_ids == expected_output(r) for r in reqs)


def test_mixed_precision_prefills_all_but_the_last_prompt_token():
    sim = Sim(num_pages=40, budget=16)
    req = make_req("a", list(range(1, 22)), max_new=3, sample_in_prefill=False)
    sim.add(req)
    sim.run()
    phases = [(b.phase, b.lengths, b.sample) for b in sim.batches]
    assert phases[:2] == [(Phase.PREFILL, [16], [False]), (Phase.PREFILL, [4], [False])]
    assert [p for p, _, _ in phases[2:]] == [Phase.DECODE] * 3  # the last prompt token, then two more
    assert req.output_ids == expected_output(req)


def test_mixed_precision_fully_cached_prompt_goes_straight_to_decode():
    sim = Sim(num_pages=40)
    prompt = list(range(1, 18))  # 16 tokens to prefill: exactly four cached pages
    sim.add(make_req("a", prompt, max_new=1, sample_in_prefill=False))
    sim.run()
    b = make_req("b", prompt, max_new=2, sample_in_prefill=False)
    sim.add(b)
    first = sim.step()
    assert first.phase is Phase.DECODE and first.reqs == [b] and b.cached_tokens == 16
    sim.run()
    assert b.output_ids == expected_output(b)


def test_bf16_tail_runs_the_last_prompt_tokens_after_prefill_and_samples_there():
    sim = Sim(num_pages=40, budget=8)
    req = make_req("a", list(range(1, 22)), max_new=3, sample_in_prefill=False, tail=10)
    sim.add(req)
    sim.run()
    phases = [(b.phase, b.lengths, b.sample) for b in sim.batches]
    assert phases[:4] == [(Phase.PREFILL, [8], [False]), (Phase.PREFILL, [3], [False]),  # 21 - 10 tokens
                          (Phase.TAIL, [8], [False]), (Phase.TAIL, [2], [True])]  # the tail, in chunks
    assert [p for p, _, _ in phases[4:]] == [Phase.DECODE] * 2
    assert req.output_ids == expected_output(req) and sim.sched.num_tail_tokens == 10


def test_bf16_tail_longer_than_the_prompt_or_its_uncached_part():
    sim = Sim(num_pages=40, budget=64)
    prompt = list(range(1, 22))
    sim.add(make_req("short", prompt[:5], max_new=1, sample_in_prefill=False, tail=16))
    sim.run()
    assert [(b.phase, b.lengths) for b in sim.batches] == [(Phase.TAIL, [5])]  # the whole prompt
    sim.add(make_req("a", prompt, max_new=1, sample_in_prefill=False, tail=4))
    sim.run()
    sim.batches.clear()
    b = make_req("b", prompt + [7, 8, 9], max_new=2, sample_in_prefill=False, tail=16)  # 5 pages cached
    sim.add(b)
    sim.run()
    assert b.cached_tokens == 20 and [(x.phase, x.lengths) for x in sim.batches[:1]] == [(Phase.TAIL, [4])]
    assert b.output_ids == expected_output(b)


def test_bf16_tail_alternates_with_decode_and_goes_before_new_prefill():
    sim = Sim(num_pages=60, budget=32)
    a = make_req("a", list(range(1, 10)), max_new=6, sample_in_prefill=False, tail=1)
    sim.add(a)
    sim.step(), sim.step()  # a: prefill, then its first decode step
    b = make_req("b", list(range(20, 40)), max_new=2, sample_in_prefill=False, tail=6)
    c = make_req("c", list(range(40, 60)), max_new=2, sample_in_prefill=False, tail=6)
    sim.add(b)
    assert sim.step().phase is Phase.PREFILL  # b's first 14 tokens
    sim.add(c)
    assert sim.step().phase is Phase.DECODE  # a
    batch = sim.step()
    assert batch.phase is Phase.TAIL and batch.reqs == [b]  # b's tail before c's prefill
    sim.run()
    assert all(r.output_ids == expected_output(r) for r in (a, b, c))


def test_remove_frees_pages_of_waiting_and_running_requests():
    sim = Sim(num_pages=7, max_running=1)
    a, b = make_req("a", list(range(1, 11)), max_new=5), make_req("b", [3] * 6)
    sim.add(a, b)
    sim.step()
    sim.step()
    assert a.status is Status.RUNNING and a.pages and b.status is Status.WAITING
    assert sim.sched.remove("b") is b and b not in sim.sched.waiting
    assert sim.sched.remove("a") is a and not a.pages and not sim.sched.has_work
    assert sim.sched.remove("a") is None
    assert sim.pool.num_free == sim.pool.capacity  # an aborted request's pages are not cached
    sim.check_state()


def random_prompt(rng: random.Random, prefixes: list[list[int]]) -> list[int]:
    head = list(rng.choice(prefixes))[: rng.randrange(0, 20)]
    return head + [rng.randrange(1, VOCAB) for _ in range(rng.randrange(1 if not head else 0, 12))]


@pytest.mark.parametrize("mix", [False, True])
@pytest.mark.parametrize("arrivals", ["in_order", "shuffled"])
@pytest.mark.parametrize("seed", range(10))
def test_random_workloads_finish_with_a_tiny_pool(seed, arrivals, mix):
    """Random arrivals, lengths, shared prefixes, stop tokens and aborts, on a pool that holds one
    full-length request and a little more. "shuffled" hands out arrival times that disagree with the
    order requests are added in (a waiting request may then be older than running ones)."""
    rng = random.Random(seed)
    context = 32
    num_pages = context // PS + 1 + rng.randrange(0, 6)  # room for one full-length request, a little more
    sim = Sim(num_pages, max_running=rng.randint(1, 6), budget=rng.choice([4, 8, 16, 32]),
              cache=rng.random() < 0.8, mix=frozenset({Phase.PREFILL, Phase.TAIL}) if mix else frozenset())
    in_prefill = rng.random() < 0.7
    tails = random.Random(seed + 1000)  # its own stream: the workloads stay those of the seeds before tails
    stop = frozenset({0, 1})
    prefixes = [[rng.randrange(2, VOCAB) for _ in range(20)] for _ in range(3)]
    reqs, aborted = [], set()
    for step in range(20_000):
        if len(reqs) < 40 and rng.random() < 0.3:
            prompt = random_prompt(rng, prefixes)
            max_new = rng.randint(1, context - len(prompt))
            reqs.append(make_req(f"r{len(reqs)}", prompt, max_new, sample_in_prefill=in_prefill,
                                 stop=stop if rng.random() < 0.3 else frozenset(),
                                 arrival=rng.random() if arrivals == "shuffled" else None,
                                 tail=tails.choice([1, 1, 3, 8, 40])))
            sim.add(reqs[-1])
        if reqs and rng.random() < 0.02:
            victim = rng.choice(reqs)
            if sim.sched.remove(victim.rid) is not None:
                aborted.add(victim.rid)
                sim.check_state()
        if not sim.sched.has_work:
            if len(reqs) == 40:
                break
            continue
        assert sim.step() is not None, f"livelock at step {step}"
    else:
        raise AssertionError("requests did not finish")
    for req in reqs:
        if req.rid not in aborted:
            assert req.finished and req.output_ids == expected_output(req), req.rid
    sim.check_all_pages_back()
