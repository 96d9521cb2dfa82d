"""Every predictor in the simulator (sim/scores.py): a trained trace predictor and SiDA over a recorded trace's
token ids prefetch without changing what is demanded; what a trace cannot feed is refused, saying why."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_predict_sida import synthetic_routing
from test_sim import trace_of

from moedeploy.cli import main
from moedeploy.errors import MoeDeployError
from moedeploy.predict.history import ScoreConfig
from moedeploy.predict.routenet import RouteConfig
from moedeploy.predict.routenet import TrainConfig as RouteTrain
from moedeploy.predict.routenet import train as train_routenet
from moedeploy.sim import replay, scores
from moedeploy.sim.prefetch import PrefetchConfig, replay_prefetch


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    """A synthetic trace (4 layers, 64 experts, top-6) and a RouteNet trained on two others like it."""
    rng = np.random.default_rng(0)
    model = {"num_layers": 4, "num_experts": 64, "top_k": 6, "source": "synthetic"}
    train = [np.concatenate(synthetic_routing(rng, 4, 20)) for _ in range(2)]
    net, _ = train_routenet([(s, np.eye(1, len(s), dtype=bool)[0]) for s in train], model, RouteConfig(memory=50),
                            RouteTrain(steps=20), progress=False)
    path = net.save(tmp_path_factory.mktemp("routenet") / "p.safetensors")
    return trace_of(np.concatenate(synthetic_routing(rng, 3, 30)), 64), path


def test_a_trained_trace_predictor_prefetches_without_changing_demand(routed):
    trace, path = routed
    S = scores.of(trace, "history", str(path), ScoreConfig(lookahead=1))
    assert S.shape == (trace.num_tokens, 4, 64) and 0 <= S.min() and S.max() <= 1
    assert (S.sum(-1) <= 6 + 1e-3).all()  # K x softmax over experts, each capped at 1
    plain = replay(trace, "lru", 8)
    for evict in ("lru", "predicted"):
        r = replay_prefetch(trace, 8, None, PrefetchConfig(evict=evict, threshold=0.2), S=S)
        assert r.hits + r.misses == plain.hits + plain.misses
        assert 0 < r.prefetch_hits <= r.prefetched


def test_an_oracle_prefetch_never_stalls_and_a_learned_one_does_no_better(routed):
    """--prefetch oracle scores the experts each token really chose: every demand is a (prefetched) hit once
    the cache is warm, and no trained predictor stalls less at the same cache and eviction."""
    trace, path = routed
    oracle = scores.of(trace, "oracle", None, ScoreConfig())
    chosen = [[len({e for e in row.tolist() if e < 64}) for row in token] for token in trace.experts]
    np.testing.assert_array_equal(oracle.sum(-1), chosen)  # 1 for each expert chosen, 0 elsewhere
    cfg = PrefetchConfig(threshold=0.2)
    best = replay_prefetch(trace, 8, None, cfg, S=oracle)
    learned = replay_prefetch(trace, 8, None, cfg, S=scores.of(trace, "history", str(path), ScoreConfig(lookahead=1)))
    assert best.misses <= 6 and best.misses < learned.misses  # only the very first layer call misses
    assert best.prefetch_hits == best.prefetched  # and no oracle prefetch is wasted


def test_the_predictors_lookahead_must_match(routed):
    trace, path = routed
    with pytest.raises(MoeDeployError, match="predicts 1 layer"):
        scores.of(trace, "history", str(path), ScoreConfig(lookahead=2))


def test_a_predictor_for_another_shape_is_refused(routed):
    trace, path = routed
    with pytest.raises(MoeDeployError, match="num_experts differs"):
        scores.of(trace_of(trace.experts % 32, 32), "history", str(path), ScoreConfig())


def test_what_a_trace_cannot_feed_is_refused(routed):
    trace, _ = routed
    with pytest.raises(MoeDeployError, match="hidden states"):
        scores.of(trace, "lookahead", None, ScoreConfig())
    with pytest.raises(MoeDeployError, match="has none"):  # ESFT-like: token ids unknown (-1)
        scores.of(trace, "sida", None, ScoreConfig())


def test_sida_in_the_simulator_on_a_trace_of_the_demo_model(tmp_path, capsys):
    """A trace recorded from the demo model carries token ids: SiDA scores them per request, causally."""
    text = tmp_path / "t.txt"
    text.write_text("ROMEO. But soft, what light through yonder window breaks? It is the east, and Juliet is the sun.")
    trace = tmp_path / "demo.parquet"
    assert main(["eval-ppl", "--text", str(text), "--trace", str(trace), "--json"]) == 0
    capsys.readouterr()
    assert main(["simulate", "--trace", str(trace), "--prefetch", "sida", "--capacity", "8", "--sweep", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    plain = {r["hits"] + r["misses"] for r in out["results"]}
    assert len(plain) == 1 and all(r["prefetched"] > 0 for r in out["results"])


def test_simulate_with_a_trained_predictor_says_what_it_took_from_it(routed, tmp_path, capsys):
    """The CLI takes the predictor's lookahead and its own threshold default, says so, and refuses another lookahead."""
    from moedeploy.sim.prefetch import ROUTENET_THRESHOLD
    from moedeploy.trace.io import write_trace

    trace, path = routed
    file = write_trace(trace, tmp_path / "t.parquet")
    args = ["simulate", "--trace", str(file), "--prefetch", "history", "--predictor", str(path), "--capacity", "8"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any("lookahead 1" in n for n in out["notes"]) and any("threshold" in n for n in out["notes"])
    assert [(r["lookahead"], r["threshold"]) for r in out["results"]] == [(1, ROUTENET_THRESHOLD)]
    assert main([*args, "--prefetch-threshold", "0.3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["threshold"] == 0.3
    assert main([*args, "--lookahead", "2"]) != 0
    assert "predicts 1 layer" in capsys.readouterr().err


def test_history_refuses_a_predictor_of_another_kind(routed, tmp_path, capsys):
    import torch

    from moedeploy.predict import files
    from moedeploy.trace.io import write_trace

    trace, _ = routed
    sida = files.save(tmp_path / "s.safetensors", "sida", {"num_layers": 4, "num_experts": 64}, {}, {},
                      {"w": torch.zeros(2)})
    file = write_trace(trace, tmp_path / "t.parquet")
    assert main(["simulate", "--trace", str(file), "--prefetch", "history", "--predictor", str(sida)]) != 0
    err = capsys.readouterr().err
    assert "'sida' predictor" in err and "--prefetch sida" in err
