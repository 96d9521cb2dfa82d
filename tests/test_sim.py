"""The simulator replays traces through the runtime's own cache code; Belady is the offline optimum."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from moedeploy.cli import main
from moedeploy.errors import OptionError
from moedeploy.sim import replay
from moedeploy.trace.schema import Trace, TraceMeta

ESFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "esft-deepseek-v2-lite"


def trace_of(experts: np.ndarray, num_experts: int) -> Trace:
    N, L, K = experts.shape
    meta = TraceMeta(num_experts=num_experts, top_k=K, layer_names=tuple(f"l{i}" for i in range(L)))
    zeros = np.zeros(N, np.int32)
    return Trace(meta=meta, experts=experts.astype(np.int16), weights=np.ones((N, L, K), np.float32),
                 request=zeros, position=np.arange(N, dtype=np.int32), phase=zeros.astype(np.int8), step=zeros,
                 token=zeros - 1, domain=zeros.astype(np.int16))


def brute_force_optimum(seq: list[int], capacity: int) -> int:
    """Fewest misses over every eviction choice (exponential: tiny sequences only)."""
    best = None

    def go(i, cache, misses):
        nonlocal best
        if best is not None and misses >= best:
            return
        if i == len(seq):
            best = misses
            return
        e = seq[i]
        if e in cache:
            return go(i + 1, cache, misses)
        if len(cache) < capacity:
            return go(i + 1, cache | {e}, misses + 1)
        for victim in cache:
            go(i + 1, (cache - {victim}) | {e}, misses + 1)

    go(0, frozenset(), 0)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_optimal_and_no_policy_beats_it(seed):
    rng = np.random.default_rng(seed)
    seq = rng.integers(0, 5, size=14)
    experts = seq.reshape(-1, 1, 1)  # one layer, top-1
    results = {p: replay(trace_of(experts, 5), p, capacity=2).misses for p in ("lru", "lfu", "fifo", "lifo", "belady")}
    assert results["belady"] == brute_force_optimum(seq.tolist(), 2)
    assert all(results["belady"] <= m for m in results.values())


def test_hand_worked_lru_and_lifo():
    experts = np.array([0, 1, 0, 2, 0, 1]).reshape(-1, 1, 1)
    assert replay(trace_of(experts, 3), "lru", capacity=2).misses == 4  # 0 1 . 2(evict 1) . 1(evict 2)
    assert replay(trace_of(experts, 3), "lifo", capacity=2).misses == 4  # 0 1 . 2(evict 1) . 1(evict 2)
    assert replay(trace_of(experts, 3), "fifo", capacity=2).misses == 5  # 0 1 . 2(evict 0) 0(evict 1) 1(evict 2)


def test_capacity_out_of_range():
    with pytest.raises(OptionError, match="between 1 .* and 3"):
        replay(trace_of(np.zeros((4, 1, 1), int), 3), "lru", capacity=4)
    with pytest.raises(OptionError, match="between 2 \\(the top-k"):  # a token's experts must fit at once
        replay(trace_of(np.array([[[0, 1]]] * 3), 4), "lru", capacity=1)


def test_dropped_pairs_need_no_expert():
    """An id of num_experts marks a pair dropped by capacity gating (Switch, NLLB): no expert to load. Experts
    0, 1, 0, 1 at capacity 2: two cold misses, then two hits, for every policy and for Belady."""
    from moedeploy.sim import PrefetchConfig, replay_prefetch

    E = 3
    experts = np.array([[[0, E]], [[1, E]], [[0, E]], [[1, E]]])
    for policy in ("lru", "belady"):
        r = replay(trace_of(experts, E), policy, capacity=2)
        assert (r.hits, r.misses) == (2, 2), policy
    r = replay_prefetch(trace_of(np.repeat(experts, 2, axis=1), E), 2, None, PrefetchConfig(width=0, evict="lru"))
    assert (r.misses, r.belady_misses, r.stall_ratio) == (4, 4, 1.0)


def test_a_prefetch_still_copying_when_its_layer_runs_is_a_stall():
    """A perfect predictor one layer ahead, copies 80x longer than a layer's compute: every prefetch lands
    late, so the layers wait as often as with no prefetch. Stalls count those waits (they counted misses only:
    1 stall against Belady's 80), and the stall time says how long they were."""
    from moedeploy.predict.history import ScoreConfig
    from moedeploy.sim import PrefetchConfig, replay_prefetch, scores

    trace = trace_of(np.array([[[t % 4], [(t + 2) % 4]] for t in range(40)]), 4)
    S = scores.of(trace, "oracle", None, ScoreConfig(lookahead=1))
    r = replay_prefetch(trace, 1, None, PrefetchConfig(width=1, evict="lru"), S=S)
    assert r.belady_misses == 80 and r.misses == 1 and r.late_prefetch_hits == 79
    assert r.stalls == 80 and r.stall_ratio == 1.0
    assert 0.9 < r.stall_time_ratio < 1.0  # each late copy started one layer early: a little less waiting


@pytest.mark.skipif(not ESFT.is_dir(), reason="the real traces in ../shared/data are absent")
def test_real_law_trace_matches_the_measured_miss_rates():
    """The issue's own measurement on the held-out `law` domain: LRU 50% / 27%, Belady 32% / 12%."""
    from moedeploy.trace import load_trace

    law = load_trace(ESFT / "law")
    assert law.num_tokens == 8327
    rates = {(p, c): replay(law, p, c).miss_rate for p, c in itertools.product(("lru", "belady"), (16, 32))}
    assert round(rates[("lru", 16)], 2) == 0.51 and round(rates[("lru", 32)], 2) == 0.27
    assert round(rates[("belady", 16)], 2) == 0.32 and round(rates[("belady", 32)], 2) == 0.12


def test_simulate_cli_sweep(tmp_path, capsys):
    from moedeploy.trace import write_trace

    path = tmp_path / "t.parquet"
    write_trace(trace_of(np.random.default_rng(0).integers(0, 8, size=(200, 2, 2)), 8), path)
    assert main(["simulate", "--trace", str(path), "--sweep", "--capacity", "2,4", "--out", str(tmp_path / "o"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["policy"], r["capacity"]) for r in out["results"]} == {
        (p, c) for p in ("lru", "lfu", "fifo", "lifo", "belady") for c in (2, 4)}
    assert (tmp_path / "o" / "miss_rate.png").stat().st_size > 1000
    assert main(["simulate", "--trace", str(tmp_path / "missing.parquet")]) == 2


@pytest.mark.parametrize("args, message", [
    (["--link-gbps", "0"], "link_gbps (--link-gbps) must be above 0"),
    (["--memory-gbps", "0"], "memory_gbps (--memory-gbps) must be above 0"),
    (["--expert-bytes", "0", "--prefetch", "oracle"], "expert_bytes (--expert-bytes) must be above 0"),
    (["--prefetch", "oracle", "--lookahead", "0"], "lookahead must be 1 layer or more"),
    (["--prefetch", "oracle", "--lookahead", "-1"], "lookahead must be 1 layer or more"),
    (["--capacity", ","], "--capacity takes integers of at least 1"),
    (["--capacity", "1"], "capacity must be between 2 (the top-k"),
])
def test_simulate_refuses_what_cannot_be_simulated(tmp_path, capsys, args, message):
    """A division by zero, a negative time, a lookahead that reads the last token's routing (-1) or an empty
    table before: now one line and exit 2."""
    from moedeploy.trace import write_trace

    path = tmp_path / "t.parquet"
    write_trace(trace_of(np.random.default_rng(0).integers(0, 8, size=(30, 2, 2)), 8), path)
    assert main(["simulate", "--trace", str(path), "--capacity", "4", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
