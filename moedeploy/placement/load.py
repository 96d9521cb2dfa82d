"""Load statistics for placement: per-batch expert counts cut from a trace's routing.

    experts [N, L, K] ──batch_counts(B)──► counts [T, L, E]   (token, expert) pairs per expert per batch
    counts  [T, L, E] ──.total────────────► load [L, E]        what greedy / replicate plan on
                      ──.series───────────► [T, L, E] float    what anti-correlation correlates

Batches are B consecutive tokens in processing order; a last, shorter batch is dropped (its max/mean is
not comparable with the full ones), so T = N // B. This module only counts: it knows nothing of devices
(policies.py) or of how a placement is scored (evaluate.py).

Legend: N = tokens, L = MoE layers, K = experts per token, E = experts per layer, T = batches,
B = tokens per batch. An expert id equal to E marks a dropped pair and is not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PlacementError

PLAN_BATCH = 256  # tokens per batch of the planning series (anti-correlation); chosen on intent/translation


def batch_counts(experts: np.ndarray, num_experts: int, batch: int) -> np.ndarray:
    """experts [N, L, K] -> counts [T, L, E] int64, T = N // batch batches of `batch` consecutive tokens."""
    if batch < 1:
        raise PlacementError(f"a batch must hold at least 1 token, got {batch}")
    N, L, K = experts.shape
    T = N // batch
    if T == 0:
        return np.zeros((0, L, num_experts), dtype=np.int64)
    E1 = num_experts + 1  # one more bin for dropped pairs
    ids = experts[:T * batch].reshape(T, batch, L, K).astype(np.int64)
    ids = ids + (np.arange(T)[:, None, None, None] * L + np.arange(L)[None, None, :, None]) * E1
    return np.bincount(ids.ravel(), minlength=T * L * E1).reshape(T, L, E1)[:, :, :num_experts]


@dataclass(frozen=True)
class LoadStats:
    """What a placement is planned from: per-batch counts of the planning tokens."""

    counts: np.ndarray  # [T, L, E] int64
    batch: int  # B tokens per batch
    tokens: int  # N tokens counted (T * B)

    @classmethod
    def of(cls, experts: np.ndarray, num_experts: int, batch: int = PLAN_BATCH) -> "LoadStats":
        """From experts [N, L, K]; when N < batch, the whole trace is one batch."""
        b = min(batch, experts.shape[0]) if experts.shape[0] else batch
        counts = batch_counts(experts, num_experts, b)
        if counts.shape[0] == 0:
            raise PlacementError("no tokens to plan on: give a trace with routing, or a larger --plan-on fraction")
        return cls(counts=counts, batch=b, tokens=counts.shape[0] * b)

    @property
    def total(self) -> np.ndarray:
        """[L, E] float64 pairs per expert over all batches."""
        return self.counts.sum(0).astype(np.float64)

    @property
    def series(self) -> np.ndarray:
        """[T, L, E] float64 per-batch loads."""
        return self.counts.astype(np.float64)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.counts.shape
