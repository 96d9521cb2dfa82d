"""Reference expert FFN: one pair of matrix multiplies per expert that got tokens.

It computes what grouped_mm does, in the same steps: the first projection of every row, the biases added
after the products, the activation once over all rows [P, N], then the second projection. Elementwise
transcendental functions (sigmoid, exp) do not round the same in a short slice as in a long tensor (vector
lanes against a scalar tail), so an activation per expert would give other bits than grouped_mm's, and a
layer that takes the loop resident and grouped_mm under a budget (kernels/__init__.py) would not stay
bit-identical."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import Plan
from ..experts import ExpertBank


def loop_experts(x_sorted: Tensor, p: Plan, bank: ExpertBank) -> Tensor:
    P = x_sorted.shape[0]
    sizes = p.sizes if p.sizes is not None else p.counts.tolist()  # host sync unless the plan brought them
    spans, start = [], 0
    for e, n in enumerate(sizes):  # the experts that got tokens, and their rows
        if n:
            spans.append((e, slice(start, start + n)))
        start += n
    h = torch.zeros(P, bank.w_in.shape[1], dtype=x_sorted.dtype, device=x_sorted.device)  # [P, N]; dropped rows 0
    for e, rows in spans:
        torch.mm(x_sorted[rows], bank.w_in[e].t(), out=h[rows])
        if bank.b_in is not None:
            h[rows] += bank.b_in[e]
    a = bank.activation(h)  # [P, I]
    y = torch.empty(P, bank.hidden_size, dtype=x_sorted.dtype, device=x_sorted.device)  # [P, D]
    for e, rows in spans:
        torch.mm(a[rows], bank.w_out[e].t(), out=y[rows])  # straight into y's rows: no copy
        if bank.b_out is not None:
            y[rows] += bank.b_out[e]
    return y
