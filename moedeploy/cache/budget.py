"""A user's expert-memory budget, as bytes or a fraction of all expert bytes, turned into slots."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import OptionError

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
SCOPES = ("layer", "global")


def parse_budget(value, total_expert_bytes: int) -> int:
    """'2GiB', '512MB', 3_000_000 (bytes) or a fraction 0 < f <= 1 of all expert bytes -> bytes."""
    if isinstance(value, float) and 0 < value <= 1:
        return int(value * total_expert_bytes)
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
        if m and m.group(2).lower() in UNITS:
            number = float(m.group(1))
            if m.group(2) == "" and 0 < number <= 1 and "." in m.group(1):
                return int(number * total_expert_bytes)
            if number > 0:
                return int(number * UNITS[m.group(2).lower()])
    raise OptionError(
        f"expert memory budget {value!r} is not valid: give a positive size such as '2GiB' or '512MB', "
        "a number of bytes, or a fraction of all expert weights between 0 and 1 such as 0.25"
    )


def device_bytes(device) -> int:
    """Memory of the device the experts would live on."""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class CacheConfig:
    budget_bytes: int  # for all resident experts together
    policy: str = "lru"
    scope: str = "layer"  # "layer": an equal share of slots per MoE layer; "global": one pool for all layers
    pin_profile: str | None = None  # a routing trace of this model: pin its hottest experts (pinning.py)
    pin_fraction: float = 0.5  # share of each pool's slots given to pinned experts
    prefetch: str | None = None  # "lookahead": each MoE layer prefetches the next one's experts

    def __post_init__(self):
        if self.scope not in SCOPES:
            raise OptionError(f"unknown cache scope {self.scope!r}; choose one of: {', '.join(SCOPES)}")
