"""How well scores predict routing: recall@k and SiDA's hit rate, per MoE layer, summed over chunks.

    recall@k   = |predicted top-k ∩ the router's top-K| / K       (K = the model's top-k)
    hit rate@k = [the router's top-1 ∈ predicted top-k]          (SiDA, Du et al. 2024)

both averaged over tokens, per layer, then over layers (`mean`: every layer weighs the same).
`Tally` accumulates them over the chunks of a text or the sequences of a trace, so nothing of size
T x L x E outlives its chunk. Pairs a capacity router dropped (id >= E) never count as found.

Legend: T tokens, L MoE layers, E experts, K routed experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor


def found(scores: Tensor, truth: Tensor, k: int) -> Tensor:
    """scores [T, L, E], truth [T, L, K] ids -> [T, L] how many of each token's K are in the top-k scores."""
    top = torch.topk(scores.float(), min(k, scores.shape[-1]), dim=-1).indices  # [T, L, k]
    return (top[..., :, None] == truth[..., None, :]).any(-2).sum(-1)  # [T, L]: each true id at most once


@dataclass
class Tally:
    """Sums per layer over tokens: found true experts and top-1 hits, for each k."""

    ks: tuple[int, ...]
    num_layers: int
    top_k: int
    tokens: int = 0
    found: dict[int, np.ndarray] = field(default_factory=dict)  # k -> [L] sum over tokens of |top-k ∩ truth|
    hits: dict[int, np.ndarray] = field(default_factory=dict)  # k -> [L] tokens whose top-1 is in the top-k

    def add(self, scores: Tensor, truth: Tensor, top1: Tensor) -> None:
        """scores [T, L, E]; truth [T, L, K] routed ids; top1 [T, L] the highest-weighted of them."""
        truth = torch.as_tensor(truth, dtype=torch.long)
        top1 = torch.as_tensor(top1, dtype=torch.long)
        for k in self.ks:
            n = found(scores, truth, k).sum(0).numpy()  # [L]
            h = found(scores, top1[..., None], k).sum(0).numpy()
            self.found[k] = self.found.get(k, 0) + n
            self.hits[k] = self.hits.get(k, 0) + h
        self.tokens += len(truth)

    def recall(self, k: int) -> np.ndarray:
        """[L] recall@k per layer."""
        return self.found[k] / max(self.tokens * self.top_k, 1)

    def hit_rate(self, k: int) -> np.ndarray:
        """[L] hit rate@k per layer."""
        return self.hits[k] / max(self.tokens, 1)

    def summary(self) -> dict:
        """{"tokens", "mean_recall": {k: ..}, "mean_hit_rate": {k: ..}, "layers": [{"layer", "recall", "hit_rate"}]}
        with k as a string (JSON keys)."""
        return {
            "tokens": self.tokens,
            "mean_recall": {str(k): round(float(self.recall(k).mean()), 4) for k in self.ks},
            "mean_hit_rate": {str(k): round(float(self.hit_rate(k).mean()), 4) for k in self.ks},
            "layers": [{"layer": l, "recall": {str(k): round(float(self.recall(k)[l]), 4) for k in self.ks},
                        "hit_rate": {str(k): round(float(self.hit_rate(k)[l]), 4) for k in self.ks}}
                       for l in range(self.num_layers)],
        }
