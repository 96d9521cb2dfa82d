"""Expert FFN over a quantized bank: per expert that got rows, its two projections around the activation —
torch's packed int8 / int4 CPU kernels (quant/bank.py), or for a pre-quantized MXFP4 / FP8 bank
(quant/prequantized.py) the expert's weight dequantized, then a matmul (the bank's `kernel` says which)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import Plan


def quantized_experts(x_sorted: Tensor, p: Plan, bank) -> Tensor:
    y = torch.empty(x_sorted.shape[0], bank.hidden_size, dtype=x_sorted.dtype, device=x_sorted.device)  # [P, D]
    start = 0
    sizes = p.sizes if p.sizes is not None else p.counts.tolist()
    for e, n in enumerate(sizes):
        if n == 0:
            continue
        rows = slice(start, start + n)
        y[rows] = bank.linear_out(e, bank.activation(bank.linear_in(e, x_sorted[rows])))
        start += n
    return y


def quantized_pairs(x: Tensor, ids: Tensor, bank) -> Tensor:
    """One token's step with no plan: x [1, D], ids [1, K] -> pairs [K, D] in k order. Each of its experts
    gets the one row it gets in the plan path, so the bits are the same."""
    y = torch.empty(ids.numel(), bank.hidden_size, dtype=x.dtype, device=x.device)  # [K, D]
    for k, e in enumerate(ids.reshape(-1).tolist()):  # one host sync, as the plan path's sizes
        y[k] = bank.linear_out(e, bank.activation(bank.linear_in(e, x)))[0]
    return y
