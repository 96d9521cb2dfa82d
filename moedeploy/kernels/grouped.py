"""Expert FFN with `torch._grouped_mm`: two grouped GEMMs over the plan's offsets, no host sync."""

from __future__ import annotations

import torch
from torch import Tensor

from ..dispatch import Plan
from ..experts import ExpertBank


def grouped_mm_supported(bank: ExpertBank) -> bool:
    """torch._grouped_mm exists and every row stride of its operands is a multiple of 16 bytes."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if bank.w_in.dtype not in (torch.float32, torch.bfloat16):
        return False
    if bank.w_in.device.type == "cuda" and torch.cuda.get_device_capability(bank.w_in.device) < (8, 0):
        return False
    size = bank.w_in.element_size()
    dims = (bank.hidden_size, bank.intermediate_size, bank.w_in.shape[1])
    return all((d * size) % 16 == 0 for d in dims)


def _bias_rows(bias: Tensor, p: Plan) -> Tensor:
    """Per-row bias [P, N]: each sorted row gets its expert's bias (dropped rows get the last expert's)."""
    E = p.num_experts
    expert_of_row = torch.searchsorted(p.offsets, torch.arange(p.order.shape[0], device=bias.device, dtype=torch.int32), right=True)
    return bias[expert_of_row.clamp_(max=E - 1)]


def grouped_mm_experts(x_sorted: Tensor, p: Plan, bank: ExpertBank) -> Tensor:
    h = torch._grouped_mm(x_sorted, bank.w_in.transpose(-2, -1), offs=p.offsets)  # [P, N]
    if bank.b_in is not None:
        h = h + _bias_rows(bank.b_in, p)
    y = torch._grouped_mm(bank.activation(h), bank.w_out.transpose(-2, -1), offs=p.offsets)  # [P, D]
    if bank.b_out is not None:
        y = y + _bias_rows(bank.b_out, p)
    return y
