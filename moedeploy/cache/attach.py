"""Give a loaded model's MoE layers slot pools under a budget: per layer, or one pool for all; pin
the hottest experts of a routing profile if one is given."""

from __future__ import annotations

from ..errors import OptionError
from ..layer import MoELayer
from .budget import CacheConfig, device_bytes
from .pinning import hottest, profile_load
from .policies import make_policy
from .pool import SlotPool


def attach_cache(named: dict[str, MoELayer], config: CacheConfig, device) -> list[SlotPool]:
    layers = list(named.values())
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"expert buffering runs on cpu and cuda devices, not {device.type}; use one of those, "
                          "or no expert_memory budget")
    if any(layer.gating.mode != "dynamic" for layer in layers):
        raise OptionError("an expert memory budget needs gating='dynamic' (static gating runs every expert)")
    sizes = {layer.experts.expert_bytes() for layer in layers}
    per_expert = max(sizes)
    total = sum(layer.experts.expert_bytes() * layer.experts.num_experts for layer in layers)
    if config.budget_bytes > device_bytes(device):
        raise OptionError(f"expert memory budget of {config.budget_bytes:,} bytes is larger than the {device.type} "
                          f"device's {device_bytes(device):,} bytes")
    slots = config.budget_bytes // per_expert
    if config.scope == "global":
        if len(sizes) > 1 or len({tuple(t.shape[1:] for t in layer.experts.tensors()) for layer in layers}) > 1:
            raise OptionError("cache scope 'global' needs every MoE layer's experts to have the same shapes; "
                              "use cache_scope='layer'")
        groups = [layers]
        slots = min(slots, sum(layer.experts.num_experts for layer in layers))
    else:
        groups = [[layer] for layer in layers]
        slots = min(slots // len(layers), min(layer.experts.num_experts for layer in layers))
    if slots < 1:
        need = per_expert * (1 if config.scope == "global" else len(layers))
        raise OptionError(f"expert memory budget of {config.budget_bytes:,} bytes holds no expert per "
                          f"{'model' if config.scope == 'global' else 'layer'}: at least {need:,} bytes are needed "
                          f"(of {total:,} bytes of experts)")
    load = None
    if config.pin_profile is not None:
        load = profile_load(config.pin_profile, list(named), layers[0].experts.num_experts)  # [L, E]
    pools = []
    for group in groups:
        pool = SlotPool(slots, make_policy(config.policy), group[0].experts, device, prefetch=bool(config.prefetch))
        for layer in group:
            layer.pool, layer.pool_index = pool, len(pool.stores)
            pool.register(layer.pool_index, layer.store)
        if load is not None:
            first = layers.index(group[0])  # keys are (index in the pool, expert); the pool's layers are consecutive
            pool.pin(hottest(load[first : first + len(group)], list(range(len(group))), slots, config.pin_fraction))
        pools.append(pool)
    return pools
