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


def _future(experts: np.ndarray) -> dict[tuple[int, int], list[int]]:
    """(layer, expert) -> the 1-based token steps at which it is needed. experts [N, L, K]."""
    N, L, K = experts.shape
    future = {}
    for layer in range(L):
        for e in np.unique(experts[:, layer]):
            steps = np.nonzero((experts[:, layer] == e).any(axis=1))[0] + 1
            future[(layer, int(e))] = steps.tolist()
    return future


def replay(trace: Trace, policy: str, capacity: int, cost: CostModel = CostModel(), progress: bool = False) -> SimResult:
    E = trace.meta.num_experts
    if not 1 <= capacity <= E:
        raise OptionError(f"capacity must be between 1 and {E} experts per layer, got {capacity}")
    experts = trace.experts.astype(np.int64)  # [N, L, K]
    N, L, K = experts.shape
    future = _future(experts) if policy == "belady" else None
    pools = [SlotPool(capacity, Belady(future) if future else make_policy(policy), None,
                      expert_bytes=cost.expert_bytes) for _ in range(L)]
    needed = [[list(dict.fromkeys(row.tolist())) for row in experts[:, layer]] for layer in range(L)]  # unique, ordered
    for t in tqdm(range(N), desc=f"simulate {policy} @ {capacity}", unit="tok", disable=None if progress else True, leave=False):
        for layer, pool in enumerate(pools):
            pool.acquire([(layer, e) for e in needed[layer][t]])
    hits = sum(p.stats.hits for p in pools)
    misses = sum(p.stats.misses for p in pools)
    return SimResult(policy=policy, capacity=capacity, tokens=N, hits=hits, misses=misses,
                     miss_rate=misses / max(hits + misses, 1), bytes_moved=misses * cost.expert_bytes,
                     seconds_per_token=cost.seconds(hits, misses) / max(N, 1),
                     all_resident_seconds_per_token=cost.seconds(hits + misses, 0) / max(N, 1))
