"""Decode-sized dense projections on the CPU: bfloat16 `F.linear` of a few rows through the native kernel.

A decode step multiplies one row by every dense matrix of the model (attention's projections, the routers, shared
experts, the LM head). torch runs a bfloat16 `F.linear` through oneDNN, which spends 26-30 us on a call however
small the matrix (one row by 32 x 2048: 28 us warm, 60-75 us inside a decode step, against 4.5 us in float32):
on the large model of docs/benchmarks.md that was 1.5-2 ms of each token's 18-36 ms. `linear_rows` (native.cpp)
computes the same thing with the expert kernel's float paths: float32 sums of each row, rounded once to
bfloat16, as F.linear does (its bits equal oneDNN's on the shapes measured, though nothing requires it), in 8-10
us for that matrix.

It takes steps of at most ROWS rows (a decode step, or a few requests' decode rows in one engine step), bfloat16,
on the CPU, without a bias, inputs of at least `min_inputs()`: 128 on a CPU with AVX-512 (there each output's
shorter sum is too short for the row-at-a-time loop's 64-input steps: one row by 2048 x 32 took 109 us against
oneDNN's 31 on a Xeon), 32 with AVX2 alone (16-input steps: the same shape 17 us against oneDNN's 66 on an AVX2
EPYC, attention's output projection of the large model); everything else, float32 included (MKL's is as fast),
goes to F.linear. So a prompt's bits come from oneDNN and a decode step's from this kernel, as with the
expert kernels (`kernels.for_step`); every budget, store and policy runs the same projections, so they keep the
resident model's bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch import DECODE_TOKENS
from ..routing import Router
from . import native

ROWS = DECODE_TOKENS  # at most this many rows per call: decode-sized steps

_state: dict[str, int] = {}


def min_inputs() -> int:
    """The fewest inputs a projection needs to run here (see the module's doc); 0 where the kernel is not built."""
    if "min_inputs" not in _state:
        isas = native.isas() if native.available() else []
        _state["min_inputs"] = 0 if not isas else 128 if "avx512" in isas else 32
    return _state["min_inputs"]


def takes(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Asked on every projection of every step: the cheap checks first (`is_cpu`, not `device.type`: 0.2 against
    1 us a call here)."""
    K = weight.shape[-1]
    return (bias is None and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.is_cpu
            and weight.is_cpu and weight.dim() == 2 and 0 < min_inputs() <= K and x.numel() <= ROWS * K
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)))  # no backward here


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), through the native kernel where `takes` says so."""
    if not takes(x, weight, bias):
        return F.linear(x, weight, bias)
    K, N = weight.shape[1], weight.shape[0]
    y = torch.ops.moedeploy.linear_rows(x.reshape(-1, K).contiguous(), weight.contiguous())  # [M, N]
    return y.view(*x.shape[:-1], N)


class RowLinear(nn.Linear):
    """An nn.Linear whose decode-sized bfloat16 steps run `linear`; `install` gives a model's nn.Linear modules
    this class in place (same parameters, tied ones still tied)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


def install(model: nn.Module) -> int:
    """Every plain nn.Linear of `model` without a bias becomes a RowLinear, and moedeploy's routers project with
    `linear`; the number of modules changed. Nothing when the native kernel is not built here (every call would go
    to F.linear anyway)."""
    if not native.available():
        return 0
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear and module.bias is None:
            module.__class__ = RowLinear
            changed += 1
        elif isinstance(module, Router):
            module.linear = linear
            changed += 1
    return changed
