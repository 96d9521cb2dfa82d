"""Grouped expert FFN backends, keyed by name. Each computes, for the pairs of a dispatch plan,

    y_sorted[rows of e] = act(x_sorted[rows of e] @ w_in[e].T + b_in[e]) @ w_out[e].T + b_out[e]

and returns y_sorted [P, D] (rows of dropped pairs are left unspecified; `combine` zeroes them).

- "loop": a plain loop over the experts that got tokens. The reference; works for every layout.
- "grouped_mm": `torch._grouped_mm`, one call per projection over all experts. Needs rows whose
  byte strides are multiples of 16 (hidden and intermediate sizes times element size).

`select(name, bank)` resolves "auto" once, when a layer is built; tests override it by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..dispatch import Plan
from ..errors import OptionError
from ..experts import ExpertBank
from .grouped import grouped_mm_experts, grouped_mm_supported
from .loop import loop_experts

Backend = Callable[[Tensor, Plan, ExpertBank], Tensor]

BACKENDS: dict[str, Backend] = {"loop": loop_experts, "grouped_mm": grouped_mm_experts}


def select(name: str, bank: ExpertBank) -> str:
    """The backend name to use for `bank`: `name` itself, or for "auto" the fastest that applies."""
    if name == "auto":
        return "grouped_mm" if grouped_mm_supported(bank) else "loop"
    if name not in BACKENDS:
        raise OptionError(f"unknown expert backend {name!r}; choose one of: auto, {', '.join(BACKENDS)}")
    if name == "grouped_mm" and not grouped_mm_supported(bank):
        raise OptionError(
            "backend 'grouped_mm' needs torch._grouped_mm and hidden/intermediate sizes whose rows are "
            "multiples of 16 bytes; use backend='loop' or 'auto' for this model"
        )
    return name
