"""One MoE layer's expert-parallel path (Huang et al. 2023, dynamic gating across ranks):

    routing (every token, every rank) ──plan.exchange──► sizes, send order, receive slots   (host, no collective)
    x [T, D] ─► rows of this rank's pairs, by slot [Ps, D] ══all-to-all══► rows for this rank's slots [Pr, D]
             ─► this rank's experts (the layer's own resident or buffered path, one slot per row) [Pr, D]
             ══all-to-all back══► [Ps, D] ─► index by pair, weighted sum over k ─► y for this rank's tokens
             ══all-gather══► y [T, D] on every rank (the rest of the model is replicated)

Each token's K rows are summed in (token, k) order, as a single process does, so a non-replicated
expert gives the same bits; rows split over replicas may round differently (float32: ~1e-7).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..dispatch import weighted_sum
from ..routing import Routing
from .group import Group
from .plan import exchange, shard

# The layer's own expert path: x [R, D] and a routing to its local slots -> (y [R, D], counts per slot)
Local = Callable[[Tensor, Routing], tuple[Tensor, Tensor]]


class ExpertParallel:
    def __init__(self, group: Group, slots: np.ndarray, num_experts: int, source=None):
        self.group = group
        self.slots = slots  # [S] this layer's physical -> logical map
        self.num_experts = num_experts
        self.source = source  # store.DiskStore of every expert of the layer: where rebalancing reads new ones
        self.slot_tokens = np.zeros(slots.shape[0], dtype=np.int64)  # pairs per slot, summed over steps

    def __call__(self, x: Tensor, routing: Routing, local: Local) -> Tensor:
        g = self.group
        T, K = routing.ids.shape
        ex = exchange(routing.ids.cpu().numpy(), self.slots, g.world, g.rank, self.num_experts)  # one host sync
        self.slot_tokens += ex.slot_tokens
        send_pairs = torch.from_numpy(ex.send_pairs).to(x.device)  # [Ps]
        recv = g.all_to_all(x[send_pairs // K], ex.send_splits, ex.recv_splits)  # [Pr, D]
        one = torch.ones(recv.shape[0], 1, dtype=routing.weights.dtype, device=x.device)
        out, _ = local(recv, Routing(torch.from_numpy(ex.recv_slots).to(x.device).view(-1, 1), one))  # [Pr, D]
        back = g.all_to_all(out.to(x.dtype), ex.recv_splits, ex.send_splits)  # [Ps, D], send order
        pairs = x.new_zeros(((ex.hi - ex.lo) * K, x.shape[-1]))  # [Tr*K, D]; dropped pairs stay zero
        pairs[send_pairs - ex.lo * K] = back
        y = weighted_sum(pairs, routing.weights[ex.lo:ex.hi])  # [Tr, D]
        return g.all_gather_rows(y, [shard(T, g.world, r)[1] - shard(T, g.world, r)[0] for r in range(g.world)])
