"""The generic family: what most transformers MoE blocks share, and the hooks a family overrides.

A transformers MoE block is any module with an `experts` child and a `gate` or `router` child. The
generic family reads its router as softmax top-k (renormalised when the router says
`norm_topk_prob`), its experts as a gated FFN with the experts module's own `act_fn`, and its shared
expert (`shared_expert` + `shared_expert_gate` as in Qwen2-MoE, or `shared_experts` as in DeepSeek)
from the block itself. A family file overrides only what differs.
"""

from __future__ import annotations

from torch import nn

from ..errors import UnsupportedModelError
from ..experts import Activation
from ..layer import MoELayer
from ..routing import SoftmaxTopK
from .layouts import GENERIC_LAYOUTS

# Router tensors, relative to the block prefix on disk: first present name wins.
ROUTER_WEIGHT = ("gate.weight", "router.weight", "router.layer.weight", "router.classifier.weight")
ROUTER_BIAS = ("gate.bias", "router.bias", "router.classifier.bias")
# In-model block names that older checkpoints spell differently on disk.
DISK_ALIASES = {"mlp": ("mlp", "block_sparse_moe")}


def router_module(block: nn.Module) -> nn.Module:
    return getattr(block, "gate", None) or getattr(block, "router")


class Family:
    name = "generic"
    model_types: tuple[str, ...] = ()
    layouts = GENERIC_LAYOUTS
    layer_class = MoELayer
    logits_dtype = None  # dtype the router computes logits in; None = the hidden states' dtype
    router_weight_names = ROUTER_WEIGHT
    router_bias_names = ROUTER_BIAS
    router_bias_required = False  # the family's router always has a bias (GPT-OSS): a missing one is an error
    correction_bias_names: tuple[str, ...] = ()

    def is_block(self, module: nn.Module) -> bool:
        return hasattr(module, "experts") and (hasattr(module, "gate") or hasattr(module, "router"))

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        found = []
        for path, module in model.named_modules():
            if self.is_block(module) and not any(path.startswith(p + ".") for p, _ in found):
                found.append((path, module))
        return found

    def rule(self, config, block: nn.Module):
        r = router_module(block)
        if not hasattr(r, "top_k"):
            raise UnsupportedModelError(
                f"{type(block).__name__}: cannot tell how its router {type(r).__name__} picks experts; "
                "this family needs an adapter in moedeploy/models/"
            )
        return SoftmaxTopK(top_k=r.top_k, renormalize=bool(getattr(r, "norm_topk_prob", False)))

    def dims(self, block: nn.Module) -> tuple[int, int]:
        """(hidden D, intermediate I) of one expert, read from the (meta) transformers block."""
        E, D, I = block.experts.down_proj.shape
        return D, I

    def activation(self, config, block: nn.Module) -> Activation:
        return Activation(fn=block.experts.act_fn, gated=True)

    def shared(self, block: nn.Module) -> tuple[tuple[str, nn.Module] | None, tuple[str, nn.Module] | None]:
        """(shared experts, their sigmoid gate) as (attribute name, module) pairs of the block."""
        for name in ("shared_expert", "shared_experts"):
            if isinstance(getattr(block, name, None), nn.Module):
                gate = getattr(block, "shared_expert_gate", None)
                return (name, getattr(block, name)), (("shared_expert_gate", gate) if gate is not None else None)
        return None, None

    def logits_dtype_for(self, config):
        return self.logits_dtype

    def configure(self, layer: MoELayer, config) -> None:
        """Set family-specific attributes of a freshly built layer (none by default)."""

    def disk_prefixes(self, path: str) -> list[str]:
        """Candidate on-disk prefixes for the block at in-model `path`."""
        head, _, last = path.rpartition(".")
        return [f"{head}.{alias}" if head else alias for alias in DISK_ALIASES.get(last, (last,))]
