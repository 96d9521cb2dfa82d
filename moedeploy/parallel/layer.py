"""One MoE layer's expert-parallel path, by one of two exchanges.

"all_to_all", Huang et al. 2023's dynamic gating across ranks:

    routing (every token, every rank) ──plan.exchange──► sizes, send order, receive slots   (host, no collective)
    x [T, D] ─► rows of this rank's pairs, by slot [Ps, D] ══all-to-all══► rows for this rank's slots [Pr, D]
             ─► this rank's experts (the layer's own resident or buffered path, one slot per row) [Pr, D]
             ══all-to-all back══► [Ps, D] ─► index by pair, weighted sum over k ─► y for this rank's tokens
             ══all-gather══► y [T, D] on every rank (the rest of the model is replicated)

"all_gather" (the default): every rank already holds every token (the rest of the model is replicated),
so it computes its slots' pairs over all tokens and one all-gather brings every pair's row to every rank:

    x [T, D] ─► rows of the pairs of this rank's slots [Pr, D] ─► this rank's experts ─► [Pr, D]
             ══all-gather══► every pair's row [V, D] ─► index by pair, weighted sum over k ─► y [T, D]

Either way each token's K rows are summed in (token, k) order, as a single process does, and a slot
computes its rows in global token order, so a non-replicated expert gives the same bits; rows split over
replicas may round differently (float32: ~1e-7).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ..dispatch import weighted_sum
from ..routing import Routing
from .group import Group
from .plan import exchange, gathered, shard

# The layer's own expert path: x [R, D] and a routing to its local slots -> (y [R, D], counts per slot)
Local = Callable[[Tensor, Routing], tuple[Tensor, Tensor]]
EXCHANGES = ("all_gather", "all_to_all")


class ExpertParallel:
    def __init__(self, group: Group, slots: np.ndarray, num_experts: int, exchange: str = "all_gather"):
        self.group = group
        self.exchange = exchange
        self.slots = slots  # [S] this layer's physical -> logical map
        self.num_experts = num_experts
        self.slot_tokens = np.zeros(slots.shape[0], dtype=np.int64)  # pairs per slot, summed over steps

    def __call__(self, x: Tensor, routing: Routing, local: Local) -> Tensor:
        if self.exchange == "all_gather":
            return self._all_gather(x, routing, local)
        return self._all_to_all(x, routing, local)

    def _all_gather(self, x: Tensor, routing: Routing, local: Local) -> Tensor:
        g = self.group
        T, K = routing.ids.shape
        plan = gathered(routing.ids.cpu().numpy(), self.slots, g.world, self.num_experts)  # one host sync
        self.slot_tokens += plan.slot_tokens
        start = sum(plan.sizes[:g.rank])
        mine = slice(start, start + plan.sizes[g.rank])
        pairs = torch.from_numpy(plan.pairs).to(x.device)  # [V]
        one = torch.ones(plan.sizes[g.rank], 1, dtype=routing.weights.dtype, device=x.device)
        slots = torch.from_numpy(plan.slots[mine]).to(x.device).view(-1, 1)
        out, _ = local(x[pairs[mine] // K], Routing(slots, one))  # [Pr, D]
        g.note_rows(kept=plan.sizes[g.rank], sent=plan.sizes[g.rank] * (g.world - 1))
        rows = g.all_gather_rows(out.to(x.dtype), plan.sizes)  # [V, D], every rank's in rank order
        every = x.new_zeros((T * K, x.shape[-1]))  # [T*K, D]; dropped pairs stay zero
        every[pairs] = rows
        return weighted_sum(every, routing.weights)

    def _all_to_all(self, x: Tensor, routing: Routing, local: Local) -> Tensor:
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
