"""Replay a routing trace with prefetching: before each layer is needed, load the experts a predictor
scores highest (moedeploy.predict), through the runtime's own `SlotPool.prefetch`.

Order of events at layer l of token t (global position g = t*L + l, decode order):
  1. the gate picks layer l's experts; `acquire` them: a resident one is a hit (a useful prefetch if
     it was prefetched and not used since), a missing one a demand miss (a stall);
  2. the prefetch for position g + d (layer (l+d) mod L, of this token or the next) is issued, scored
     from what is known now (predict/history.py): of the `width` best experts scoring at least
     `threshold`, those not resident are loaded, best first, each only while its value beats the value
     of the resident it evicts (value = score + keep * use EMA; no swap of a hot expert for a long shot).

Eviction (`evict`): 'lru', or 'predicted': evict the resident expert with the lowest predicted value,
least recently used first among equals; an online stand-in for Belady. Prefetch victims: the value
above (the upcoming access's score plus long-run use); demand victims: the use EMA at that layer
(decay `evict_decay`, about 200 tokens: on intent/translation a long memory beat recency, 1.41x
Belady's misses at 16 of 64 vs LRU's 1.58-1.63x).

Prefetching never changes which experts are demanded: only hits, misses and bytes.
Time is modelled by timeline.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..cache.policies import LRU, make_policy
from ..cache.pool import SlotPool
from ..errors import OptionError
from ..predict.history import HistoryPredictor, ScoreConfig, onehot, scores
from ..trace.schema import Trace
from .replay import CostModel, check_capacity, needed_experts, replay
from .timeline import Timeline

EVICTIONS = ("lru", "predicted")
# The threshold for a trained trace predictor (predict/routenet.py; scores K x softmax, capped at 1: sim/scores.py),
# sharper than the table's: tuned with one trained on intent only, replaying translation at 16 of 64 (width 6,
# predicted eviction), 0.7 kept stalls under Belady's misses with the fewest bytes (0.93x, bytes 1.46x, 38.3 ms/token;
# 0.4: 0.64x, 1.65x, 42.9 ms/token; 0.8: 1.03x stalls). `simulate` uses it unless --prefetch-threshold is given.
ROUTENET_THRESHOLD = 0.7


@dataclass(frozen=True)
class PrefetchConfig:
    width: int = 6  # at most this many experts prefetched per layer
    threshold: float = 0.4  # and only those scoring at least this (chosen on intent/translation)
    evict: str = "predicted"  # lru or predicted
    evict_decay: float = 0.995  # use EMA decay per token for victims (evict='predicted'): long-run frequency
    keep: float = 0.5  # lambda: prefetch victims and the swap test use value = score + lambda * use EMA
    swap_only_if_better: bool = True  # prefetch j only when its value beats the victim's
    score: ScoreConfig = ScoreConfig()


class Predicted(LRU):
    """Evict the lowest score (set by the replay before each pool call), LRU among equals."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.score = np.zeros(num_experts)  # [E]

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self.score[k[1]], self.last_use[k]))


@dataclass(frozen=True)
class PrefetchResult:
    policy: str  # eviction
    capacity: int
    tokens: int
    hits: int
    misses: int  # demand misses
    miss_rate: float
    prefetched: int
    prefetch_hits: int  # useful prefetches
    bytes_moved: int  # demand misses and prefetches
    belady_misses: int  # Belady without prefetch, same capacity
    stalls: int  # layer waits for a copy: demand misses, and useful prefetches not landed when their layer ran
    stall_ratio: float  # stalls / belady_misses
    stall_time_ratio: float  # time layers waited for copies / Belady's (each of its misses waits one whole copy)
    bytes_ratio: float  # bytes_moved / Belady's
    seconds_per_token: float  # timeline.py
    late_prefetch_hits: int  # useful prefetches the layer still waited for (the copy was not done)
    all_resident_seconds_per_token: float
    width: int
    threshold: float
    lookahead: int

    def as_dict(self) -> dict:
        return asdict(self)


def recency(experts: np.ndarray, num_experts: int, decay: float) -> np.ndarray:
    """[N, L, E]: EMA over tokens before t of [j used at layer l]. experts [N, L, K]."""
    X = onehot(experts, num_experts)
    out = np.empty_like(X)
    r = np.zeros(X.shape[1:], np.float32)
    for t in range(len(X)):
        out[t] = r
        r = decay * r + (1 - decay) * X[t]
    return out


