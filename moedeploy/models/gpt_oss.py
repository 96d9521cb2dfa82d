"""GPT-OSS: router with a bias (top-k on logits, softmax over the k), experts with biases and a
clamped SwiGLU, stored fused, transposed and with gate/up columns interleaved. Its MLP returns
(hidden states, router scores)."""

from __future__ import annotations

from torch import Tensor

from ..experts import Activation
from ..layer import MoELayer
from ..routing import TopKSoftmax
from .base import Family, router_module
from .layouts import Fused


class GptOssLayer(MoELayer):
    def forward(self, hidden_states: Tensor) -> tuple[Tensor, None]:
        return super().forward(hidden_states), None  # the decoder layer discards the router scores


class GptOss(Family):
    name = "gpt_oss"
    model_types = ("gpt_oss",)
    layouts = (Fused(gate_up="experts.gate_up_proj", down="experts.down_proj", gate_up_bias="experts.gate_up_proj_bias",
                     down_bias="experts.down_proj_bias", transposed=True, interleaved=True, biases_required=True),)
    router_bias_required = True
    layer_class = GptOssLayer

    def rule(self, config, block):
        return TopKSoftmax(top_k=router_module(block).top_k)

    def dims(self, block):
        E, I, D = block.experts.down_proj.shape
        return D, I

    def activation(self, config, block):
        return Activation(fn=None, gated=True, clamp=block.experts.limit, alpha=block.experts.alpha)
