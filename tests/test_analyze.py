"""Trace statistics on small hand-made traces with known answers, and the trace / analyze commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moedeploy.cli import main
from moedeploy.trace import read_trace, stats
from moedeploy.trace.profile import CATEGORIES, attribute

OLMOE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "traces" / "olmoe-routing-counts"


def one_layer(seq, K=1) -> np.ndarray:
    """A single-layer trace [N, 1, K] from a list of per-token expert lists (or ints when K = 1)."""
    return np.array(seq, dtype=np.int16).reshape(len(seq), 1, K)


# -- load and skew -------------------------------------------------------------------------------------
def test_skew_known_values():
    s = stats.skew(np.array([[1, 1, 1, 1], [0, 0, 0, 4], [0, 0, 1, 3]]))
    np.testing.assert_allclose(s.gini, [0.0, 0.75, 0.625])  # G = sum (2i-E-1) x_(i) / (E sum x)
    np.testing.assert_allclose(s.entropy_bits, [2.0, 0.0, -(0.25 * np.log2(0.25) + 0.75 * np.log2(0.75))])
    np.testing.assert_allclose(s.normalized_entropy[:2], [1.0, 0.0])
    np.testing.assert_allclose(s.top_quarter_share, [0.25, 1.0, 0.75])
    np.testing.assert_allclose(s.max_over_mean, [1.0, 4.0, 3.0])


def test_expert_load_ignores_dropped_pairs():
    experts = np.array([[[0, 4], [1, 2]], [[1, 0], [4, 4]]])  # [N=2, L=2, K=2], E = 4, id 4 = dropped
    np.testing.assert_array_equal(stats.expert_load(experts, 4), [[2, 1, 0, 0], [0, 1, 1, 0]])


# -- batch coverage ------------------------------------------------------------------------------------
def test_distinct_experts_per_batch():
    c = stats.coverage(one_layer([0, 0, 1, 1, 2, 2, 3, 3]), 4, batch_sizes=[1, 2, 4, 8])
    np.testing.assert_allclose(c.contiguous[:, 0], [1, 1, 2, 4])  # pairs repeat an expert
    assert c.random[0, 0] == 1 and c.random[-1, 0] == 4  # order does not matter at b = 1 or b = N
    np.testing.assert_allclose(c.uniform, 4 * (1 - 0.75 ** np.array([1, 2, 4, 8])))


# -- temporal locality ---------------------------------------------------------------------------------
SEQ = [0, 1, 2, 0, 1, 3, 0, 3, 1, 2]  # worked by hand in the comments below


def test_belady_and_lru_by_hand():
    loc = stats.locality(one_layer(SEQ), 4, cache_sizes=[2, 3, 4], progress=False)
    # Belady, 2 slots: misses 0 1 2(evict 1: next use 4 > 3), hit 0, miss 1 (evict 2), miss 3 (evict 1),
    # hit 0, hit 3, miss 1, miss 2 -> 3 hits. 3 slots: 5 hits (only 3 at t5, 2 at t9 and the 3 cold misses
    # miss). 4 slots: only the 4 cold misses.
    np.testing.assert_allclose(loc.belady[:, 0], [0.3, 0.5, 0.6])
    # LRU, 2 slots: only t7 (3 after 0) hits; stack distances 2 2 2 1 2 3 -> 3 slots: 5 hits.
    np.testing.assert_allclose(loc.lru[:, 0], [0.1, 0.5, 0.6])
    # reuse distances in tokens: 3 3 3 2 4 7
    np.testing.assert_allclose(loc.reuse_percentiles[0, 0], 3.0)
    np.testing.assert_allclose(loc.mean_reuse[0], [3.0, 3.5, 7.0, 2.0])
    assert loc.reuse_histogram[:, 0].tolist()[:3] == [0, 4, 2]  # [1], [2, 3], [4, 7]
    assert loc.accesses == 10


def _belady_reference(seq, size):
    """Plain-Python Belady with a token's experts requested together."""
    cache, hits = set(), 0
    for t, need in enumerate(seq):
        need = set(need)
        hits += len(need & cache)
        cache |= need
        while len(cache) > size:
            def next_use(e):
                return next((u for u in range(t + 1, len(seq)) if e in seq[u]), len(seq))
            cache.remove(max(cache - need, key=next_use))
    return hits


