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
