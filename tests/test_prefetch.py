"""Prefetching in the simulator: the trace-history predictor and the prefetch-driving replay."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from moedeploy.cli import main
from moedeploy.errors import MoeDeployError
from moedeploy.predict import HistoryPredictor, PredictorError, ScoreConfig, fit, scores
from moedeploy.sim import replay
from moedeploy.sim.prefetch import PrefetchConfig, replay_prefetch
from moedeploy.sim.replay import CostModel
from test_sim import ESFT, trace_of

# layer 0 uses expert a, layer 1 expert a again: after one token of each, layer 0 predicts layer 1.
HAND = np.array([[0, 0], [1, 1], [0, 0], [1, 1], [0, 2]]).reshape(-1, 2, 1)
ONE = PrefetchConfig(width=1, threshold=0.5, evict="lru")


def small_real(n: int = 300):
    from moedeploy.trace import load_trace

    return load_trace(ESFT / "intent").select(np.arange(8222) < n)


def test_hand_worked_counters():
    """Capacity 1 per layer, lookahead 1, online predictor. Misses at positions 0-4 (nothing learnt yet),
    then token 2: layer 0 -> prefetch (1,0), a hit; token 3: prefetch (1,1), a hit; token 4: prefetch
    (1,0) again but layer 1 wants expert 2: a wasted prefetch and a miss. With the default link a copy takes
    80 layers' compute: both useful prefetches land late, and their layers wait (stalls 8 + 2); with a link
    faster than the compute they land in time (stalls 8)."""
    r = replay_prefetch(trace_of(HAND, 3), 1, None, ONE, CostModel(expert_bytes=1))
    assert (r.misses, r.hits, r.prefetched, r.prefetch_hits, r.bytes_moved) == (8, 2, 3, 2, 11)
    assert r.belady_misses == 10 and r.bytes_ratio == 1.1
    assert r.late_prefetch_hits == 2 and r.stalls == 10 and r.stall_ratio == 1.0
    fast = replay_prefetch(trace_of(HAND, 3), 1, None, ONE, CostModel(expert_bytes=1, link_gbps=1e6))
    assert fast.late_prefetch_hits == 0 and fast.stalls == 8 and fast.stall_ratio == 0.8


def test_without_prefetch_the_timeline_is_the_plain_cost_model():
    trace = trace_of(np.random.default_rng(0).integers(0, 6, size=(60, 3, 2)), 6)
    cost = CostModel(expert_bytes=10**6)
    r = replay_prefetch(trace, 3, None, replace(ONE, width=0), cost)
    plain = replay(trace, "lru", 3, cost)
    assert (r.misses, r.hits, r.bytes_moved) == (plain.misses, plain.hits, plain.bytes_moved)
    assert r.seconds_per_token == pytest.approx(plain.seconds_per_token)


def test_prefetch_copies_hidden_behind_slow_compute():
    """When reading an expert takes longer than copying one, a prefetch issued one layer ahead lands in
    time: the time is the demand misses' copies plus the reads, prefetches cost nothing."""
    cost = CostModel(expert_bytes=1, link_gbps=1e-9, memory_gbps=0.5e-9)  # copy 1 s, read 2 s
    r = replay_prefetch(trace_of(HAND, 3), 1, None, ONE, cost)
    assert r.late_prefetch_hits == 0
    assert r.seconds_per_token * r.tokens == pytest.approx(r.misses * 1 + (r.hits + r.misses) * 2)


@pytest.mark.skipif(not ESFT.is_dir(), reason="the real traces in ../shared/data are absent")
@pytest.mark.parametrize("evict", ["lru", "predicted"])
def test_prefetching_never_changes_what_is_demanded(evict):
    trace = small_real()
    accesses = {replay(trace, "lru", 8).hits + replay(trace, "lru", 8).misses}
    for width, d in ((6, 1), (3, 3)):
        cfg = PrefetchConfig(width=width, threshold=0.1, evict=evict, score=ScoreConfig(lookahead=d))
        r = replay_prefetch(trace, 8, None, cfg)
        accesses.add(r.hits + r.misses)
        assert r.prefetch_hits <= r.prefetched and r.bytes_moved == (r.misses + r.prefetched) * CostModel().expert_bytes
    assert len(accesses) == 1