def _lru_reference(seq, size):
    order, hits = [], 0  # most recent last
    for e in seq:
        if e in order:
            hits += 1
            order.remove(e)
        order.append(e)
        del order[:-size]
    return hits


@pytest.mark.parametrize("seed", range(4))
def test_belady_and_lru_match_plain_simulations(seed):
    rng = np.random.default_rng(seed)
    E, K, N = 7, 2, 60
    p = rng.dirichlet(np.ones(E) * 0.7)
    seq = [list(rng.choice(E, K, replace=False, p=p)) for _ in range(N)]
    loc = stats.locality(one_layer(seq, K), E, cache_sizes=[2, 3, 5, 7], progress=False)
    for c, size in enumerate([2, 3, 5, 7]):
        assert loc.belady[c, 0] * N * K == _belady_reference(seq, size)
    single = [int(x) for x in rng.choice(E, 80, p=p)]
    loc1 = stats.locality(one_layer(single), E, cache_sizes=[1, 2, 4], progress=False)
    for c, size in enumerate([1, 2, 4]):
        assert round(loc1.lru[c, 0] * 80) == _lru_reference(single, size)
        assert loc1.belady[c, 0] >= loc1.lru[c, 0]  # optimal is never worse


def test_cache_smaller_than_top_k_is_refused():
    with pytest.raises(ValueError, match="at least top-k"):
        stats.locality(one_layer([[0, 1]], 2), 4, cache_sizes=[1])


# -- co-activation and domain shift ----------------------------------------------------------------------
def test_coactivation_learns_a_deterministic_mapping():
    rng = np.random.default_rng(0)
    first = rng.integers(0, 4, 400)
    experts = np.stack([first, (first + 1) % 4], 1)[:, :, None]  # [N, L=2, K=1]: layer 1 = layer 0 + 1
    co = stats.coactivation(experts, 4, train=np.arange(400) % 2 == 0)
    assert co.predictor[0] == 1.0 and co.pairwise[0] == 1.0
    assert 0.15 < co.frequency[0] < 0.35  # a static guess of one expert out of 4 uniform ones
    assert (co.train_tokens, co.test_tokens) == (200, 200)


def test_pairwise_accuracy_and_cooccurrence():
    a = np.array([[0, 1], [0, 1]])
    b = np.array([[2, 3], [2, 0]])
    co = stats.cooccurrence(a, b, 4)  # every (e, e') pair of each token
    assert co.sum() == 8 and co[0, 2] == 2 and co[1, 3] == 1 and co[1, 0] == 1
    assert stats.pairwise_accuracy(co, 1) == (2 + 2) / 8  # rows 0 and 1 each keep their best partner (2)


def test_domain_shift_known_values():
    a, b = np.array([[10, 5, 1, 0]]), np.array([[0, 1, 5, 10]])
    s = stats.domain_shift(a, b, hot=1)
    assert s.jaccard[0] == 0 and s.transfer_coverage[0] == 0 and s.own_coverage[0] == 10 / 16
    np.testing.assert_allclose(s.total_variation, [0.5 * (10 + 4 + 4 + 10) / 16])
    assert s.only_a == ((0,),) and s.only_b == ((3,),)
    same = stats.domain_shift(a, a)
    assert same.jaccard[0] == 1 and same.total_variation[0] == 0


# -- time shares ---------------------------------------------------------------------------------------------
def test_profile_events_are_attributed_by_order():
    events = [("moe.route", 0, 1.0), ("moe.experts", 1, 2.0), ("moe.route", 3, 0.5), ("moe.dispatch", 4, 0.25),
              ("moe.route", 5, 1.0), ("moe.route", 6, 1.0)]
    t = attribute(events, ("a", "b"))
    assert t[0, CATEGORIES.index("route")] == 2.0 and t[0, CATEGORIES.index("experts")] == 2.0
    assert t[1, CATEGORIES.index("dispatch")] == 0.25 and t[:, CATEGORIES.index("transfer")].sum() == 0


