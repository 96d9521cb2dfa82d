"""Check a guessed adapter against transformers itself, for families moedeploy has no file for.

The generic family guesses (softmax top-k router, gated experts, optional shared experts). A wrong
guess would silently change outputs, so before such a model is used, transformers' own block is
built with the weights moedeploy loaded and run beside moedeploy's layer on random hidden states.
Any block tensor moedeploy cannot fill, or any difference, refuses the model with a clear error.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UnsupportedModelError
from ..layer import MoELayer
from .base import router_module


def _our_tensors(block: nn.Module, layer: MoELayer, experts) -> dict[str, torch.Tensor]:
    router_name = "gate" if hasattr(block, "gate") else "router"
    state = {f"{router_name}.weight": layer.router.weight, "experts.gate_up_proj": experts.w_in,
             "experts.down_proj": experts.w_out}
    if layer.router.bias is not None:
        state[f"{router_name}.bias"] = layer.router.bias
    for name, tensor in layer.state_dict().items():
        if not name.startswith(("router.", "experts.")):
            state[name] = tensor  # shared experts keep transformers' names
    return state


def verify_block(block: nn.Module, layer: MoELayer, family_name: str, path: str) -> None:
    hf = copy.deepcopy(block).to_empty(device="cpu").float().eval()
    # the disk tier, quantized experts or a rank's share: compare every float expert, read again for the check
    on_disk = getattr(layer.experts, "quantized", False) or layer.parallel is not None or layer.experts.w_in.is_meta
    experts = layer.source.bank(torch.float32) if on_disk else layer.experts
    state = _our_tensors(block, layer, experts)
    needed = [n for n, _ in hf.named_parameters()] + [
        n for n, b in hf.named_buffers() if n.rpartition(".")[2] not in getattr(
            hf.get_submodule(n.rpartition(".")[0]), "_non_persistent_buffers_set", set())]
    unknown = sorted(set(needed) - set(state))
    if unknown:
        raise UnsupportedModelError(
            f"{family_name}: the MoE block {path} ({type(block).__name__}) has tensors moedeploy's generic adapter "
            f"does not know how to use ({', '.join(unknown)}); this family needs an adapter in moedeploy/models/"
        )
    hf.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    memo = {id(layer.store): layer.store, id(layer.source): layer.source, id(layer.parallel): None,
            id(layer.pool): None}  # stores hold open files: shared; the copy runs alone, resident
    ours = copy.deepcopy(layer, memo=memo)
    ours.experts.on_host = False  # a buffered layer's bank stays put when moved; this copy must convert
    ours = ours.float()
    if on_disk:
        ours.experts = experts  # already float32; never the loaded layer's own bank, which must keep its dtype
        ours.backend = "loop"  # the reference kernel, whatever the loaded bank's was
    x = torch.randn(2, 9, layer.experts.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(x)
        want = want[0] if isinstance(want, tuple) else want
        got = ours(x)
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()
    if not err < 1e-4:
        raise UnsupportedModelError(
            f"{family_name}: moedeploy's generic adapter does not reproduce {type(block).__name__} "
            f"(router {type(router_module(block)).__name__}); relative difference {err:.2e}. "
            "This family needs an adapter in moedeploy/models/"
        )
