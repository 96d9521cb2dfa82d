"""Every supported family: moedeploy's logits and greedy generations equal transformers' (eager experts)."""

from __future__ import annotations

import pytest
import torch

import moedeploy
from moedeploy.tiny import FAMILIES

SEQ2SEQ = {"switch_transformers", "nllb_moe"}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def logits(model, family, ids, dec):
    with torch.no_grad():
        if family in SEQ2SEQ:
            return model(input_ids=ids, decoder_input_ids=dec).logits
        return model(input_ids=ids).logits


def inputs(seed=0, batch=2, length=13):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 320, (batch, length), generator=g), torch.randint(3, 320, (batch, 7), generator=g)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny, reference, family, backend):
    path = tiny(family)
    ids, dec = inputs()
    ours = moedeploy.load(path, dtype="float32", backend=backend)
    assert rel_err(logits(ours, family, ids, dec), logits(reference(path), family, ids, dec)) < 1e-5
    assert {layer.backend for layer in ours.moedeploy.layers.values()} == {backend}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_is_token_identical(tiny, reference, family):
    path = tiny(family)
    ids, _ = inputs(seed=1, batch=1, length=9)
    kwargs = dict(max_new_tokens=32, min_new_tokens=32, do_sample=False)
    with torch.no_grad():
        want = reference(path).generate(ids, **kwargs)
        got = moedeploy.load(path, dtype="float32").generate(ids, **kwargs)
    assert got.shape[-1] >= 32
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_gating_with_room_for_every_token_is_exact(tiny, reference, family):
    """Static gating with the model's own capacity (Switch, NLLB) or room for every token (others)."""
    path = tiny(family)
    ids, dec = inputs(seed=2)
    ours = moedeploy.load(path, dtype="float32", gating="static")
    assert rel_err(logits(ours, family, ids, dec), logits(reference(path), family, ids, dec)) < 1e-5


# Capacity that binds: transformers drops tokens itself, and moedeploy must drop the same ones.
BINDING = [
    ("switch_transformers", dict(expert_capacity=2)),
    ("nllb_moe", dict(moe_eval_capacity_token_fraction=0.3)),
    ("nllb_moe", dict(moe_eval_capacity_token_fraction=0.3, batch_prioritized_routing=True)),
    ("nllb_moe", dict(moe_eval_capacity_token_fraction=0.3, normalize_router_prob_before_dropping=True)),
]


@pytest.mark.parametrize("gating", ["dynamic", "static"])
@pytest.mark.parametrize("family,overrides", BINDING, ids=lambda x: str(x) if isinstance(x, str) else "-".join(x))
def test_capacity_drops_match_transformers(tiny, reference, family, overrides, gating):
    path = tiny(family, **overrides)
    ids, dec = inputs(seed=3, length=17)
    ours = moedeploy.load(path, dtype="float32", gating=gating)
    assert rel_err(logits(ours, family, ids, dec), logits(reference(path), family, ids, dec)) < 1e-5
    assert ours.moedeploy.stats()["dropped_pairs"] > 0, "capacity must bind for this test to mean anything"


def test_nllb_padding_tokens_take_no_capacity(tiny, reference):
    path = tiny("nllb_moe", moe_eval_capacity_token_fraction=0.4)
    ids, dec = inputs(seed=4, length=15)
    mask = torch.ones_like(ids)
    mask[0, 10:] = 0  # the first sequence is padded
    ids[0, 10:] = 0
    with torch.no_grad():
        want = reference(path)(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        got = moedeploy.load(path, dtype="float32")(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert rel_err(got, want) < 1e-5


def test_transformers_nllb_experts_ignore_routing(tiny):
    """Documents why the NLLB reference is patched: transformers 5's own experts loop differs from
    fairseq's semantics. If this starts failing, transformers fixed it and the patch can go."""
    import transformers as T

    path = tiny("nllb_moe")
    ids, dec = inputs(seed=5)
    hf = T.AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = moedeploy.load(path, dtype="float32")
    assert rel_err(logits(ours, "nllb_moe", ids, dec), logits(hf, "nllb_moe", ids, dec)) > 1e-3


def test_bfloat16_runs_close_to_float32(tiny):
    path = tiny("qwen3_moe")
    ids, _ = inputs(seed=6)
    with torch.no_grad():
        full = moedeploy.load(path, dtype="float32")(ids).logits
        half = moedeploy.load(path, dtype="bfloat16")(ids).logits.float()
    assert rel_err(half, full) < 0.05


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "phimoe", "granitemoe", "deepseek_v3"])
def test_fused_in_memory_names_on_disk(tiny, reference, family):
    """Checkpoints saved with transformers 5's fused names load as well as the per-expert originals."""
    from safetensors import safe_open

    path = tiny(family, fused=True)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(n.endswith("experts.gate_up_proj") for n in names)
    assert not any(".experts.0." in n for n in names)
    ids, dec = inputs(seed=7)
    ours = moedeploy.load(path, dtype="float32")
    assert rel_err(logits(ours, family, ids, dec), logits(reference(path), family, ids, dec)) < 1e-5


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3", "glm4_moe"])
def test_a_router_transformers_keeps_in_float32_is_read_in_float32(tiny, family):
    """transformers keeps some routers in float32 whatever the model dtype (the model class's private
    `_keep_in_fp32_modules_strict`: DeepSeek's and GLM-4-MoE's `gate.weight` since 5.24, not in 5.17).
    moedeploy reads a router in the dtype transformers gives it, so in bfloat16 both route alike; a float32
    router read in bfloat16 sent some tokens to other experts."""
    import transformers as T

    path = tiny(family)
    theirs = T.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    gate = next(m for n, m in theirs.named_modules() if n.endswith("mlp.gate") and hasattr(m, "weight"))
    ours = moedeploy.load(path, dtype="bfloat16")
    router = next(iter(ours.moedeploy.layers.values())).router
    assert router.weight.dtype == gate.weight.dtype
    assert ("gate.weight" in (type(theirs)._keep_in_fp32_modules_strict or ())) == (gate.weight.dtype == torch.float32)
