"""Families whose router is a plain softmax / top-k variant; everything else is generic.

- Mixtral: softmax, top-k, renormalise, weights kept in fp32. Disk names `block_sparse_moe.experts.{e}.w1/w3/w2`.
- Qwen2-MoE, Qwen3-MoE, OLMoE: the generic family (softmax, top-k, renormalise if `norm_topk_prob`).
- GraniteMoE: top-k on fp32 logits, softmax over the k. Disk names `input_linear` / `output_linear`.
"""

from __future__ import annotations

from ..routing import SoftmaxTopK, TopKSoftmax
from .base import Family, router_module


class Mixtral(Family):
    name = "mixtral"
    model_types = ("mixtral", "minimax")

    def rule(self, config, block):
        return SoftmaxTopK(top_k=router_module(block).top_k, renormalize=True, keep_float32=True)


class QwenMoe(Family):
    name = "qwen_moe"
    model_types = ("qwen2_moe", "qwen3_moe", "olmoe")


class GraniteMoe(Family):
    name = "granitemoe"
    model_types = ("granitemoe",)

    def rule(self, config, block):
        return TopKSoftmax(top_k=router_module(block).top_k, float32_logits=True)
