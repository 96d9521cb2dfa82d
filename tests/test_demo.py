"""The demo-model pipeline: training script, perplexity evaluation, expert-load statistics."""

from __future__ import annotations

import json
import math

import pytest
import torch

import moedeploy
from moedeploy.cli import main
from moedeploy.demo.data import Corpus
from moedeploy.demo.train import TrainConfig, top_quarter_share, train
from moedeploy.evaluate import ExpertLoad, perplexity
from moedeploy.tiny import _TEXT

SMALL = TrainConfig(vocab_size=300, hidden_size=32, layers=1, heads=2, kv_heads=1, experts=4, top_k=2,
                    moe_intermediate=16, context=32, batch=2, steps=3, warmup=1, skew_every=1, threads=1)


def test_training_script_writes_a_checkpoint_moedeploy_loads(tmp_path):
    report = train(tmp_path / "m", Corpus(train={"a.txt": _TEXT}, heldout={}, other={}), SMALL, log=lambda _: None)
    assert len(report["history"]) == SMALL.steps and report["params"] > 0
    model = moedeploy.load(tmp_path / "m")
    assert model.dtype == torch.bfloat16 and model.moedeploy.family == "qwen_moe"
    saved = json.loads((tmp_path / "m" / "training.json").read_text())
    assert saved["config"]["experts"] == 4


def test_perplexity_matches_a_direct_computation(tiny):
    from transformers import AutoTokenizer

    path = tiny("qwen3_moe")
    model = moedeploy.load(path, dtype="float32")
    tok = AutoTokenizer.from_pretrained(path)
    text = _TEXT[:300]
    result = perplexity(model, tok, text, context=1000)  # one window: compare with a plain forward
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(ids).logits[0, :-1], ids[0, 1:], reduction="sum").item()
    assert result.tokens == ids.shape[1] - 1
    assert math.isclose(result.nll_nats, nll, rel_tol=1e-5)
    first = tok.decode(ids[0, :1])  # not scored: its bytes do not count either
    assert result.bytes == len(text.encode()) - len(first.encode())
    assert math.isclose(result.bits_per_byte, nll / math.log(2) / result.bytes, rel_tol=1e-9)


