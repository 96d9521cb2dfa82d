"""Expert weights in one uniform layout, whatever the checkpoint's layout was.

    w_in  [E, N, D]   N = 2*I for gated FFNs (rows: gate then up), N = I otherwise
    w_out [E, D, I]
    b_in  [E, N], b_out [E, D]   optional biases (GPT-OSS, NLLB-MoE)

`Activation` maps the first projection's output h [P, N] to [P, I]: act(gate) * up for gated FFNs,
GPT-OSS's clamped SwiGLU, or a plain act(h).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Activation:
    fn: nn.Module  # the family's own activation module (transformers' ACT2FN), reused for exactness
    gated: bool  # h = [gate | up] -> fn(gate) * up
    clamp: float | None = None  # GPT-OSS: gate <= clamp, |up| <= clamp, then (up + 1) * gate * sigmoid(alpha * gate)
    alpha: float = 1.702

    def __call__(self, h: Tensor) -> Tensor:
        if not self.gated:
            return rowwise(self.fn, h)
        gate, up = h.chunk(2, dim=-1)
        if self.clamp is None:
            return rowwise(self.fn, gate) * up
        gate = gate.clamp(max=self.clamp)
        up = up.clamp(min=-self.clamp, max=self.clamp)
        return (up + 1) * (gate * rowwise(torch.sigmoid, gate * self.alpha))


GRAIN = 16384  # an element-wise op over fewer elements runs on one thread: torch's grain (at::internal::GRAIN_SIZE)
# is 32768, and gelu's kernel splits from 16384


def rowwise(fn, t: Tensor) -> Tensor:
    """fn (element-wise and transcendental: exp, sigmoid, erf...) over t [..., W], each row's result independent
    of the other rows and of its position. On a CPU torch computes such a function in vector lanes and the last
    few elements of a loop one at a time, which round differently; over a contiguous tensor the loop runs across
    rows, so a row's bits would depend on where it sits, and a budget (rows in slot order, in chunks) would change
    them. Here every row is its own inner loop: rows kept apart in memory (torch cannot merge them into one),
    always at least two (a lone row is a plain vector, which some kernels, gelu's, compute another way), every
    call under torch's grain (one thread: a thread's share would otherwise start mid-row), rows wider than half
    the grain in fixed column segments. The price: the activation runs on one thread, a block at a time (on
    large prompt steps 3-4x slower at 2 threads, the whole step 3-8% slower; docs/benchmarks.md). On CUDA every
    element runs the same code wherever it sits: fn as it is. Arithmetic (+, *, clamp) rounds the same either
    way and needs none of this. tests/test_experts.py holds torch to it."""
    W = t.shape[-1] if t.dim() else 0
    if t.device.type != "cpu" or t.numel() == 0:
        return fn(t)
    P = t.numel() // W  # rows: any leading dimensions
    apart = t.new_zeros(P + 1, W + 1)[:, :W]  # [P + 1, W], row stride W + 1; the last row a spare
    apart[:P].copy_(t.reshape(P, W))
    cols = min(W, (GRAIN - 1) // 2)  # columns per call: two rows of them under the grain
    rows = max(2, (GRAIN - 1) // cols)  # rows per call; a last block of one row is the spare alone
    if P + 1 <= rows and cols == W:
        return fn(apart)[:P].view(t.shape)
    out = t.new_empty(P + 1, W)
    for r in range(0, P + 1, rows):
        for c in range(0, W, cols):
            out[r:r + rows, c:c + cols] = fn(apart[r:r + rows, c:c + cols])
    return out[:P].view(t.shape)


def pin_buffers(bank: nn.Module) -> None:
    """Page-lock every buffer of `bank` in place (an expert bank kept on the host for CUDA slots: copies from it
    run asynchronously; one tensor at a time is briefly held twice)."""
    for name, t in list(bank._buffers.items()):
        if t is not None:
            bank._buffers[name] = t.pin_memory()


class ExpertBank(nn.Module):
    """All experts of one MoE layer, stacked. Buffers, so `.to()` moves them and nothing trains them."""

    def __init__(self, w_in: Tensor, w_out: Tensor, activation: Activation,
                 b_in: Tensor | None = None, b_out: Tensor | None = None):
        super().__init__()
        E, N, D = w_in.shape
        if w_out.shape[:2] != (E, D) or N != w_out.shape[2] * (2 if activation.gated else 1):
            raise ValueError(f"expert shapes do not fit: w_in {tuple(w_in.shape)}, w_out {tuple(w_out.shape)}")
        self.register_buffer("w_in", w_in)
        self.register_buffer("w_out", w_out)
        self.register_buffer("b_in", b_in)
        self.register_buffer("b_out", b_out)
        self.activation = activation
        self.on_host = False  # expert buffering: stays in host memory when the model moves (keep_on_host)

    def _apply(self, fn, recurse=True):
        if self.w_in.is_meta or self.on_host:  # experts that device slots copy from: nothing here moves
            return self
        return super()._apply(fn, recurse)

    def keep_on_host(self, pin: bool) -> None:
        """Stay in host memory when the model moves to a device; `pin` page-locks the tensors (`pin_buffers`)."""
        if pin and not self.w_in.is_meta:
            pin_buffers(self)
        self.on_host = True

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_in.shape[2]

    @property
    def intermediate_size(self) -> int:
        return self.w_out.shape[2]

    def tensors(self) -> tuple[Tensor, ...]:
        """The stacked [E, ...] tensors this bank has (biases only where present)."""
        return tuple(t for t in (self.w_in, self.w_out, self.b_in, self.b_out) if t is not None)

    def parameter_count(self) -> int:
        """Weights and biases of every expert."""
        return sum(t.numel() for t in self.tensors())

    def expert_bytes(self) -> int:
        """Bytes of one expert's weights and biases."""
        return sum(t[0].numel() * t.element_size() for t in self.tensors())
