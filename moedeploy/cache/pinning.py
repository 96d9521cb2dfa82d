"""Which experts to pin (keep resident for good), from a routing profile: a recorded trace.

A profile is any per-token trace of the same model (`moedeploy generate/eval-ppl --trace FILE`).
Each pool pins the experts that took the most routed pairs in it, filling `fraction` of its slots;
the remaining slots stay under the eviction policy. Pinned experts are loaded when the cache is set
up and never evicted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import OptionError
from .policies import Key


def profile_load(path: str | Path, layer_names: list[str], num_experts: int) -> np.ndarray:
    """The profile's load [L, E] (routed pairs per expert), in the order of `layer_names`."""
    from ..trace import load_trace
    from ..trace.stats import expert_load

    trace = load_trace(path)
    if list(trace.meta.layer_names) != list(layer_names) or trace.meta.num_experts != num_experts:
        raise OptionError(f"routing profile {path} was recorded from another model ({trace.meta.num_layers} MoE "
                          f"layers of {trace.meta.num_experts} experts, named like {trace.meta.layer_names[0]!r}); "
                          f"record one from this model with `moedeploy eval-ppl --trace FILE`")
    return expert_load(trace.experts, num_experts)


def hottest(load: np.ndarray, layers: list[int], slots: int, fraction: float) -> list[Key]:
    """The int(fraction * slots) hottest (layer, expert) keys among `layers` of load [L, E], hottest first,
    at most slots - 1 (one slot stays free for everything else)."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise OptionError(f"pin fraction must be a number at least 0 and below 1 (a share of each pool's slots), "
                          f"got {fraction!r}")
    count = min(int(fraction * slots), slots - 1)
    keys = [(layer, e) for layer in layers for e in range(load.shape[1])]
    keys.sort(key=lambda k: -load[k])
    return [k for k in keys[:count] if load[k] > 0]
