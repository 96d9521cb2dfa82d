"""Replay a per-token routing trace, in decode order (one token at a time), through per-layer slot
pools: the same `SlotPool` and policies the runtime uses, in bookkeeping mode (no weights move).

Cost model, per token, for bandwidth-bound decoding without prefetch: every expert a token uses is
read once from device memory, and every miss must first cross the host link, on the critical path:

    seconds = misses * expert_bytes / link_bandwidth + (hits + misses) * expert_bytes / memory_bandwidth

This module does not predict or prefetch (prefetch.py does, timed by timeline.py), and knows nothing of
files: see trace/io.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from tqdm.auto import tqdm

from ..cache.policies import Belady, make_policy
from ..cache.pool import SlotPool
from ..errors import OptionError
from ..trace.schema import Trace

DEEPSEEK_V2_LITE_EXPERT = 3 * 2048 * 1408 * 2  # bytes: gate, up, down of hidden 2048 x 1408, bf16


@dataclass(frozen=True)
class CostModel:
    expert_bytes: int = DEEPSEEK_V2_LITE_EXPERT
    link_gbps: float = 25.0  # host -> device, GB/s (PCIe 4.0 x16 in practice)
    memory_gbps: float = 2000.0  # device memory, GB/s (HBM)

    def __post_init__(self):
        for name in ("expert_bytes", "link_gbps", "memory_gbps"):
            if not getattr(self, name) > 0:
                raise OptionError(f"the cost model's {name} (--{name.replace('_', '-')}) must be above 0, got "
                                  f"{getattr(self, name)}")

    def seconds(self, hits: int, misses: int) -> float:
        return misses * self.expert_bytes / (self.link_gbps * 1e9) + \
            (hits + misses) * self.expert_bytes / (self.memory_gbps * 1e9)


@dataclass(frozen=True)
class SimResult:
    policy: str
    capacity: int  # resident experts per layer
    tokens: int
    hits: int
    misses: int
    miss_rate: float
    bytes_moved: int
    seconds_per_token: float  # from the cost model
    all_resident_seconds_per_token: float  # the same model with every expert resident (no misses)

    def as_dict(self) -> dict:
        return asdict(self)


def needed_experts(experts: np.ndarray, num_experts: int) -> list[list[list[int]]]:
    """Per layer, per token: the distinct experts it uses, in routing order. experts [N, L, K]; an id of
    num_experts or more is a dropped pair (capacity gating), which needs no expert."""
    return [[list(dict.fromkeys(e for e in row.tolist() if e < num_experts)) for row in experts[:, layer]]
            for layer in range(experts.shape[1])]


def check_capacity(capacity: int, trace: Trace) -> None:
    """At least the top-k (a token's experts must fit at once), at most every expert of a layer."""
    E, K = trace.meta.num_experts, trace.meta.top_k
    if not min(K, E) <= capacity <= E:
        raise OptionError(f"capacity must be between {min(K, E)} (the top-k: a token's experts at once) and {E} "
                          f"experts per layer, got {capacity}")


def _future(needs: list[list[list[int]]]) -> dict[tuple[int, int], list[int]]:
    """(layer, expert) -> the 1-based token steps at which it is needed. needs: `needed_experts(...)`."""
    future: dict[tuple[int, int], list[int]] = {}
    for layer, tokens in enumerate(needs):
        for t, experts in enumerate(tokens):
            for e in experts:
                future.setdefault((layer, e), []).append(t + 1)
    return future


def replay(trace: Trace, policy: str, capacity: int, cost: CostModel = CostModel(), progress: bool = False) -> SimResult:
    check_capacity(capacity, trace)
    experts = trace.experts.astype(np.int64)  # [N, L, K]
    N, L, _ = experts.shape
    needed = needed_experts(experts, trace.meta.num_experts)  # unique, ordered, drops left out
    future = _future(needed) if policy == "belady" else None
    pools = [SlotPool(capacity, Belady(future) if future is not None else make_policy(policy), None,
                      expert_bytes=cost.expert_bytes) for _ in range(L)]
    for t in tqdm(range(N), desc=f"simulate {policy} @ {capacity}", unit="tok", disable=None if progress else True, leave=False):
        for layer, pool in enumerate(pools):
            pool.acquire([(layer, e) for e in needed[layer][t]])
    hits = sum(p.stats.hits for p in pools)
    misses = sum(p.stats.misses for p in pools)
    return SimResult(policy=policy, capacity=capacity, tokens=N, hits=hits, misses=misses,
                     miss_rate=misses / max(hits + misses, 1), bytes_moved=misses * cost.expert_bytes,
                     seconds_per_token=cost.seconds(hits, misses) / max(N, 1),
                     all_resident_seconds_per_token=cost.seconds(hits + misses, 0) / max(N, 1))
