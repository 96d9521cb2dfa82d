"""Expert placement: policies' invariants, the per-batch replica choice, evaluation, online rebalancing,
errors, and `moedeploy place` end to end on small synthetic traces (and one real ESFT domain)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moedeploy.cli import main
from moedeploy.errors import PlacementError
from moedeploy.placement import read_placement as load_placement
from moedeploy.placement import policies
from moedeploy.placement.balance import balanced, by_share
from moedeploy.placement.evaluate import evaluate
from moedeploy.placement.load import LoadStats, batch_counts
from moedeploy.placement.online import OnlineConfig, run_online
from moedeploy.placement.plan import ModelShape, Placement, contiguous
from moedeploy.trace.io import write_trace
from moedeploy.trace.schema import Trace, TraceMeta

ESFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces" / "esft-deepseek-v2-lite"


def make_trace(experts: np.ndarray, num_experts: int, domains: np.ndarray | None = None,
               names: tuple[str, ...] = ("",)) -> Trace:
    N, L, K = experts.shape
    meta = TraceMeta(num_experts=num_experts, top_k=K, layer_names=tuple(f"layer {i}" for i in range(L)),
                     source="synthetic")
    z = np.zeros(N, dtype=np.int32)
    return Trace(meta=meta, experts=experts.astype(np.int16), weights=np.ones((N, L, K), np.float32) / K,
                 request=z, position=np.arange(N, dtype=np.int32), phase=z.astype(np.int8), step=z,
                 token=z - 1, domain=(z if domains is None else domains).astype(np.int16), domains=names)


def skewed_routing(rng, tokens: int, layers: int, experts: int, k: int, hot: np.ndarray) -> np.ndarray:
    """[N, L, K] distinct experts per token, drawn with probability proportional to `hot` [E]."""
    p = hot / hot.sum()
    out = np.empty((tokens, layers, k), dtype=np.int64)
    for l in range(layers):
        g = rng.gumbel(size=(tokens, experts)) + np.log(p)  # Gumbel top-k: k distinct draws without replacement
        out[:, l] = np.argsort(-g, 1)[:, :k]
    return out


def assert_invariants(p: Placement, slots: int) -> None:
    L, S = p.slots.shape
    E = p.model.num_experts
    assert S == slots and S % p.devices == 0
    for l in range(L):
        assert set(p.slots[l].tolist()) == set(range(E))  # every expert placed
        for d in range(p.devices):  # no two replicas of one expert on a device
            assert len(set(p.local(l, d).tolist())) == p.slots_per_device
        np.testing.assert_allclose(np.bincount(p.slots[l], weights=p.share[l], minlength=E), 1.0)


# -- policies -----------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), devices=st.sampled_from([1, 2, 4, 8]), per=st.integers(1, 4),
       extra=st.integers(0, 3), layers=st.integers(1, 3), skew=st.floats(0.3, 3.0))
def test_every_policy_keeps_the_invariants(seed, devices, per, extra, layers, skew):
    rng = np.random.default_rng(seed)
    E = devices * per
    S = E + devices * min(extra, per * (devices - 1))  # at most one replica of an expert per device
    model = ModelShape(layers, E, 2)
    experts = skewed_routing(rng, 300, layers, E, min(2, E), rng.pareto(skew, E) + 0.01) if E > 1 else \
        np.zeros((300, layers, 1), np.int64)
    stats = LoadStats.of(experts, E, 64)
    for p, s in ((contiguous(model, devices), E), (policies.round_robin(model, devices), E),
                 (policies.greedy(stats.total, model, devices), E),
                 (policies.anticorrelation(stats, model, devices), E),
                 (policies.replicate(stats.total, model, devices, S), S)):
        assert_invariants(p, s)
    cur = policies.replicate(stats.total, model, devices, S)
    moved = policies.migrate(cur, rng.permutation(stats.total.T).T.copy(), penalty=0.1)
    assert_invariants(moved, S)


def test_round_robin_and_replica_counts():
    model = ModelShape(1, 8, 2)
    assert policies.round_robin(model, 4).slots[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    load = np.array([[80.0, 40, 10, 10, 10, 10, 10, 10]])
    # 4 extra slots: 80 -> 2 replicas (40 each), then 40 vs 40 (ties to the lower id): 80 -> 3, 40 -> 2 ...
    reps = policies.replica_counts(load, 12, 4)
    assert reps.tolist() == [[4, 2, 1, 1, 1, 1, 1, 1]]
    assert policies.replica_counts(load, 12, 2).max() == 2  # never more replicas than devices
    p = policies.replicate(load, model, 4, 12)
    assert sorted(p.share[0][p.slots[0] == 0].tolist()) == [0.25] * 4


def test_greedy_beats_contiguous_on_a_skewed_load():
    rng = np.random.default_rng(0)
    E, N = 16, 4
    hot = np.ones(E)
    hot[:4] = 8.0  # the first device's experts are the hot ones: the contiguous worst case
    experts = skewed_routing(rng, 4000, 2, E, 2, hot)
    model = ModelShape(2, E, 2)
    plan, test = experts[:2000], experts[2000:]
    stats = LoadStats.of(plan, E)
    base = evaluate(contiguous(model, N), test, 256).balanced.max_mean_load
    greedy = evaluate(policies.greedy(stats.total, model, N), test, 256).balanced.max_mean_load
    rep = evaluate(policies.replicate(stats.total, model, N, 20), test, 256).balanced.max_mean_load
    assert base > 1.8 and greedy < 1.15 and rep <= greedy + 0.01, (base, greedy, rep)


def test_migrate_keeps_experts_that_stay_and_counts_bytes():
    rng = np.random.default_rng(1)
    model = ModelShape(3, 16, 2)
    load = rng.pareto(1.0, (3, 16)) + 1
    cur = policies.replicate(load, model, 4, 20)
    same = policies.migrate(cur, load, penalty=0.5)
    assert policies.bytes_moved(cur, same, 1000) == 0  # nothing changed, nothing moves
    shifted = load[:, ::-1].copy()
    free = policies.migrate(cur, shifted, penalty=0.0)
    sticky = policies.migrate(cur, shifted, penalty=10.0)
    assert policies.changed_slots(cur, sticky).sum() < policies.changed_slots(cur, free).sum()
    assert policies.bytes_moved(cur, free, 7) == 7 * int((cur.slots != free.slots).sum())


def test_deepseek_v3_sized_plan_is_fast():
    rng = np.random.default_rng(0)
    model = ModelShape(58, 256, 8)
    load = rng.pareto(1.5, (58, 256)) * 100
    policies.replicate(load, model, 32, 288)  # warm-up
    start = time.perf_counter()
    p = policies.replicate(load, model, 32, 288)
    assert time.perf_counter() - start < 1.0  # measured 0.02 s on this 2-core machine; loose for load spikes
    assert p.slots.shape == (58, 288)


# -- the per-batch replica choice ------------------------------------------------------------------------
def test_balanced_reaches_the_hand_worked_optimum():
    # 3 devices x 2 slots: d0 {A, x}, d1 {A, B}, d2 {B, y}; A = 0, B = 1, x = 2, y = 3
    slots = np.array([0, 2, 0, 1, 1, 3])
    counts = np.array([10, 10, 0, 10])  # y's 10 tokens pin d2 at 10
    dev = np.arange(6) // 2
    # The first pass alone: A splits 5 / 5 over the empty d0, d1; then B tops d1 up to 13.
    first = np.bincount(dev, weights=balanced(counts, slots, 3, rounds=0), minlength=3)
    assert first.max() == 13
    # Refined: all of A to d0, all of B to d1: 10 / 10 / 10, the optimum.
    out = balanced(counts, slots, 3)
    assert np.bincount(dev, weights=out, minlength=3).tolist() == [10, 10, 10]
    assert np.bincount(slots, weights=out, minlength=4).tolist() == counts.tolist()


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), devices=st.sampled_from([2, 3, 4, 8]), extra=st.integers(1, 3))
def test_balanced_never_worse_than_the_fixed_split(seed, devices, extra):
    rng = np.random.default_rng(seed)
    E = devices * 2
    model = ModelShape(1, E, 2)
    p = policies.replicate(rng.pareto(1.0, (1, E)) + 0.1, model, devices, E + devices * min(extra, 2))
    dev = p.device_of_slot()
    for _ in range(5):
        counts = rng.poisson(rng.pareto(1.0, E) * 5)
        b = balanced(counts, p.slots[0], devices)
        f = by_share(counts, p.slots[0], p.share[0])
        assert np.bincount(p.slots[0], weights=b, minlength=E).tolist() == counts.tolist()
        assert np.bincount(dev, weights=b).max() <= np.bincount(dev, weights=f).max()


# -- load statistics and evaluation ----------------------------------------------------------------------
def test_batch_counts_and_metrics_by_hand():
    # 4 tokens, 1 layer, top-1, E = 4 (id 4 = dropped); batches of 2
    experts = np.array([[[0]], [[0]], [[1]], [[4]]])
    c = batch_counts(experts, 4, 2)
    assert c.tolist() == [[[2, 0, 0, 0]], [[0, 1, 0, 0]]]
    model = ModelShape(1, 4, 1)
    ev = evaluate(contiguous(model, 2), experts, 2)  # device 0: experts 0, 1; device 1: 2, 3
    m = ev.balanced
    assert m.batches == 2 and m.max_mean_load == 2.0 and m.max_load == 2 and m.avg_max_load == 1.5
    assert m.balancedness == pytest.approx(0.5)
    # tokens 0, 1 of a batch live on devices 0, 1: token 1 -> expert 0 (device 0) crosses; batch 2: token 0
    # -> expert 1 (device 0) stays; 1 of 3 pairs crosses
    assert m.cross_device_fraction == pytest.approx(1 / 3)


# -- online rebalancing -------------------------------------------------------------------------------
def test_online_follows_a_domain_shift():
    rng = np.random.default_rng(3)
    E, N, L = 16, 4, 2
    before, after = np.ones(E), np.ones(E)
    before[[0, 5, 10, 15]] = 10.0  # hot experts spread over the contiguous devices
    after[[0, 1, 2, 3]] = 10.0  # after the shift, the hot ones share a device under the old plan
    past = skewed_routing(rng, 2048, L, E, 2, before)
    future = skewed_routing(rng, 4096, L, E, 2, after)
    model = ModelShape(L, E, 2)
    start = policies.replicate(LoadStats.of(past, E).total, model, N, 20)
    static = evaluate(start, future, 128).balanced.max_mean_load
    run = run_online(start, past, future, 128, OnlineConfig(every=256, window=512, penalty=0.05, move_tokens=64))
    from moedeploy.placement.evaluate import evaluate_slots

    online = evaluate_slots(future, E, 128, N, run.slots, run.share).balanced.max_mean_load
    assert run.replans > 0 and run.moved_slots > 0 and run.bytes_moved(100) == 100 * run.moved_slots
    assert online < static - 0.2, (static, online)
    assert (run.slots[0] == start.slots).all()  # the first batch runs on the plan from the past


# -- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("devices, slots, words", [(16, 8, "only 8 slots"), (3, 8, "do not split evenly"),
                                                   (4, 4, "cannot hold 8 experts")])
def test_impossible_shapes_are_placement_errors(devices, slots, words):
    model = ModelShape(1, 8, 2)
    with pytest.raises(PlacementError, match=words):
        policies.replicate(np.ones((1, 8)), model, devices, slots)


def test_bad_loads_and_files_are_placement_errors(tmp_path):
    model = ModelShape(2, 8, 2)
    with pytest.raises(PlacementError, match="do not match the model"):
        policies.greedy(np.ones((3, 8)), model, 4)
    with pytest.raises(PlacementError, match="does not exist"):
        load_placement(tmp_path / "missing.json")


# -- the command ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    rng = np.random.default_rng(7)
    d = tmp_path_factory.mktemp("place")
    hot = rng.pareto(1.0, 16) + 0.1
    a = skewed_routing(rng, 3000, 3, 16, 2, hot)
    b = skewed_routing(rng, 3000, 3, 16, 2, hot[::-1].copy())
    dom = np.repeat([0, 1], 3000)
    write_trace(make_trace(np.concatenate([a, b]), 16, dom, ("one", "two")), d / "t.parquet")
    write_trace(make_trace(skewed_routing(rng, 500, 4, 16, 2, hot), 16), d / "other.parquet")
    return d


def test_place_json_has_one_entry_per_algorithm_and_batch(traces, capsys, tmp_path):
    out = tmp_path / "p.json"
    rc = main(["place", "--trace", str(traces / "t.parquet"), "--devices", "4", "--slots", "20", "--batch", "64,256",
               "--expert-bytes", "1000", "--json", "--out", str(out), "--algorithm", "online",
               "--algorithm", "contiguous,greedy,replicate"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)  # exactly one JSON object
    got = {(r["algorithm"], r["batch"]) for r in report["results"]}
    assert got == {(a, b) for a in ("online", "contiguous", "greedy", "replicate") for b in (64, 256)}
    for r in report["results"]:
        assert r["max_mean_load"] >= 1 and r["max_mean_load_worst"] >= r["max_mean_load"] - 1e-9
        assert r["slots"] == (16 if r["algorithm"] in ("contiguous", "greedy") else 20)
        assert {"balancedness", "max_load", "avg_max_load", "cross_device_fraction", "by_share"} <= set(r)
    online = [r for r in report["results"] if r["algorithm"] == "online"]
    assert all(r["bytes_moved"] == 1000 * r["slots_moved"] for r in online) and online[0]["bytes_moved"] > 0
    saved = load_placement(out)  # --out: the first algorithm asked for (online: its final placement)
    assert saved.algorithm == "online" and saved.num_slots == 20 and saved.devices == 4
    assert report["out"]["algorithm"] == "online"


def test_place_text_and_domains(traces, capsys, tmp_path):
    t = str(traces / "t.parquet")
    out = tmp_path / "g.json"
    assert main(["place", "--trace", t, "--domain", "one", "--eval-trace", t, "--eval-domain", "two", "--devices",
                 "4", "--algorithm", "greedy", "--batch", "128", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "batch 128 tokens" in text and "greedy" in text
    p = load_placement(out)
    assert p.algorithm == "greedy" and p.model.num_experts == 16


@pytest.mark.parametrize("extra, words", [
    (["--devices", "5"], "do not split evenly over 5 devices"),
    (["--devices", "32", "--algorithm", "replicate"], "only 16 slots"),
    (["--devices", "4", "--slots", "8", "--algorithm", "replicate"], "cannot hold 16 experts"),
    (["--devices", "4", "--eval-trace", "OTHER"], "another model"),
    (["--devices", "4", "--domain", "three"], "not in"),
    (["--devices", "4", "--algorithm", "best"], "unknown --algorithm"),
    (["--devices", "4", "--plan-on", "1.5"], "--plan-on"),
])
def test_place_errors_are_one_line_exit_2(traces, capsys, extra, words):
    args = ["place", "--trace", str(traces / "t.parquet")] + [str(traces / "other.parquet") if a == "OTHER" else a
                                                              for a in extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moedeploy: error:") and words in err[0], err


@pytest.mark.skipif(not ESFT.is_dir(), reason="the real traces in ../shared/data are absent")
def test_real_intent_trace_greedy_and_replicas_beat_contiguous(capsys):
    # intent is a tuning domain: plan on its first half, evaluate on the second (docs/benchmarks.md)
    assert main(["place", "--trace", str(ESFT / "intent"), "--devices", "8", "--slots", "72", "--batch", "1024",
                 "--algorithm", "contiguous,greedy,replicate", "--json"]) == 0
    r = {x["algorithm"]: x for x in json.loads(capsys.readouterr().out)["results"]}
    assert r["contiguous"]["max_mean_load"] > 1.3
    assert r["greedy"]["max_mean_load"] < 1.1
    assert r["replicate"]["max_mean_load"] < r["replicate"]["by_share"]["max_mean_load"]
    assert r["replicate"]["max_mean_load"] <= 1.05


def test_repair_separates_replicas_packed_onto_one_device():
    # the packing's safety net (never reached in 3,000 random packings): expert 0 twice on device 0
    slots = policies._repair(np.array([[0, 0, 1, 2]]), np.array([[5.0, 3.0, 1.0]]), 2)
    assert sorted(slots[0, :2].tolist()) != [0, 0] and 0 in slots[0, 2:].tolist()
    assert sorted(slots[0].tolist()) == [0, 0, 1, 2]
    assert slots[0, :2].tolist() == [0, 2]  # the lightest expert of device 1 swapped in
