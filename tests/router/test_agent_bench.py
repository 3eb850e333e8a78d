"""The pieces of benchmarks/agent_sessions.py: the simulated agents, the streamed turns through a real router
(scripted workers), the counters read from /workers, the summary table, the plot and RESULTS.md."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path

import httpx
import pytest
from conftest import REPO, scripted_router

from mixquant_serve.tokenizer import Tokenizer
from router.tools import builtin_tool_template


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("agent_sessions", REPO / "benchmarks" / "agent_sessions.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["agent_sessions"] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def roomy(tokenizer, tokenizer_dir, tmp_path_factory):
    """A router with two scripted workers whose context fits the agents' histories."""
    with scripted_router(tokenizer_dir, tokenizer, tmp_path_factory.mktemp("bench") / "router.log",
                         "--served-model-name", "m", prefix="b", context_length=4096) as pair:
        yield pair


@pytest.fixture(scope="module")
def count(tokenizer: Tokenizer):
    return lambda text: len(tokenizer.encode(text, add_special_tokens=False))


def test_sessions_grow_by_tool_outputs_and_repeat_exactly(bench, count, tokenizer: Tokenizer) -> None:
    work = bench.Workload(sessions=2, turns=4, tool_output_tokens=100)
    a, again, b = bench.Session(0, work, count), bench.Session(0, work, count), bench.Session(1, work, count)
    turns = [a.messages(t) for t in range(4)]
    assert turns == [again.messages(t) for t in range(4)]  # deterministic
    assert a.messages(3)[0] == b.messages(3)[0] and a.messages(0)[1] != b.messages(0)[1]  # shared system
    for t in range(1, 4):
        assert turns[t][: len(turns[t - 1])] == turns[t - 1]  # each turn extends the last
        call, result, ask = turns[t][-3:]
        assert call["tool_calls"][0]["id"] == result["tool_call_id"] and ask["role"] == "user"
        assert 100 <= count(result["content"]) < 140
    template = builtin_tool_template()
    lengths = [len(tokenizer.encode_chat(m, tools=bench.TOOLS, chat_template=template)) for m in turns]
    assert all(later - earlier > 100 for earlier, later in zip(lengths, lengths[1:], strict=False))


def test_turns_through_the_router_and_the_counters(bench, roomy, count) -> None:
    router, workers = roomy
    asyncio.run(bench.warm_up(router.base, "m", 2, count))
    warmed = [[g for g in w.generate_reqs() if g.session_id.startswith("warm-up-")] for w in workers]
    # concurrent new sessions spread over both workers (how evenly depends on when heartbeats land)
    assert sorted(len(reqs) for reqs in warmed) in ([2, 2], [1, 3])
    assert max(len(g.input_ids) for g in warmed[0]) > 600
    work = bench.Workload(sessions=2, turns=3, tool_output_tokens=60, max_tokens=5)
    before = bench.worker_counters(httpx.get(router.base + "/workers").json())
    results = asyncio.run(bench.run_sessions(router.base, "m", work, count, log=lambda m: None))
    assert sorted((r.session, r.turn) for r in results) == [(s, t) for s in range(2) for t in range(3)]
    for r in results:
        assert 0 < r.ttft <= r.e2e and r.completion_tokens == 5 and r.itl is not None and r.itl >= 0
    by_session = {s: sorted((r for r in results if r.session == s), key=lambda r: r.turn) for s in range(2)}
    for turns in by_session.values():
        assert turns[0].prompt_tokens < turns[1].prompt_tokens < turns[2].prompt_tokens
        assert turns[2].cached_tokens >= turns[1].prompt_tokens // 16 * 16  # one worker kept the session
    for s in range(2):  # every turn of a session went to one worker, under its prompt_cache_key
        homes = {w.worker_id for w in workers for g in w.generate_reqs() if g.session_id == f"agent-{s}"}
        assert len(homes) == 1
    after = bench.worker_counters(httpx.get(router.base + "/workers").json())
    assert set(after) == {"colocated"} and set(after["colocated"]) == set(bench.COUNTERS)
    assert bench.counter_delta(before, after)["colocated"]["cached_tokens"] >= 0


