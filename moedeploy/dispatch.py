"""Dynamic gating (Huang et al. 2023, §4.1): sort the (token, expert) pairs by expert, and let each
expert compute exactly the tokens it got. No capacity, no padding, no one-hot dispatch tensors.

    routing [T, K] ──plan()──► Plan (order, inverse, tokens, counts, offsets, weights)
    x [T, D] ──gather(plan)──► x_sorted [P, D] ──experts──► y_sorted [P, D] ──combine(plan)──► y [T, D]

The plan is built once per layer call and passed down; both expert matrix multiplies reuse it.
`combine` puts the rows back in (token, k) order and sums each token's K rows with its gate weights
in one small matmul: the result depends only on the rows' values, not on how the pairs were sorted
or grouped, and no atomics are involved (deterministic on CUDA too).
This module knows nothing about expert weights or where they live.

Legend: T = tokens, K = experts per token, P = T*K pairs, E = experts, D = hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .routing import Routing


@dataclass(frozen=True)
class Plan:
    order: Tensor  # [P] flat pair index (t*K + k), sorted by expert; dropped pairs last
    inverse: Tensor  # [P] row of each flat pair in the sorted order: order[inverse] = arange(P)
    tokens: Tensor  # [P] token of each sorted pair
    weights: Tensor  # [T, K] gate weights, in token order
    counts: Tensor  # [E] pairs per expert (dropped pairs not counted)
    offsets: Tensor  # [E] int32 end row of each expert's group: cumsum(counts), torch._grouped_mm's `offs`
    may_drop: bool  # True when some pairs may carry the dropped sentinel (capacity routers)
    sizes: list[int] | None = None  # counts, when the host already knows them (spares the loop a sync)

    @property
    def num_experts(self) -> int:
        return self.counts.shape[0]


def plan(routing: Routing, num_experts: int, may_drop: bool = False, sizes: list[int] | None = None) -> Plan:
    """Sort pairs by expert and count them. Pairs whose id is `num_experts` (dropped) sort last.
    `sizes`: the counts as the caller already has them on the host."""
    ids = routing.ids.reshape(-1)  # [P]
    K = routing.ids.shape[-1]
    order = torch.argsort(ids, stable=True)  # stable: within an expert, tokens stay in order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    counts = count(ids, num_experts)  # [E]
    return Plan(
        order=order,
        inverse=inverse,
        tokens=order // K,
        weights=routing.weights,
        counts=counts,
        offsets=torch.cumsum(counts, dim=0, dtype=torch.int32),
        may_drop=may_drop,
        sizes=sizes,
    )


def count(ids: Tensor, num_experts: int) -> Tensor:
    """ids (any shape, values 0..E; E marks a dropped pair) -> [E] pairs per expert, dropped ones not
    counted. torch.bincount on CPU; elsewhere `count_without_sync`, since bincount reads the largest id
    on the host to size its output (a sync on CUDA)."""
    flat = ids.reshape(-1)
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    return count_without_sync(flat, num_experts)


def count_without_sync(ids: Tensor, num_experts: int) -> Tensor:
    """`count` by sorting and searching: each expert's end row in sorted order, differenced."""
    ends = torch.searchsorted(ids.reshape(-1).sort().values, torch.arange(num_experts, device=ids.device), right=True)
    return torch.diff(ends, prepend=ends.new_zeros(1))


def row_experts(p: Plan, rows: int) -> Tensor:
    """The expert of each of the plan's first `rows` sorted rows [rows] (dropped rows: the last expert; `combine`
    zeroes them): for kernels that take one expert per row."""
    r = torch.arange(rows, dtype=torch.int32, device=p.offsets.device)
    return torch.searchsorted(p.offsets, r, right=True).clamp_(max=p.num_experts - 1)


def pair_rows(x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """x [T, D], ids [T, K] -> each pair's input row [T*K, D] and expert [T*K], in (token, k) order: a decode
    step's whole dispatch, with no plan (T may be 0)."""
    T, K = ids.shape
    D = x.shape[-1]
    return x.unsqueeze(1).expand(T, K, D).reshape(T * K, D), ids.reshape(-1)


def gather(x: Tensor, p: Plan) -> Tensor:
    """x [T, D] -> x_sorted [P, D], the input row of every pair in expert order."""
    return x[p.tokens]


def unsort(y_sorted: Tensor, p: Plan) -> Tensor:
    """The experts' rows back in (token, k) order: y_sorted [P, D] -> pairs [P, D].

    Rows of dropped pairs hold no expert output (the kernels skip them) and become zeros.
    """
    if p.may_drop:
        valid = torch.arange(y_sorted.shape[0], device=y_sorted.device) < p.offsets[-1]  # device-side, no sync
        y_sorted = torch.where(valid.unsqueeze(-1), y_sorted, torch.zeros((), dtype=y_sorted.dtype,
                                                                           device=y_sorted.device))
    return y_sorted.index_select(0, p.inverse)


DECODE_TOKENS = 16  # a decode-sized step's most tokens: weighted_sum's float32 path, kernels/dense.py's rows


def weighted_sum(pairs: Tensor, weights: Tensor) -> Tensor:
    """Each token's K rows summed with its gate weights: pairs [T*K, D], weights [T, K] -> y [T, D]. On the CPU a
    decode-sized bfloat16 step (at most DECODE_TOKENS tokens) is summed as float32: exact products of the bfloat16
    values, float32 sums, one rounding, what oneDNN's bfloat16 bmm computes, at 15 us for one token against its
    33 (a prompt's pairs are not copied to float32)."""
    T, K = weights.shape
    w = weights.to(pairs.dtype).view(T, 1, K)
    if pairs.device.type == "cpu" and pairs.dtype == torch.bfloat16 and T <= DECODE_TOKENS:
        return torch.bmm(w.float(), pairs.view(T, K, pairs.shape[-1]).float()).squeeze(1).to(pairs.dtype)
    return torch.bmm(w, pairs.view(T, K, pairs.shape[-1])).squeeze(1)


def combine(y_sorted: Tensor, p: Plan) -> Tensor:
    """y_sorted [P, D] -> y [T, D]: `unsort`, then `weighted_sum`."""
    return weighted_sum(unsort(y_sorted, p), p.weights)
