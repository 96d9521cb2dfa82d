"""Next-layer lookahead: guess MoE layer l+1's experts from layer l's input, and prefetch them.

The residual stream changes little from one layer to the next, so layer l+1's router applied to the
hidden states entering layer l's MoE block ranks layer l+1's experts well before they are needed
(the idea behind Pre-gated MoE and MoE-Infinity's prefetching). After layer l's experts have run,
its `MoELayer` calls `Lookahead(x)`: the experts the next router would pick, most-wanted first, go
to the next layer's pool as a prefetch. Outputs never change: a prefetch only decides what is
resident; a wrong guess costs a copy (`stats.prefetched - stats.prefetch_hits`) and maybe a slot.
"""

from __future__ import annotations

import torch
from torch import Tensor


class Lookahead:
    def __init__(self, target):
        self.target = target  # the next MoELayer, with a pool

    def __call__(self, x: Tensor) -> None:  # x [T, D]: the current MoE layer's input
        E = self.target.experts.num_experts
        ids = self.target.router(x).ids  # [T, K]; E marks a pair a capacity router would drop
        counts = torch.bincount(ids.reshape(-1), minlength=E + 1)[:E].tolist()  # one host sync
        wanted = sorted((e for e in range(E) if counts[e]), key=lambda e: -counts[e])  # most-wanted first, ties by id
        self.target.pool.prefetch([(self.target.pool_index, e) for e in wanted])


PREFETCHERS = ("lookahead",)


def attach_lookahead(layers: list) -> None:
    """Each MoE layer with a successor in model order prefetches for it (the last one for none)."""
    for layer, successor in zip(layers, layers[1:]):
        if layer.experts.hidden_size == successor.experts.hidden_size:
            layer.lookahead = Lookahead(successor)
