"""Trace-driven simulation of expert caching: replay a routing trace through the runtime's own
`SlotPool` and policies, with a cost model for what the misses would cost on a device."""

from .prefetch import PrefetchConfig, PrefetchResult, replay_prefetch
from .replay import CostModel, SimResult, replay

__all__ = ["CostModel", "SimResult", "replay", "PrefetchConfig", "PrefetchResult", "replay_prefetch"]
