"""Expert predictors: SiDA's (tokens -> every layer's experts), the trace-history one, their files and commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moedeploy.cli import main
from moedeploy.predict import files
from moedeploy.predict.base import Known, PredictorError
from moedeploy.predict.metrics import Tally, found
from moedeploy.predict.routenet import RouteConfig, RouteNet
from moedeploy.predict.routenet import TrainConfig as RouteTrain
from moedeploy.predict.routenet import train as train_routenet
from moedeploy.predict.sida import SidaConfig, SidaNet, SidaPredictor, sparsemax

ESFT = Path("/work/shared/data/traces/esft-deepseek-v2-lite")
TEXT = ("Mixture-of-Experts models route every token to a few experts. Only the hot experts need to live in "
        "device memory; the rest wait on the host or on disk. Dynamic gating sorts tokens by expert. ") * 12


# -- the network ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("attention", ["softmax", "sparsemax"])
def test_step_by_step_equals_full_sequence(attention):
    torch.manual_seed(0)
    net = SidaNet(SidaConfig(width=16, heads=2, window=5, attention=attention), hidden_size=12, num_layers=3,
                  num_experts=7).eval()
    x = torch.randn(2, 11, 12)  # [B, S, D], longer than the window
    with torch.no_grad():
        full, _ = net(x)
        state, steps = None, []
        for t in range(11):  # the first token starts the state, then the decode hot path, one token at a time
            out, state = net(x[:, :1]) if state is None else net.step(x[:, t], state)
            steps.append(out.view(2, 1, 3, 7))
        head, mid = net(x[:, :4])  # a prompt, then the rest continuing from its state
        tail, _ = net(x[:, 4:], mid)
    assert full.shape == (2, 11, 3, 7)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([head, tail], 1), full, atol=1e-5, rtol=1e-5)
    y = x.clone()
    y[:, 6:] = torch.randn(2, 5, 12)  # later tokens change: earlier scores do not
    with torch.no_grad():
        changed, _ = net(y)
    torch.testing.assert_close(changed[:, :6], full[:, :6])
    assert not torch.allclose(changed[:, 6:], full[:, 6:])


@pytest.mark.parametrize("attention", ["softmax", "sparsemax"])
def test_decode_steps_of_many_sequences_batch_like_one_at_a_time(attention):
    """`SidaPredictor.steps` (the engine's requests): one batched step, the kept keys of shorter sequences
    padded and masked; each result equals that sequence stepped alone, and the whole sequence at once."""
    torch.manual_seed(0)
    net = SidaNet(SidaConfig(width=16, heads=2, window=6, attention=attention), hidden_size=12, num_layers=3,
                  num_experts=7).eval()
    predictor = SidaPredictor(net, torch.randn(50, 12), {}, torch.zeros(3, 7))
    prompts = [torch.randint(50, (1, n)) for n in (3, 9, 3, 12, 4)]  # kept keys 3, 5, 3, 5, 4 (window 6)
    states = [predictor.forward(p)[1] for p in prompts]
    tokens = torch.randint(50, (5,))
    batched, after = predictor.steps(tokens, states)
    for i, (prompt, state) in enumerate(zip(prompts, states, strict=True)):
        alone, _ = predictor.forward(tokens[i].view(1, 1), state)
        whole, _ = predictor.forward(torch.cat([prompt, tokens[i].view(1, 1)], 1))
        torch.testing.assert_close(batched[i], alone[0, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batched[i], whole[0, -1], atol=1e-5, rtol=1e-5)
        assert after[i].keys.shape[2] == min(prompt.shape[1] + 1, 5)  # at most window - 1 kept


def test_sparsemax_is_a_sparse_distribution_over_allowed_entries():
    z = torch.tensor([[3.0, 1.0, 0.5, 9.0], [0.1, 0.2, 0.3, 0.4]])
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    p = sparsemax(z, mask)
    torch.testing.assert_close(p.sum(-1), torch.ones(2))
    assert p[0, 3] == 0 and p[0, 0] == 1  # the masked 9 ignored; 3 beats 1 by more than 1: all mass on it
    assert (p[1] > 0).all()  # close scores share


def test_metrics_recall_and_hit_rate():
    scores = torch.tensor([[[0.9, 0.8, 0.1, 0.0]], [[0.0, 0.1, 0.8, 0.9]]])  # [T=2, L=1, E=4]
    truth = torch.tensor([[[0, 2]], [[1, 0]]])  # [T, L, K=2], top-1 first
    assert found(scores, truth, 2).tolist() == [[1], [0]]
    t = Tally((1, 2, 4), num_layers=1, top_k=2)
    t.add(scores, truth, truth[..., 0])
    assert t.recall(2).tolist() == [0.25] and t.recall(4).tolist() == [1.0]
    assert t.hit_rate(1).tolist() == [0.5] and t.hit_rate(2).tolist() == [0.5]
    s = t.summary()
    assert s["mean_recall"]["2"] == 0.25 and s["layers"][0]["hit_rate"]["4"] == 1.0


# -- commands on a tiny model ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A SiDA predictor trained for the tiny qwen3_moe model in a few steps, with its text."""
    tmp = tmp_path_factory.mktemp("sida")
    text = tmp / "train.txt"
    text.write_text(TEXT)
    model = tiny("qwen3_moe")
    out = tmp / "p.safetensors"
    code = main(["predict", "train", "--model", str(model), "--text", str(text), "--out", str(out), "--context", "16",
                 "--steps", "4", "--width", "16", "--json"])
    assert code == 0
    return model, text, out


def test_train_eval_round_trip(trained, capsys):
    model, text, out = trained
    header = files.read(out, "sida")
    assert {"num_layers", "num_experts", "top_k", "hidden_size", "vocab_size", "router_fingerprint"} <= set(header.model)
    assert header.model["num_experts"] == 8 and header.model["top_k"] == 3 and header.model["hidden_size"] == 32
    capsys.readouterr()
    assert main(["predict", "eval", "--model", str(model), "--predictor", str(out), "--text", str(text),
                 "--context", "16", "--k", "2,4", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["mean_recall"]) == {"2", "4"} and set(res["mean_hit_rate"]) == {"2", "4"}
    assert len(res["layers"]) == header.model["num_layers"] and res["tokens"] > 16
    assert {"lookahead", "frequency"} <= set(res["baselines"])
    for r in [res] + list(res["baselines"].values()):
        assert all(0 <= v <= 1 for v in list(r["mean_recall"].values()) + list(r["mean_hit_rate"].values()))
        assert r["mean_recall"]["2"] <= r["mean_recall"]["4"]
    assert main(["predict", "eval", "--model", str(model), "--predictor", str(out), "--text", str(text),
                 "--context", "16"]) == 0
    assert "recall@3" in capsys.readouterr().out  # default k: top-k and twice it


def _rewrite(src: Path, dst: Path, **model_fields) -> Path:
    pf = files.read(src)
    return files.save(dst, pf.kind, pf.model | model_fields, pf.config, pf.training, pf.tensors)


@pytest.mark.parametrize("field,value", [("num_layers", 5), ("num_experts", 16), ("top_k", 1), ("hidden_size", 64),
                                         ("vocab_size", 7), ("router_fingerprint", "0123456789abcdef")])
def test_a_predictor_for_another_model_is_refused(trained, tmp_path, capsys, field, value):
    model, text, out = trained
    other = _rewrite(out, tmp_path / "other.safetensors", **{field: value})
    capsys.readouterr()
    assert main(["predict", "eval", "--model", str(model), "--predictor", str(other), "--text", str(text),
                 "--context", "16"]) == 2
    err = capsys.readouterr().err
    assert f"({field} differs)" in err and "Traceback" not in err


def test_another_checkpoint_of_the_same_shape_is_refused(trained, tiny):
    import moedeploy
    from moedeploy.predict.sida import SidaPredictor

    _, _, out = trained
    with pytest.raises(PredictorError, match="router_fingerprint differs"):
        SidaPredictor.load(out, moedeploy.load(tiny("qwen3_moe", seed=1)))


def test_truncated_or_corrupt_files_are_refused(trained, tmp_path, capsys):
    import moedeploy
    from moedeploy.predict.sida import SidaPredictor

    model_dir, text, out = trained
    model = moedeploy.load(model_dir)
    data = out.read_bytes()
    cases = {"empty": b"", "short": data[:5], "header cut": data[:40], "data cut": data[:-10],
             "garbage": b"\x00" * 64, "bad json": data[:8] + b"{" * (len(data) - 8),
             "plain safetensors": None}
    for name, blob in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        if blob is None:
            from safetensors.torch import save_file

            save_file({"x": torch.zeros(2)}, str(bad))
        else:
            bad.write_bytes(blob)
        with pytest.raises(PredictorError):
            SidaPredictor.load(bad, model)
    with pytest.raises(PredictorError, match="does not exist"):
        SidaPredictor.load(tmp_path / "missing.safetensors", model)
    capsys.readouterr()
    assert main(["predict", "eval", "--model", str(model_dir), "--predictor", str(tmp_path / "data cut.safetensors"),
                 "--text", str(text)]) == 2
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err


def _variant(src: Path, dst: Path, drop=(), config=None, tensors=None) -> Path:
    pf = files.read(src)
    return files.save(dst, pf.kind, {k: v for k, v in pf.model.items() if k not in drop}, pf.config | (config or {}),
                      pf.training, pf.tensors | (tensors or {}))


def test_a_predictor_file_that_disagrees_with_itself_is_refused(trained, tmp_path, tiny):
    """Settings no network can have, tensors of the wrong shape, a header that leaves out what the model is or is
    not JSON objects where it must be: a PredictorError naming the file, never a crash or a silent load."""
    import moedeploy
    from moedeploy.predict.sida import SidaPredictor

    model_dir, _, out = trained
    model = moedeploy.load(model_dir)
    bad = {"heads": _variant(out, tmp_path / "heads.safetensors", config={"heads": 0}),
           "window": _variant(out, tmp_path / "window.safetensors", config={"window": 0}),
           "frequency": _variant(out, tmp_path / "freq.safetensors", tensors={"frequency": torch.ones(1, 3)})}
    for name, path in bad.items():
        with pytest.raises(PredictorError, match=str(path)):
            SidaPredictor.load(path, model)
    for field in ("router_fingerprint", "vocab_size", "top_k"):  # another checkpoint would load if they were left out
        with pytest.raises(PredictorError, match=f"{field} missing"):
            SidaPredictor.load(_variant(out, tmp_path / f"no-{field}.safetensors", drop=(field,)),
                               moedeploy.load(tiny("qwen3_moe", seed=1)))
    from safetensors.torch import save_file

    for name, meta in {"int": "7", "list": json.dumps({"format": 1, "kind": "sida", "model": [1, 2]})}.items():
        path = tmp_path / f"meta-{name}.safetensors"
        save_file({"x": torch.zeros(2)}, str(path), metadata={files.KEY: meta})
        with pytest.raises(PredictorError, match="corrupt header|not a moedeploy predictor"):
            files.read(path)


def test_a_failed_write_leaves_the_old_predictor_whole(trained, tmp_path):
    """Predictor files are written beside their destination and renamed over it: a write the system refuses
    midway (here a file-size limit: the disk is "full" after 4 KB) leaves the previous file as it was, no
    temporary file, and an error naming the file."""
    import subprocess
    import sys

    _, _, out = trained
    dst = tmp_path / "p.safetensors"
    dst.write_bytes(out.read_bytes())
    script = (
        "import resource, signal, sys\n"
        "from moedeploy.errors import OutputError\n"
        "from moedeploy.predict import files\n"
        "pf = files.read(sys.argv[1])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))\n"
        "try:\n"
        "    files.save(sys.argv[1], pf.kind, pf.model, pf.config, pf.training, pf.tensors)\n"
        "except OutputError as ex:\n"
        "    print(ex)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(dst)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"could not write {dst}: File too large")
    assert dst.read_bytes() == out.read_bytes() and [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_shipped_demo_predictor_is_the_default(tmp_path, capsys):
    """The demo model's predictor ships and loads by default (a few hundred held-out tokens)."""
    from moedeploy.predict.sida import DEMO_PREDICTOR

    assert DEMO_PREDICTOR.is_file() and DEMO_PREDICTOR.stat().st_size < 6_000_000
    heldout = Path(__file__).resolve().parent.parent / "moedeploy" / "data" / "heldout" / "tempest.txt"
    assert main(["predict", "eval", "--text", str(heldout), "--max-tokens", "256", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["predictor"] == str(DEMO_PREDICTOR)
    assert res["mean_recall"]["4"] > res["baselines"]["frequency"]["mean_recall"]["4"]


# -- trace history ------------------------------------------------------------------------------------------------
def write_esft(root: Path, domain: str, seqs: list[np.ndarray]) -> Path:
    """ESFT's format: <domain>/expert_weights_<L>.txt, one line per sequence, ids then two tabs then weights."""
    d = root / domain
    d.mkdir(parents=True)
    L = seqs[0].shape[1]
    for layer in range(L):
        lines = []
        for s in seqs:  # [T, L, K]
            ids = s[:, layer].reshape(-1)
            w = np.linspace(0.5, 0.1, s.shape[2])[None].repeat(len(s), 0).reshape(-1)
            lines.append("\t".join(map(str, ids)) + "\t\t" + "\t".join(f"{x:.3f}" for x in w))
        (d / f"expert_weights_{layer + 1}.txt").write_text("\n".join(lines) + "\n")
    return d


def synthetic_routing(rng, sequences: int, length: int, L: int = 4, E: int = 64, K: int = 6, vocab: int = 12):
    """Tokens from a small vocabulary, each routed by a fixed table (plus noise): routing repeats with words.
    ESFT's shape per layer (64 experts, top-6: the reader's), fewer layers."""
    table = np.stack([[rng.choice(E, K, replace=False) for _ in range(L)] for _ in range(vocab)])  # [V, L, K]
    seqs = []
    for _ in range(sequences):
        tok = rng.integers(0, vocab, length)
        s = table[tok].copy()
        noise = rng.random(s.shape[:2]) < 0.1
        s[noise, -1] = E - 1 - s[noise, 0]  # an expert outside the table's ranks for this token
        seqs.append(s)
    return seqs


def test_history_train_eval_on_esft_format(tmp_path, capsys):
    rng = np.random.default_rng(0)
    tune = [write_esft(tmp_path, name, synthetic_routing(rng, 6, 30)) for name in ("a", "b")]
    test = write_esft(tmp_path / "held", "c", synthetic_routing(rng, 5, 30))
    out = tmp_path / "trace.safetensors"
    args = ["predict", "train", "--trace", str(tune[0]), "--trace", str(tune[1]), "--out", str(out), "--steps", "60",
            "--json"]
    assert main(args) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["domains"] == ["a", "b"] and made["model"]["num_layers"] == 4
    assert main(["predict", "eval", "--trace", str(test), "--predictor", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["mean_recall"]) == {"6", "12"} and len(res["layers"]) == 4
    assert {"cooccurrence", "frequency"} <= set(res["baselines"])
    assert res["mean_recall"]["6"] > res["baselines"]["frequency"]["mean_recall"]["6"]
    # the co-occurrence table of `predict fit` scores through the same command
    npz = tmp_path / "table.npz"
    assert main(["predict", "fit", "--trace", str(tune[0]), "--max-lookahead", "1", "--out", str(npz)]) == 0
    capsys.readouterr()
    assert main(["predict", "eval", "--trace", str(test), "--predictor", str(npz), "--json"]) == 0
    assert "mean_recall" in json.loads(capsys.readouterr().out)
    # a trace of another shape is refused with the field named
    other = write_esft(tmp_path / "wide", "d", synthetic_routing(rng, 2, 10, L=5))
    assert main(["predict", "eval", "--trace", str(other), "--predictor", str(out)]) == 2
    assert "num_layers differs" in capsys.readouterr().err


def test_history_scores_are_causal():
    rng = np.random.default_rng(1)
    seqs = synthetic_routing(rng, 4, 20)
    model = {"num_layers": 4, "num_experts": 64, "top_k": 6, "source": "synthetic"}
    streams = [(s, np.eye(1, len(s), dtype=bool)[0]) for s in seqs]
    net, _ = train_routenet(streams, model, RouteConfig(memory=50), RouteTrain(steps=10), progress=False)
    ex = seqs[0]
    base = net.scores(Known(experts=ex))
    changed = ex.copy()
    changed[10:, 2] = 63 - changed[10:, 2]  # token 10's layer 2 onward, and later tokens
    now = net.scores(Known(experts=changed))
    torch.testing.assert_close(now[:10], base[:10])
    torch.testing.assert_close(now[10, :3], base[10, :3])  # layers <= 2 of token 10 read layers <= 1 only
    assert not torch.allclose(now[10, 3], base[10, 3])


def test_history_file_round_trip_and_kind(tmp_path, trained):
    rng = np.random.default_rng(2)
    seqs = synthetic_routing(rng, 3, 15)
    model = {"num_layers": 4, "num_experts": 64, "top_k": 6, "source": "synthetic"}
    net, _ = train_routenet([(s, np.eye(1, len(s), dtype=bool)[0]) for s in seqs], model, RouteConfig(memory=20),
                            RouteTrain(steps=5), progress=False)
    path = net.save(tmp_path / "r.safetensors")
    again = RouteNet.load(path)
    known = Known(experts=seqs[0])
    torch.testing.assert_close(again.scores(known), net.scores(known))
    with pytest.raises(PredictorError, match="'sida' predictor"):
        RouteNet.load(trained[2])


@pytest.mark.skipif(not (ESFT / "intent").is_dir(), reason="the ESFT traces are not on this machine")
def test_real_esft_smoke(tmp_path, capsys):
    """A few real sequences of two domains (copied, first lines only): train on one, score the other."""
    for name, n in (("intent", 4), ("law", 1)):
        d = tmp_path / name
        d.mkdir()
        for f in (ESFT / name).glob("expert_weights_*.txt"):
            with f.open() as src:
                (d / f.name).write_text("".join(next(src) for _ in range(n)))
    out = tmp_path / "p.safetensors"
    assert main(["predict", "train", "--trace", str(tmp_path / "intent"), "--out", str(out), "--steps", "20"]) == 0
    capsys.readouterr()
    assert main(["predict", "eval", "--trace", str(tmp_path / "law"), "--predictor", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert len(res["layers"]) == 26 and 0 < res["mean_recall"]["6"] <= 1


def test_a_trace_of_batched_decoding_streams_each_request_in_its_own_order(tiny):
    """Serving order interleaves the requests of a batched decode; the predictors' stream takes each request's
    tokens in order, so a row's previous row is its own request's previous token and only first tokens start."""
    import moedeploy
    from moedeploy.predict.cli import _stream
    from moedeploy.trace.record import record

    model = moedeploy.load(tiny("qwen3_moe"))
    ids = torch.tensor([[5, 17, 33, 40, 41, 9], [7, 8, 100, 101, 3, 2]])
    with record(model) as recorder, torch.no_grad():
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    trace = recorder.trace()
    assert len(set(trace.step.tolist())) > 1 and len(set(trace.request.tolist())) == 2
    experts, first, _ = _stream(trace)
    order = np.lexsort((trace.position, trace.request))
    assert first.sum() == 2 and np.array_equal(experts, trace.experts[order])
    request, position = trace.request[order], trace.position[order]
    assert all(position[i] == position[i - 1] + 1 and request[i] == request[i - 1] for i in np.flatnonzero(~first))


def test_predict_options_that_cannot_work_are_refused_before_any_work(tmp_path, capsys):
    """Values no run can use, options of the other mode (--text or --trace), routing other than the router's, and
    domains: each a one-line error (exit 2), nothing written; --domain needs a domain in some trace, not in each."""
    rng = np.random.default_rng(0)
    a, b = (write_esft(tmp_path, name, synthetic_routing(rng, 3, 12)) for name in ("a", "b"))
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    out = tmp_path / "p.safetensors"
    trace, model = ["--trace", str(a)], ["--text", str(text)]
    cases = [
        (["eval", *model, "--context", "0"], "--context must be at least 2"),
        (["eval", *trace, "--predictor", str(out), "--k", "0"], "--k takes positive integers"),
        (["eval", *trace, "--predictor", str(out), "--k", "-1"], "--k takes positive integers"),
        (["train", *trace, "--out", str(out), "--steps", "0"], "--steps must be at least 1"),
        (["train", *model, "--out", str(out), "--steps", "-3"], "--steps must be at least 1"),
        (["train", *model, "--out", str(out), "--epochs", "0"], "--epochs must be above 0"),
        (["train", *trace, "--out", str(out), "--width", "7", "--save-dtype", "bfloat16", "--device", "cuda:7"],
         "--width, --save-dtype, --device do not apply with --trace"),
        (["train", *model, "--out", str(out), "--lookahead", "2"], "--lookahead does not apply with --text"),
        (["eval", *trace, "--predictor", str(out), "--context", "64"], "--context does not apply with --trace"),
        (["eval", *model, "--routing", "predicted"], "--routing predicted: predictors are trained and scored"),
        (["train", *trace, "--trace", str(b), "--domain", "c", "--out", str(out)], "--domain 'c': not in the traces"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["predict", *args]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert not out.exists()
    assert main(["predict", "train", *trace, "--trace", str(b), "--domain", "a", "--out", str(out), "--steps", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["domains"] == ["a"]
