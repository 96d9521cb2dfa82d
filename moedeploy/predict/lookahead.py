"""Next-layer lookahead: guess MoE layer l+1's experts from layer l's input, and prefetch them.

The residual stream changes little from one layer to the next, so layer l+1's router applied to the
hidden states entering layer l's MoE block ranks layer l+1's experts well before they are needed
(the idea behind Pre-gated MoE and MoE-Infinity's prefetching). Layer l's `MoELayer` asks
`Lookahead.counts(x)` for the experts the next router would pick along with its own counts (one host
sync for both), and once its own experts are queued, `prefetch` sends them, most-wanted first, to
the next layer's pool. Outputs never change: a prefetch only decides what is resident; a wrong
guess costs a copy (`stats.prefetched - stats.prefetch_hits`) and maybe a slot.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from ..dispatch import count


class Lookahead:
    def __init__(self, target):
        self.target = target  # the next MoELayer, with a pool

    def counts(self, x: Tensor) -> Tensor:
        """x [T, D], the current MoE layer's input -> [E] pairs the next router would send to each expert.
        On the device: the caller brings them to the host in the same sync as its own counts."""
        E = self.target.experts.num_experts
        return count(self.target.router(x).ids, E)  # ids [T, K]; E marks a pair a capacity router would drop

    def prefetch(self, counts: list[int]) -> None:
        """Prefetch the next layer's predicted experts, most-wanted first (ties by id). Call it once the
        current layer's experts are queued: their slots may then be reused."""
        wanted = sorted((e for e, n in enumerate(counts) if n), key=lambda e: -counts[e])
        self.target.pool.prefetch([(self.target.pool_index, e) for e in wanted])


def attach_lookahead(layers: list) -> None:
    """Each MoE layer with a successor in model order prefetches for it (the last one for none)."""
    for layer, successor in itertools.pairwise(layers):
        if layer.experts.hidden_size == successor.experts.hidden_size:
            layer.lookahead = Lookahead(successor)


class LookaheadPredictor:
    """The lookahead as a `Predictor` for evaluation (base.py): layer l's router applied to the hidden
    state one MoE layer earlier, `known.hidden[:, l]` (MoE layer l-1's input; for layer 0, the token
    embeddings: what the first router would pick if attention and the norm changed nothing).
    It needs the model's hidden states, so it scores text run through the model, not traces."""

    def __init__(self, routers: list):
        self.routers = routers  # each MoE layer's Router, in model order
        self.num_layers, self.num_experts = len(routers), routers[0].num_experts

    def scores(self, known):
        from .base import PredictorError

        if known.hidden is None:
            raise PredictorError("the lookahead scores hidden states; it cannot score a routing trace")
        h = known.hidden  # [T, L, D]
        return torch.stack([r.logits(h[:, l].to(r.weight.device, r.weight.dtype)).float().cpu() for l, r in enumerate(self.routers)], 1)
