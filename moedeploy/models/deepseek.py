"""DeepSeek-V2 and -V3: fp32 router logits, group-limited top-k, routed scaling, shared experts.

V2 scores with softmax and picks greedily (optionally only within the best groups, by group max);
V3 scores with sigmoid, chooses by score + a learned correction bias within the best groups (by the
sum of each group's two best), and weights by the raw scores, renormalised. The first
`first_k_dense_replace` layers are dense MLPs and are left alone.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from ..routing import DeepseekV2Rule, DeepseekV3Rule
from .base import Family, router_module


class DeepseekV2(Family):
    name = "deepseek_v2"
    model_types = ("deepseek_v2",)
    logits_dtype = torch.float32

    def rule(self, config, block):
        if config.topk_method not in ("greedy", "group_limited_greedy"):
            raise UnsupportedModelError(
                f"DeepSeek-V2 topk_method {config.topk_method!r} is not supported (transformers supports "
                "'greedy' and 'group_limited_greedy' only)"
            )
        return DeepseekV2Rule(top_k=router_module(block).top_k, method=config.topk_method, n_group=config.n_group,
                              topk_group=config.topk_group, scaling=config.routed_scaling_factor)


class DeepseekV3(Family):
    """Also GLM-4-MoE, whose router is DeepSeek-V3's."""

    name = "deepseek_v3"
    model_types = ("deepseek_v3", "glm4_moe")
    logits_dtype = torch.float32
    correction_bias_names = ("gate.e_score_correction_bias",)

    def rule(self, config, block):
        return DeepseekV3Rule(top_k=router_module(block).top_k, n_group=config.n_group, topk_group=config.topk_group,
                              renormalize=bool(config.norm_topk_prob), scaling=config.routed_scaling_factor)
