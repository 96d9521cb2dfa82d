"""Grouped expert FFN backends, keyed by name. Each computes, for the pairs of a dispatch plan,

    y_sorted[rows of e] = act(x_sorted[rows of e] @ w_in[e].T + b_in[e]) @ w_out[e].T + b_out[e]

and returns y_sorted [P, D] (rows of dropped pairs are left unspecified; `combine` zeroes them).

- "loop": a plain loop over the experts that got tokens. The reference; works for every layout.
- "grouped_mm": `torch._grouped_mm`, one call per projection over all experts. Needs rows whose
  byte strides are multiples of 16 (hidden and intermediate sizes times element size).
- "quantized": a loop over the experts with torch's packed int8 / int4 kernels; the only backend of a
  quantized bank (quant/), chosen for it whatever the name.
- "auto": grouped_mm, except on CPU when the pairs are few (P * LOOP_RATIO <= E): torch's CPU
  grouped_mm visits every expert, idle or not (about 1.2 us per expert and projection, 1.2 ms a layer
  with 512 experts), while the loop visits only the experts that got tokens. Both compute the same
  rows with the same matrix multiplies (docs/benchmarks.md: 3.8x faster at one token, 512 experts).

`select(name, bank)` resolves the name once, when a layer is built ("auto" becomes "loop" where
grouped_mm does not apply); tests override it by name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..dispatch import Plan
from ..errors import OptionError
from ..experts import ExpertBank
from .grouped import grouped_mm_experts, grouped_mm_supported
from .loop import loop_experts
from .quantized import quantized_experts

Backend = Callable[[Tensor, Plan, ExpertBank], Tensor]

LOOP_RATIO = 8  # "auto" on CPU: P pairs with P * LOOP_RATIO <= E experts go through the loop


def auto_experts(x_sorted: Tensor, p: Plan, bank: ExpertBank) -> Tensor:
    if x_sorted.device.type == "cpu" and x_sorted.shape[0] * LOOP_RATIO <= p.num_experts:
        return loop_experts(x_sorted, p, bank)
    return grouped_mm_experts(x_sorted, p, bank)


BACKENDS: dict[str, Backend] = {"loop": loop_experts, "grouped_mm": grouped_mm_experts, "auto": auto_experts,
                                "quantized": quantized_experts}


def select(name: str, bank: ExpertBank) -> str:
    """The backend name to use for `bank`: `name` itself, or for "auto" the fastest that applies."""
    if getattr(bank, "quantized", False):
        if name not in ("auto", "quantized"):
            raise OptionError(f"quantized experts run on their own kernels; backend {name!r} does not apply (use auto)")
        return "quantized"
    if name == "quantized":
        raise OptionError("backend 'quantized' needs quantized experts (expert_dtype='int8' or 'int4')")
    if name == "auto":
        return "auto" if grouped_mm_supported(bank) else "loop"
    if name not in BACKENDS:
        raise OptionError(f"unknown expert backend {name!r}; choose one of: {', '.join(BACKENDS)}")
    if name == "grouped_mm" and not grouped_mm_supported(bank):
        raise OptionError(
            "backend 'grouped_mm' needs torch._grouped_mm and hidden/intermediate sizes whose rows are "
            "multiples of 16 bytes; use backend='loop' or 'auto' for this model"
        )
    return name