def test_bits_per_byte_count_the_bytes_of_the_scored_tokens_only(tiny):
    """Each window's first token is not scored, and its bytes leave the denominator with it (they stayed,
    which put the demo model at 1.995 bits per byte on the held-out plays instead of 2.003). A token's
    bytes include the space it starts with; a one-token tail is not scored at all."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny("qwen3_moe"))
    model = moedeploy.load(tiny("qwen3_moe"), dtype="float32")
    text = _TEXT[:200]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    context = 5
    pieces = [tok.decode(ids[:i + 1]) for i in range(len(ids))]  # the text up to each token's end
    own = [len(pieces[0].encode())] + [len(b.encode()) - len(a.encode()) for a, b in zip(pieces, pieces[1:])]
    tail = len(ids) % context
    unscored = set(range(0, len(ids) - tail, context)) | ({len(ids) - tail} if tail else set())
    result = perplexity(model, tok, text, context=context)
    assert result.tokens == len(ids) - len(unscored)
    assert result.bytes == sum(n for i, n in enumerate(own) if i not in unscored)


def test_expert_load_statistics():
    even = ExpertLoad.of(torch.full((8,), 10))
    assert even.top_quarter_share == 0.25 and even.normalized_entropy == 1.0
    skewed = ExpertLoad.of(torch.tensor([70, 10, 5, 5, 4, 3, 2, 1]))
    assert skewed.top_quarter_share == 0.8 and skewed.normalized_entropy < 0.7
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0]] * 6 + [[0.0, 0.0, 5.0, 4.0]] * 2)
    assert top_quarter_share((logits,), top_k=1) == [0.75]


def test_eval_ppl_cli(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text(_TEXT)
    assert main(["eval-ppl", "--model", str(tiny("mixtral")), "--text", str(text), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["perplexity"] > 1 and out["bits_per_byte"] > 0 and len(out["expert_load"]) == 2
    assert main(["eval-ppl", "--model", str(tiny("mixtral")), "--text", str(tmp_path / "none.txt")]) == 2


def test_load_balance_loss_is_per_layer():
    from moedeploy.demo.train import load_balance_loss

    even = torch.zeros(64, 8)  # flat router: every expert equally likely, top-k picks spread by index ties
    hot_a = torch.zeros(64, 8)
    hot_a[:, 0] = 5.0  # every token prefers expert 0 ...
    hot_b = torch.zeros(64, 8)
    hot_b[:, 1] = 5.0  # ... in the other layer, expert 1
    # Per layer, each skewed layer is penalised; transformers' concatenated version would not see it.
    assert load_balance_loss((hot_a, hot_b), top_k=1).mean() > 3 * load_balance_loss((even, even), top_k=1).mean()
    assert load_balance_loss((hot_a, even), top_k=1).shape == (2,)
    assert math.isclose(load_balance_loss((hot_a,), top_k=1).item(), load_balance_loss((hot_a, hot_a), top_k=1)[1].item())


def test_skew_controller_steers_each_layer_on_its_own():
    from moedeploy.demo.train import steer

    # layer 0 over-skewed, layer 1 in the band, layer 2 too even, layer 3 at the ceiling
    assert steer([0.01, 0.01, 0.01, 1.0], [0.7, 0.5, 0.3, 0.9], (0.48, 0.58)) == [0.0125, 0.01, 0.008, 1.0]
    assert steer([1e-4], [0.1], (0.48, 0.58)) == [1e-4]


def test_shipped_demo_model_is_exact_against_transformers():
    """The embedded model loads by default and matches transformers (eager experts) exactly."""
    import transformers as T

    from moedeploy.api import DEMO_MODEL

    ours = moedeploy.load(dtype="float32")
    assert ours.moedeploy.path == DEMO_MODEL and ours.moedeploy.family == "qwen_moe"
    ref = T.AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32, experts_implementation="eager").eval()
    tok = T.AutoTokenizer.from_pretrained(DEMO_MODEL)
    ids = tok(["ROMEO.\nBut soft, what light", "Which is most faint; now 'tis true"], return_tensors="pt",
              padding=True).input_ids
    with torch.no_grad():
        a, b = ours(ids).logits, ref(ids).logits
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
        kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert torch.equal(ours.generate(ids[:1], **kwargs), ref.generate(ids[:1], **kwargs))


def test_demo_model_is_the_cli_default(capsys):
    assert main(["generate", "--prompt", "ROMEO.", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stats"]["new_tokens"] == 8 and out["stats"]["dtype"] == "bfloat16"


def test_residual_dropout_acts_in_training_only():
    import transformers as T

    from moedeploy.demo.train import add_residual_dropout, model_config

    torch.manual_seed(0)
    model = T.Qwen3MoeForCausalLM(model_config(SMALL, eos_id=0)).float()
    ids = torch.randint(1, 300, (2, 16))
    model.eval()
    with torch.no_grad():
        before = model(ids).logits
        add_residual_dropout(model, 0.5)
        assert torch.equal(model(ids).logits, before)  # eval: the hooks change nothing
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)  # training: random masks


def test_learning_rate_warms_up_then_decays_to_its_floor():
    from moedeploy.demo.train import lr_at

    cfg = TrainConfig(steps=1000, warmup=100, lr=1e-3, lr_floor=0.0)
    assert lr_at(0, cfg) == 1e-5 and lr_at(99, cfg) == 1e-3 and lr_at(100, cfg) == 1e-3
    assert lr_at(550, cfg) == pytest.approx(5e-4) and lr_at(1000, cfg) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(1000, TrainConfig(steps=1000, warmup=100, lr=1e-3, lr_floor=0.1)) == pytest.approx(1e-4)