def test_counter_sums_and_deltas(bench) -> None:
    snapshot = [
        {"role": "prefill", "stats": {"counters": {"computed_prefill_tokens": 100, "kv_bytes_sent": 4096}}},
        {"role": "prefill", "stats": {"counters": {"computed_prefill_tokens": 50}}},
        {"role": "decode", "stats": {"counters": {"cached_tokens": 300, "computed_prefill_tokens": 7}}},
        {"role": "decode", "stats": None},
    ]
    sums = bench.worker_counters(snapshot)
    assert sums["prefill"]["computed_prefill_tokens"] == 150 and sums["prefill"]["kv_bytes_sent"] == 4096
    assert sums["decode"]["cached_tokens"] == 300
    later = json.loads(json.dumps(snapshot))
    later[0]["stats"]["counters"]["computed_prefill_tokens"] = 160
    delta = bench.counter_delta(sums, bench.worker_counters(later))
    assert delta["prefill"]["computed_prefill_tokens"] == 60 and delta["decode"]["cached_tokens"] == 0


def fake_result(bench, name: str, ttfts: list[list[float]]) -> object:
    turns = [bench.TurnResult(s, t, v, 0.01, v + 0.1, 100 * (t + 1), 90 * t, 8)
             for s, row in enumerate(ttfts) for t, v in enumerate(row)]
    counters = {"prefill": {"computed_prefill_tokens": 400.0, "kv_bytes_sent": 3 * 2**20},
                "decode": {"computed_prefill_tokens": 20.0, "cached_tokens": 500.0}}
    return bench.ConfigResult(name, "affinity", 0, turns, counters, seconds=4.0)


def test_summary_table_plot_and_results_file(bench, tmp_path: Path, monkeypatch) -> None:
    rr = fake_result(bench, "round_robin", [[1.0, 2.0, 4.0], [1.2, 2.2, 3.0]])
    cd = [fake_result(bench, f"affinity_cd N={n}", [[1.0, v, v], [1.0, v, v]])
          for n, v in ((64, 0.5), (256, 0.3))]
    row = rr.row()
    assert row["TTFT turn 1 p50/p99 (ms)"] == "1000 / 1200"
    assert row["TTFT turns 2+ p50/p99 (ms)"] == "2200 / 4000"
    assert row["prompt tokens computed on prefill / decode workers"] == "400 / 20"
    assert row["prompt tokens reused"] == "500" and row["KV MiB sent"] == "3.0"
    assert row["tok/s"] == "12.0" and rr.ttft_by_turn() == [1.1, 2.1, 3.5] and row["failed turns"] == "0"
    rr.turns.append(bench.TurnResult(2, 1, float("nan"), None, float("nan"), 0, 0, 0, failed=True))
    assert rr.row()["failed turns"] == "1" and rr.row()["TTFT turns 2+ p50/p99 (ms)"] == "2200 / 4000"
    assert bench.best_threshold([rr, *cd]).name == "affinity_cd N=256"
    text = bench.table([rr, *cd])
    assert text.count("\n") == 4 and text.splitlines()[2].startswith("| round_robin |")
    png = tmp_path / "plot.png"
    bench.plot([rr, *cd], png, "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n## Another section\n\nits text\n")
    monkeypatch.setattr(bench, "RESULTS", results)
    bench.append_results("first run")
    bench.append_results("second run")
    out = results.read_text()
    assert out.count(bench.SECTION) == 1 and "its text" in out
    assert out.index(bench.SECTION) < out.index("first run") < out.index("second run")


def test_configurations_and_percentiles(bench) -> None:
    args = bench.parse_args(["--sweep", "0,128", "--quick"])
    assert bench.configs(args) == [("round_robin", "round_robin", 0), ("affinity", "affinity", 0),
                                   ("affinity_cd N=0", "affinity", 0), ("affinity_cd N=128", "affinity", 128)]
    assert (args.sessions, args.turns) == (3, 3)
    assert bench.pct([3.0, 1.0, 2.0], 50) == 2.0 and bench.pct(list(range(1, 101)), 99) == 99
    assert bench.pct([5.0], 99) == 5.0
