"""`PrequantizedBank`: a layer's routed experts kept in the format the checkpoint ships them in, MXFP4
(GPT-OSS) or block-scaled FP8 (DeepSeek-V3), read one expert at a time (quant/ondisk.py) and never widened.

    MXFP4: q_in [E, N, D/32, 16] uint8 blocks, s_in [E, N, D/32] uint8 exponents;  q_out [E, D, I/32, 16], s_out
    FP8:   q_in [E, N, D] uint8 (the float8_e4m3fn bytes), s_in [E, ceil(N/bn), ceil(D/bk)] float32;  q_out, s_out
    b_in [E, N], b_out [E, D]: biases in the model's dtype

`linear_in(e, x)` / `linear_out(e, a)` dequantize expert e's weight in x's dtype (the format's `weight`: a lookup
table times 2^(s - 127), or w * scale per block) and run a plain matmul: torch has no MXFP4 or FP8 matmul on CPU,
so this dequantize-then-matmul path is the one that runs, and `kernel` says so (`model.moedeploy.stats()`
reports it). kernels/quantized.py loops over the experts with them, as for `QuantizedBank`. Under an expert
budget the host store reads experts from this bank (`tensors()` order) and the slot pool's slots are an `empty`
bank of the same format, so a miss copies the small bytes. FP8 bytes are stored as uint8 so that a module-wide
dtype cast (`.float()`, `.to(bfloat16)`) cannot widen them.

Legend: E experts, D hidden size, I expert intermediate size, N = 2I (gated) or I, bn x bk the FP8 block.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import Activation, pin_buffers
from .fp8 import Fp8
from .mxfp4 import Mxfp4
from .ondisk import read_expert

FIELDS = ("q_in", "s_in", "q_out", "s_out", "b_in", "b_out")  # tensors() order


class PrequantizedBank(nn.Module):
    quantized = True

    def __init__(self, fmt: Mxfp4 | Fp8, activation: Activation, hidden_size: int, intermediate_size: int,
                 buffers: dict[str, Tensor], parts_in: int = 1):
        super().__init__()
        self.fmt = fmt
        self.kernel = fmt.kernel  # what runs for these experts
        self.activation = activation
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.parts_in = parts_in  # scale grids stacked along w_in's rows (FP8 gate and up stored apart: 2)
        for name in FIELDS:
            self.register_buffer(name, buffers.get(name))
        self.on_host = False  # expert buffering: stays in host memory when the model moves (keep_on_host)

    @classmethod
    def from_store(cls, store, dtype: torch.dtype) -> PrequantizedBank:
        """The layer's experts as shipped: `store` is the loader's DiskStore over an `ondisk.Dequantizing`
        checkpoint (its layout, prefix and sizes; all the layer's experts, not a subset)."""
        ckpt = store.ckpt

        def read(e: int):
            return read_expert(ckpt.raw, ckpt.fmt, store.layout, store.prefix, e, store.D, store.I)

        return cls.from_experts(ckpt.fmt, store.activation, store.D, store.I, store.size, read, dtype)

    @classmethod
    def from_experts(cls, fmt, activation: Activation, D: int, I: int, num_experts: int,
                     read: Callable[[int], object], dtype: torch.dtype) -> PrequantizedBank:
        """Stack `read(e)` (an ondisk.QuantizedExpert) for every expert into preallocated buffers: one expert at a
        time, the layer never twice in memory. Biases take `dtype`; the quantized bytes and scales stay as read."""
        first = read(0)
        buffers = {}
        for name in FIELDS:
            t = getattr(first, name)
            if t is not None:
                buffers[name] = torch.empty((num_experts, *t.shape), dtype=dtype if name[0] == "b" else t.dtype)
        for e in range(num_experts):
            expert = first if e == 0 else read(e)
            for name, stack in buffers.items():
                stack[e] = getattr(expert, name)
        return cls(fmt, activation, D, I, buffers, parts_in=first.parts_in)

    def empty(self, num_experts: int, device) -> PrequantizedBank:
        """A bank of the same format with room for `num_experts` experts (a slot pool's slots)."""
        buffers = {name: torch.empty((num_experts, *t.shape[1:]), dtype=t.dtype, device=device)
                   for name, t in self._buffers.items() if t is not None}
        return PrequantizedBank(self.fmt, self.activation, self.hidden_size, self.intermediate_size, buffers,
                                self.parts_in)

    def _apply(self, fn, recurse=True):
        if self.on_host:  # the host store of an expert budget: device slots copy from it, nothing here moves
            return self
        return super()._apply(fn, recurse)

    def keep_on_host(self, pin: bool) -> None:
        """Stay in host memory when the model moves to a device; `pin` page-locks the tensors (CUDA slots)."""
        if pin:
            pin_buffers(self)
        self.on_host = True

    @property
    def num_experts(self) -> int:
        return self.q_in.shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in (getattr(self, name) for name in FIELDS) if t is not None)

    def expert_bytes(self) -> int:
        """Bytes of one expert as stored (weights, scales, biases)."""
        return sum(t[0].numel() * t.element_size() for t in self.tensors())

    def weight_bits(self) -> float:
        """Bits per weight of one expert's two projections, scales included (MXFP4 4.25; FP8 8 + 32 per block)."""
        stored = sum(t[0].numel() * t.element_size() for t in (self.q_in, self.s_in, self.q_out, self.s_out))
        return 8 * stored / (self._weights_per_expert())

    def _weights_per_expert(self) -> int:
        n = 2 * self.intermediate_size if self.activation.gated else self.intermediate_size
        return n * self.hidden_size + self.hidden_size * self.intermediate_size

    def parameter_count(self) -> int:
        """Weights and biases the quantized tensors stand for (as if unquantized)."""
        biases = sum(t.numel() for t in (self.b_in, self.b_out) if t is not None)
        return self.num_experts * self._weights_per_expert() + biases

    def linear_in(self, e: int, x: Tensor) -> Tensor:
        """x [M, D] -> [M, N]: expert e's first projection (bias included), dequantized then matmul."""
        w = self.fmt.weight(self.q_in[e], self.s_in[e], self.parts_in, x.dtype)  # [N, D]
        return F.linear(x, w, None if self.b_in is None else self.b_in[e])

    def linear_out(self, e: int, a: Tensor) -> Tensor:
        """a [M, I] -> [M, D]: expert e's second projection (bias included), dequantized then matmul."""
        w = self.fmt.weight(self.q_out[e], self.s_out[e], 1, a.dtype)  # [D, I]
        return F.linear(a, w, None if self.b_out is None else self.b_out[e])
