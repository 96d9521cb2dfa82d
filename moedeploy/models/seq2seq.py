"""Encoder-decoder MoEs with capacity routers: Switch Transformers (top-1, per-sequence capacity) and
NLLB-MoE (fairseq top-2, batch capacity, padding tokens excluded). Experts are plain two-layer FFNs
stored one module per expert (`experts.expert_{e}`), with biases in NLLB-MoE.

transformers 5's `NllbMoeExperts.forward` one-hot encodes the already one-hot top-1 mask, so it runs
`expert_0`/`expert_1` on every token instead of the routed experts. moedeploy implements fairseq's
semantics with transformers' own router decisions; the tests compare against transformers with that
one function replaced by a per-expert loop.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UnsupportedModelError
from ..experts import Activation
from ..layer import MoELayer
from ..routing import NllbTop2, SwitchTop1
from .base import Family
from .layouts import PerExpert


class _Seq2SeqFamily(Family):
    def dims(self, block):
        D, F = block.experts.expert_0.wo.weight.shape if hasattr(block.experts.expert_0, "wo") else \
            block.experts.expert_0.fc2.weight.shape
        return D, F

    def activation(self, config, block):
        return Activation(fn=block.experts.expert_0.act, gated=False)


class SwitchTransformers(_Seq2SeqFamily):
    name = "switch_transformers"
    model_types = ("switch_transformers",)
    layouts = (PerExpert(up="experts.expert_{e}.wi.weight", down="experts.expert_{e}.wo.weight"),)

    def logits_dtype_for(self, config):
        return getattr(torch, config.router_dtype)

    def rule(self, config, block):
        return SwitchTop1(num_experts=config.num_experts, capacity=config.expert_capacity)


class NllbLayer(MoELayer):
    """Takes the encoder/decoder attention mask, as transformers' NllbMoeSparseMLP does."""

    ignore_padding = False

    def forward(self, hidden_states: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        keep = None
        if padding_mask is not None and not self.ignore_padding:
            if padding_mask.dim() == 4:  # an additive attention mask: the last query row tells padding
                padding_mask = padding_mask[:, :, -1, :].reshape(-1)[-x.shape[0]:]
            keep = ~padding_mask.reshape(-1).bool()
        return self.moe(x, keep=keep).view(shape)


class NllbMoe(_Seq2SeqFamily):
    name = "nllb_moe"
    model_types = ("nllb-moe", "nllb_moe")
    layer_class = NllbLayer
    layouts = (PerExpert(up="experts.expert_{e}.fc1.weight", down="experts.expert_{e}.fc2.weight",
                         up_bias="experts.expert_{e}.fc1.bias", down_bias="experts.expert_{e}.fc2.bias"),)

    def logits_dtype_for(self, config):
        return getattr(torch, config.router_dtype)

    def rule(self, config, block):
        if config.second_expert_policy != "all":
            raise UnsupportedModelError(
                f"NLLB-MoE second_expert_policy={config.second_expert_policy!r} routes at random; "
                "only 'all' (the inference setting) is supported"
            )
        return NllbTop2(num_experts=config.num_experts, eval_fraction=config.moe_eval_capacity_token_fraction,
                        capacity=config.expert_capacity,
                        normalize_before_dropping=config.normalize_router_prob_before_dropping,
                        batch_prioritized=config.batch_prioritized_routing,
                        output_scale=1.0 - config.moe_token_dropout)

    def configure(self, layer: NllbLayer, config) -> None:
        layer.ignore_padding = bool(config.router_ignore_padding_tokens)