def test_scores_are_causal():
    """Scores for token t never depend on tokens after it (nor on this token's layers at or after m-d+1)."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 8, size=(40, 4, 2))
    b = a.copy()
    b[30:] = rng.integers(0, 8, size=(10, 4, 2))
    b[29, 2:] = (b[29, 2:] + 1) % 8  # token 29, layers 2..3: known only after layer 1's prefetch (d=2)
    pred = fit([a], 8, max_lookahead=2)
    sa, sb = (scores(pred, x, 8, ScoreConfig(lookahead=2)) for x in (a, b))
    assert np.array_equal(sa[:29], sb[:29]) and np.array_equal(sa[29, :4], sb[29, :4])
    assert not np.array_equal(sa[30:], sb[30:])


def test_predictor_save_load_round_trip(tmp_path):
    experts = np.argsort(np.random.default_rng(2).random((50, 5, 8)), axis=2)[:, :, :2]  # distinct per token
    pred = fit([experts], 8, max_lookahead=3)
    assert pred.shape == (3, 5, 8) and pred.tokens == 50
    assert pred.counts[0, 1].sum() == 50 * 2 * 2  # every (i at 0, j at 1) pair of every token
    loaded = HistoryPredictor.load(pred.save(tmp_path / "p.bin"))
    assert np.array_equal(loaded.counts, pred.counts) and np.array_equal(loaded.sources, pred.sources)
    assert (loaded.top_k, loaded.tokens) == (2, 50)
    cfg = ScoreConfig(lookahead=2)
    assert np.array_equal(scores(loaded, experts, 8, cfg), scores(pred, experts, 8, cfg))


def test_bad_predictor_input(tmp_path):
    trace = trace_of(np.zeros((5, 3, 2), int), 8)
    with pytest.raises(PredictorError, match="does not exist"):
        HistoryPredictor.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_text("not numpy")
    with pytest.raises(PredictorError, match="not a moedeploy predictor"):
        HistoryPredictor.load(tmp_path / "junk.npz")
    whole = fit([np.zeros((5, 3, 2), int)], 8, max_lookahead=1).save(tmp_path / "whole.npz").read_bytes()
    for cut in (len(whole) // 2, len(whole) - 10):  # zipfile's own error for a cut archive, before
        (tmp_path / "cut.npz").write_bytes(whole[:cut])
        with pytest.raises(PredictorError, match="truncated or corrupt"):
            HistoryPredictor.load(tmp_path / "cut.npz")
    other = fit([np.zeros((5, 4, 2), int)], 16, max_lookahead=2)  # 4 layers x 16 experts
    with pytest.raises(PredictorError, match="fitted for 4 layers x 16 experts"):
        replay_prefetch(trace, 2, other)
    short = fit([np.zeros((5, 3, 2), int)], 8, max_lookahead=1)
    with pytest.raises(PredictorError, match="lookahead 2 is outside"):
        replay_prefetch(trace, 2, short, PrefetchConfig(score=ScoreConfig(lookahead=2)))
    assert issubclass(PredictorError, MoeDeployError)


def test_fit_and_simulate_cli(tmp_path, capsys):
    from moedeploy.trace import write_trace

    path = tmp_path / "t.parquet"
    write_trace(trace_of(np.random.default_rng(3).integers(0, 8, size=(120, 3, 2)), 8), path)
    pred = tmp_path / "pred.npz"
    assert main(["predict", "fit", "--trace", str(path), "--max-lookahead", "2", "--out", str(pred), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_lookahead"] == 2
    assert main(["simulate", "--trace", str(path), "--prefetch", "history", "--predictor", str(pred), "--sweep",
                 "--capacity", "2,4", "--lookahead", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {(r["policy"], r["capacity"]) for r in out["results"]} == {(p, c) for p in ("lru", "predicted") for c in (2, 4)}
    assert all(r["hits"] + r["misses"] == out["results"][0]["hits"] + out["results"][0]["misses"] for r in out["results"])
    assert main(["simulate", "--trace", str(path), "--prefetch", "history", "--predictor", str(tmp_path / "no.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
