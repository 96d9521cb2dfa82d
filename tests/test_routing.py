"""Router rules against transformers' own router modules, on many tokens and on edge settings.

Routings are compared as dense [T, E] weight matrices, so the order of a token's k choices (which
transformers leaves unsorted for DeepSeek) does not matter.
"""

from __future__ import annotations

import pytest
import torch
import transformers as T
from conftest import skip_without_switch_reference
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter
from transformers.models.granitemoe.modeling_granitemoe import GraniteMoeTopKRouter
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
from transformers.models.nllb_moe.modeling_nllb_moe import NllbMoeTop2Router
from transformers.models.phimoe.modeling_phimoe import PhimoeTopKRouter
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

from moedeploy.routing import (DeepseekV2Rule, DeepseekV3Rule, NllbTop2, Router, SoftmaxTopK, SparseMixer, SwitchTop1,
                               TopKSoftmax)

D, E, TOKENS = 32, 16, 257


def dense(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    out = torch.zeros(ids.shape[0], num_experts + 1, dtype=weights.dtype)
    return out.scatter_add_(1, ids, weights)[:, :num_experts]  # the dropped sentinel column is cut


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.5
    return module.eval()


def hidden(seed=1, tokens=TOKENS):
    return torch.randn(tokens, D, generator=torch.Generator().manual_seed(seed))


def ours(rule, hf, **kw) -> Router:
    weight = hf.weight if hasattr(hf, "weight") else hf.classifier.weight
    bias = getattr(hf, "bias", None) if not hasattr(hf, "classifier") else hf.classifier.bias
    return Router(rule, weight.detach().clone(), None if bias is None else bias.detach().clone(), **kw)


def check(hf_out, routing):
    """hf_out: a transformers router's (logits, weights, ids), in the order of its version (5.21 reordered
    them): ids are the integer tensor, weights the float one of the same shape."""
    ids = next(t for t in hf_out if not t.is_floating_point())
    w = next(t for t in hf_out if t.is_floating_point() and t.shape == ids.shape)
    torch.testing.assert_close(dense(routing.ids, routing.weights, E), dense(ids, w.to(routing.weights.dtype), E),
                               rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 2, 5])
def test_mixtral_softmax_topk_renormalised(k):
    hf = randomize(MixtralTopKRouter(T.MixtralConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=k)))
    x = hidden()
    check(hf(x), ours(SoftmaxTopK(k, renormalize=True, keep_float32=True), hf)(x))


@pytest.mark.parametrize("norm", [False, True])
def test_qwen_softmax_topk(norm):
    cfg = T.Qwen3MoeConfig(hidden_size=D, num_experts=E, num_experts_per_tok=4, norm_topk_prob=norm)
    hf = randomize(Qwen3MoeTopKRouter(cfg))
    x = hidden()
    check(hf(x), ours(SoftmaxTopK(4, renormalize=norm), hf)(x))


def test_gpt_oss_topk_then_softmax_with_bias():
    hf = randomize(GptOssTopKRouter(T.GptOssConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=4)))
    x = hidden()
    check(hf(x), ours(TopKSoftmax(4), hf)(x))


def test_granite_topk_then_softmax():
    hf = randomize(GraniteMoeTopKRouter(T.GraniteMoeConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=3)))
    x = hidden()
    check(hf(x), ours(TopKSoftmax(3, float32_logits=True), hf)(x))


@pytest.mark.parametrize("jitter", [0.01, 0.5])
def test_phimoe_sparsemixer(jitter):
    cfg = T.PhimoeConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=2, router_jitter_noise=jitter)
    hf = randomize(PhimoeTopKRouter(cfg))
    x = hidden()
    check(hf(x), ours(SparseMixer(jitter), hf)(x))


@pytest.mark.parametrize("method", ["greedy", "group_limited_greedy"])
def test_deepseek_v2(method):
    cfg = T.DeepseekV2Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=6, n_group=4, topk_group=2,
                             topk_method=method, routed_scaling_factor=1.7)
    hf = randomize(DeepseekV2TopkRouter(cfg))
    x = hidden()
    check(hf(x), ours(DeepseekV2Rule(6, method, 4, 2, 1.7), hf, logits_dtype=torch.float32)(x))


@pytest.mark.parametrize("norm", [False, True])
def test_deepseek_v3_with_correction_bias(norm):
    cfg = T.DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=4, n_group=4, topk_group=2,
                             norm_topk_prob=norm, routed_scaling_factor=2.5)
    hf = randomize(DeepseekV3TopkRouter(cfg))
    hf.e_score_correction_bias = torch.randn(E, generator=torch.Generator().manual_seed(3))
    x = hidden()
    got = ours(DeepseekV3Rule(4, 4, 2, norm, 2.5), hf, correction_bias=hf.e_score_correction_bias.clone(),
               logits_dtype=torch.float32)(x)
    check(hf(x), got)


@pytest.mark.parametrize("capacity", [1, 3, 64])
def test_switch_top1_per_sequence_capacity(capacity):
    skip_without_switch_reference()
    cfg = T.SwitchTransformersConfig(d_model=D, num_experts=E, expert_capacity=capacity)
    hf = randomize(SwitchTransformersTop1Router(cfg))
    x = hidden(tokens=4 * 40).view(4, 40, D)  # 4 sequences of 40 tokens
    mask, probs, _ = hf(x)
    want = (mask * probs).reshape(-1, E)
    got = ours(SwitchTop1(E, capacity), hf, logits_dtype=torch.float32)(x.reshape(-1, D), groups=4)
    torch.testing.assert_close(dense(got.ids, got.weights, E), want, rtol=0, atol=0)
    assert (got.ids == E).any() == (capacity < 40)


@pytest.mark.parametrize("fraction,prioritized,before", [
    (1.0, False, False), (0.1, False, False), (0.1, True, False), (0.1, False, True), (0.0, True, True)])
def test_nllb_top2_capacity(fraction, prioritized, before):
    cfg = T.NllbMoeConfig(d_model=D, num_experts=E, moe_eval_capacity_token_fraction=fraction, expert_capacity=5,
                          batch_prioritized_routing=prioritized, normalize_router_prob_before_dropping=before)
    hf = randomize(NllbMoeTop2Router(cfg))
    x = hidden()
    _, probs, _ = hf(x)
    rule = NllbTop2(E, fraction, 5, before, prioritized, output_scale=1.0)
    got = ours(rule, hf, logits_dtype=torch.float32)(x)
    torch.testing.assert_close(dense(got.ids, got.weights, E), probs, rtol=0, atol=0)


def test_nllb_padding_is_never_routed():
    cfg = T.NllbMoeConfig(d_model=D, num_experts=E, moe_eval_capacity_token_fraction=0.2)
    hf = randomize(NllbMoeTop2Router(cfg))
    x = hidden()
    keep = torch.rand(TOKENS, generator=torch.Generator().manual_seed(9)) > 0.3
    padding = (~keep).float()  # transformers' 2-D convention: non-zero marks padding
    _, probs, _ = hf(x, padding)
    got = ours(NllbTop2(E, 0.2, None, False, False, 1.0), hf, logits_dtype=torch.float32)(x, keep=keep)
    torch.testing.assert_close(dense(got.ids, got.weights, E), probs, rtol=0, atol=0)
    assert (got.ids[~keep] == E).all()
