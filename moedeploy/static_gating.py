"""Static gating, the baseline dynamic gating replaces (GShard / Switch / fairseq top-2 gating).

Every expert gets a fixed capacity C per group of S tokens. Tokens are placed in their experts'
buffers in priority order (all first choices of the group, then all second choices, ...); pairs that
find their expert full are dropped. Dispatch and combine are dense one-hot tensors [G, S, E, C] and
the experts run on padded [E, G*C, D] batches: this is the real, wasteful algorithm, kept so that
comparisons with dynamic gating are honest.

Capacity conventions:
    factor:   C = ceil(factor * K * S / E)   (Switch Transformers, GShard "capacity factor")
    fraction: C = ceil(fraction * S)         (fairseq's moe_eval_capacity_token_fraction)

Legend: G = groups, S = tokens per group, E = experts, C = capacity, K = experts per token, D = hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import OptionError
from .experts import ExpertBank
from .routing import Routing


@dataclass(frozen=True)
class Capacity:
    factor: float | None = None
    fraction: float | None = None

    def __post_init__(self):
        if (self.factor is None) == (self.fraction is None):
            raise OptionError("a capacity needs exactly one of factor= or fraction=")
        value = self.factor if self.factor is not None else self.fraction
        if not value > 0:
            raise OptionError(f"capacity must be positive, got {value}")

    def slots(self, tokens_per_group: int, top_k: int, num_experts: int) -> int:
        if self.factor is not None:
            return max(1, math.ceil(self.factor * top_k * tokens_per_group / num_experts))
        return max(1, math.ceil(self.fraction * tokens_per_group))


@dataclass(frozen=True)
class StaticResult:
    y: Tensor  # [G*S, D]
    dropped: Tensor  # [] number of routed pairs dropped for lack of capacity (sentinel pairs not counted)


def dispatch_tensors(routing: Routing, groups: int, num_experts: int, capacity: int) -> tuple[Tensor, Tensor]:
    """One-hot dispatch and weighted combine tensors, both [G, S, E, C] in the weights' dtype."""
    T, K = routing.ids.shape
    ids = routing.ids.view(groups, T // groups, K)  # [G, S, K]
    weights = routing.weights.view(groups, T // groups, K)
    masks = F.one_hot(ids, num_experts + 1)[..., :num_experts]  # [G, S, K, E]; the dropped sentinel -> zeros
    filled = torch.zeros(groups, 1, num_experts, dtype=torch.long, device=ids.device)  # [G, 1, E] slots used
    dispatch = combine = None
    for k in range(K):  # priority: all k-th choices of a group before any (k+1)-th choice
        mask = masks[:, :, k]  # [G, S, E]
        location = torch.cumsum(mask, dim=1) - 1 + filled  # [G, S, E] slot each pair would take
        filled = filled + mask.sum(dim=1, keepdim=True)
        mask = mask * (location < capacity)
        slot = F.one_hot((location * mask).sum(-1), capacity).to(weights.dtype)  # [G, S, C]
        d = mask.to(weights.dtype).unsqueeze(-1) * slot.unsqueeze(-2)  # [G, S, E, C]
        c = d * weights[:, :, k, None, None]
        dispatch = d if dispatch is None else dispatch + d
        combine = c if combine is None else combine + c
    return dispatch, combine


def static_moe(x: Tensor, routing: Routing, bank: ExpertBank, groups: int, capacity: int) -> StaticResult:
    """x [T, D] -> y [T, D] through padded per-expert batches."""
    T, D = x.shape
    E = bank.num_experts
    dispatch, combine = dispatch_tensors(routing, groups, E, capacity)
    xg = x.view(groups, T // groups, D)
    expert_in = torch.einsum("gsec,gsd->egcd", dispatch.to(x.dtype), xg).reshape(E, groups * capacity, D)
    h = torch.bmm(expert_in, bank.w_in.transpose(1, 2))  # [E, G*C, N]
    if bank.b_in is not None:
        h = h + bank.b_in.unsqueeze(1)
    out = torch.bmm(bank.activation(h), bank.w_out.transpose(1, 2))  # [E, G*C, D]
    if bank.b_out is not None:
        out = out + bank.b_out.unsqueeze(1)
    out = out.view(E, groups, capacity, D)
    y = torch.einsum("gsec,egcd->gsd", combine.to(x.dtype), out).reshape(T, D)
    routed = (routing.ids < E).sum()
    return StaticResult(y=y, dropped=routed - dispatch.sum().to(routed.dtype))