# -- the commands ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recorded(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace")
    text = out / "input.txt"
    text.write_text("Mixture-of-Experts models route every token to a few experts. " * 12)
    assert main(["trace", "--model", str(tiny("qwen3_moe")), "--input", str(text), "--out", str(out / "t.parquet"),
                 "--context", "32", "--batch", "3", "--profile-steps", "2", "--json"]) == 0
    return out / "t.parquet"


def test_trace_command_writes_a_full_trace(recorded):
    trace = read_trace(recorded)
    assert trace.meta.num_layers == 2 and trace.meta.top_k == 3 and trace.domains == ("input",)
    assert set(trace.meta.extra) >= {"memory", "profile"} and trace.meta.extra["memory"]["expert_share"] > 0
    assert (np.diff(trace.step) >= 0).all() and (trace.token >= 0).all()
    assert trace.position.max() == 31


def test_analyze_writes_report_plots_and_json(recorded, tmp_path, capsys):
    import shutil

    capsys.readouterr()
    other = shutil.copy(recorded, tmp_path / "u.parquet")  # a second input: a second domain
    assert main(["analyze", str(recorded), str(other), "--out", str(tmp_path / "out"), "--train-domains", "u",
                 "--json"]) == 0
    stdout = capsys.readouterr().out.strip().splitlines()
    assert len(stdout) == 1
    data = json.loads(stdout[0])
    out = tmp_path / "out"
    assert data == json.loads((out / "analysis.json").read_text())
    report = (out / "report.md").read_text()
    for png in ("load_heatmap", "skew", "coverage", "cache_hit_rate", "reuse_distance", "coactivation",
                "domain_shift", "memory", "time_shares"):
        assert (out / f"{png}.png").stat().st_size > 1000 and f"({png}.png)" in report
    assert data["domains"] == ["input", "u"] and data["num_experts"] == 8  # recorded domain, then the file name
    assert set(data["locality"]["input"]["cache_sizes"]) == {3, 4, 5, 6, 8}
    assert data["locality"]["input"] == data["locality"]["u"]  # identical inputs, identical caches
    assert data["domain_shift"]["pairs"]["input->u"]["jaccard"] == [1.0, 1.0]
    assert data["coactivation"]["train_domains"] == ["u"] and data["coactivation"]["test_tokens"] > 0
    assert data["time"]["share_of_moe_time"]["transfer"] == 0


def test_analyze_bad_input_is_one_clear_line(tmp_path, capsys, recorded):
    assert main(["analyze", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty.parquet").write_bytes(b"")
    assert main(["analyze", str(tmp_path / "empty.parquet"), "--out", str(tmp_path / "o")]) == 2
    assert "is empty" in capsys.readouterr().err
    assert main(["analyze", str(recorded), "--out", str(tmp_path / "o"), "--cache-sizes", "2"]) == 2
    assert "at least top-k = 3" in capsys.readouterr().err
    assert main(["analyze", str(recorded), "--out", str(tmp_path / "o"), "--train-domains", "input"]) == 2
    assert "must name some, not all" in capsys.readouterr().err


@pytest.mark.skipif(not OLMOE.is_dir(), reason=f"OLMoE routing counts not found at {OLMOE} (../shared/data)")
def test_olmoe_aggregate_counts(tmp_path):
    from moedeploy.trace import load_trace, open_trace
    from moedeploy.errors import TraceError

    agg = open_trace(OLMOE / "olmoe")
    assert agg.load.shape == (6, 3, 64) and agg.layers == (0, 7, 15) and agg.top_k == 8
    assert agg.load[0, 0].sum() == 208_896 * 8  # every token counted K times
    assert set(agg.cooccurrence) == {"arxiv", "book", "c4", "github", "wikipedia"}  # tulu has none
    assert agg.cooccurrence["c4"][(0, 7)].sum() == 208_896 * 8  # rank-aligned: K pairs per token
    assert open_trace(OLMOE / "mixtral-8x7b" / "expert_counts" / "c4.json").num_experts == 8
    with pytest.raises(TraceError, match="aggregate expert counts"):
        load_trace(OLMOE / "olmoe")
    assert main(["analyze", str(OLMOE / "mixtral-8x7b"), "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "need per-token traces" in report and "Domain shift" in report and "rank-aligned" in report
    assert not (tmp_path / "cache_hit_rate.png").exists()