def plan(score: np.ndarray, value: np.ndarray, resident: set[int], capacity: int, cfg: PrefetchConfig) -> list[int]:
    """The experts to prefetch, best first: of the top `width` scores that reach the threshold, those not
    resident, each only while its value beats the value of the resident it would evict (the lowest).
    score, value [E]."""
    best = [int(e) for e in np.argsort(-score, kind="stable")[: min(cfg.width, capacity)] if score[e] >= cfg.threshold]
    load = [e for e in best if e not in resident]
    if not cfg.swap_only_if_better:
        return best
    free = capacity - len(resident)
    victims = sorted((e for e in resident if e not in best), key=lambda e: value[e])
    keep = [e for e in best if e in resident]
    for i, e in enumerate(load):
        if i >= free and (i - free >= len(victims) or value[e] <= value[victims[i - free]]):
            break
        keep.append(e)
    return keep


def replay_prefetch(trace: Trace, capacity: int, predictor: HistoryPredictor | None, cfg: PrefetchConfig = PrefetchConfig(),
                    cost: CostModel = CostModel(), belady_misses: int | None = None,
                    S: np.ndarray | None = None) -> PrefetchResult:
    """S [N, L, E]: the prefetch scores from another source (sim/scores.py); else the history table's."""
    E, K = trace.meta.num_experts, trace.meta.top_k
    experts = trace.experts.astype(np.int64)  # [N, L, K]
    N, L, _ = experts.shape
    d = cfg.score.lookahead
    check_capacity(capacity, trace)
    if d < 1:
        raise OptionError(f"lookahead must be 1 layer or more, got {d}")
    if cfg.evict not in EVICTIONS:
        raise OptionError(f"unknown eviction {cfg.evict!r} with prefetching; choose one of: {', '.join(EVICTIONS)}")
    if cfg.width < 0:
        raise OptionError(f"prefetch width must be 0 or more experts, got {cfg.width}")
    if predictor is not None:
        predictor.check(L, E, K, d)
    if S is None:
        S = scores(predictor, experts, E, cfg.score)  # [N, L, E]
    R = recency(experts, E, cfg.evict_decay) if cfg.evict == "predicted" else None  # [N, L, E]
    policies = [Predicted(E) if cfg.evict == "predicted" else make_policy("lru") for _ in range(L)]
    pools = [SlotPool(capacity, p, None, expert_bytes=cost.expert_bytes) for p in policies]
    needed = needed_experts(experts, E)
    clock = Timeline(cost)
    for g in range(N * L):
        t, l = divmod(g, L)
        keys = [(l, e) for e in needed[l][t]]
        if R is not None:
            policies[l].score = R[t, l]
        clock.demand(pools[l], keys)
        t2, m = divmod(g + d, L)
        if t2 < N and cfg.width:
            value = S[t2, m] + cfg.keep * (R[t2, m] if R is not None else 0)
            if R is not None:
                policies[m].score = value
            resident = {e for _, e in pools[m].slot_of}
            clock.prefetch(pools[m], [(m, e) for e in plan(S[t2, m], value, resident, capacity, cfg)])
    if belady_misses is None:
        belady_misses = replay(trace, "belady", capacity, cost).misses
    return _result(pools, clock, cfg, capacity, N, belady_misses, cost)


def _result(pools: list[SlotPool], clock: Timeline, cfg: PrefetchConfig, capacity: int, N: int, belady_misses: int,
            cost: CostModel) -> PrefetchResult:
    stats = [p.stats for p in pools]
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    moved = sum(s.bytes_moved for s in stats)
    accesses = hits + misses
    return PrefetchResult(
        policy=cfg.evict, capacity=capacity, tokens=N, hits=hits, misses=misses, miss_rate=misses / max(accesses, 1),
        prefetched=sum(s.prefetched for s in stats), prefetch_hits=sum(s.prefetch_hits for s in stats),
        bytes_moved=moved, belady_misses=belady_misses, stalls=misses + clock.late,
        stall_ratio=(misses + clock.late) / max(belady_misses, 1),
        stall_time_ratio=clock.waited / max(belady_misses * clock.copy_s, 1e-30),
        bytes_ratio=moved / max(belady_misses * cost.expert_bytes, 1), seconds_per_token=clock.now / max(N, 1),
        late_prefetch_hits=clock.late, all_resident_seconds_per_token=cost.seconds(accesses, 0) / max(N, 1),
        width=cfg.width, threshold=cfg.threshold, lookahead=cfg.score.lookahead)
