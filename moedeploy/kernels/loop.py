"""Reference expert FFN: one pair of matrix multiplies per expert that got tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import Plan
from ..experts import ExpertBank


def loop_experts(x_sorted: Tensor, p: Plan, bank: ExpertBank) -> Tensor:
    y = torch.empty(x_sorted.shape[0], bank.hidden_size, dtype=x_sorted.dtype, device=x_sorted.device)  # [P, D]
    start = 0
    sizes = p.sizes if p.sizes is not None else p.counts.tolist()  # host sync unless the plan brought them
    for e, n in enumerate(sizes):  # the loop needs each expert's row count
        if n == 0:
            continue
        rows = slice(start, start + n)
        h = F.linear(x_sorted[rows], bank.w_in[e], None if bank.b_in is None else bank.b_in[e])  # [n, N]
        a, w = bank.activation(h), bank.w_out[e].t()  # [n, I], [I, D]
        # F.linear's own kernels (addmm with a bias, else mm), writing straight into y's rows: no copy
        if bank.b_out is None:
            torch.mm(a, w, out=y[rows])
        else:
            torch.addmm(bank.b_out[e], a, w, out=y[rows])
        start += n
    return y
