"""`QuantizedBank`: a layer's experts in a weight-only quantized form, read and quantized one expert at a
time as they stream from the checkpoint (the float layer never exists whole).

    int8: q_in [E, N, D] int8, s_in [E, N, G_in];  q_out [E, D, I] int8, s_out [E, D, G_out]
    int4: p_in [E, N, D/2] uint8 (the CPU kernel's packing), z_in [E, D/g, N, 2]; p_out, z_out likewise
          (the "plain" layout: z_in [E, N/16, D/g, 16, 2], formats.py `block_scales`)
    b_in [E, N], b_out [E, D]: biases stay in the model's dtype

Scales (and int4 zeros) are kept in the model's dtype, as the kernels take them. `linear_in(e, x)` and
`linear_out(e, a)` are expert e's two projections; kernels/quantized.py loops over the experts with them.
Under an expert budget the host store reads experts from this bank (`tensors()` order) and the slot pool's
slots are an `empty` bank of the same format, so a miss copies the quantized bytes. On the disk tier the
experts live in moedeploy's quantized cache (quant/cache.py) and the layer's bank is `shaped` on the meta
device: shapes and dtypes only, no expert bytes (`.to()` moves nothing).

Legend: E experts, D hidden size, I expert intermediate size, N = 2I (gated) or I, G groups per row.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..experts import Activation, pin_buffers
from .formats import QuantSpec, block_scales, mm_int4, mm_int8, pack_int4, quantize_int4, quantize_int8


class QuantizedBank(nn.Module):
    quantized = True

    def __init__(self, spec: QuantSpec, activation: Activation, hidden_size: int, intermediate_size: int,
                 buffers: dict[str, Tensor]):
        super().__init__()
        self.spec = spec
        self.activation = activation
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.g_in, self.g_out = spec.group(hidden_size), spec.group(intermediate_size)
        for name, t in buffers.items():
            self.register_buffer(name, t)
        self.b_in = buffers.get("b_in")
        self.b_out = buffers.get("b_out")
        self.on_host = False  # expert buffering: stays in host memory when the model moves (keep_on_host)

    @classmethod
    def from_store(cls, store, spec: QuantSpec, dtype: torch.dtype) -> "QuantizedBank":
        """Read each expert from `store` (store/experts.py: w_in, w_out, then any biases), quantize it, stack."""
        D, I = store.D, store.I
        spec.group(D), spec.group(I)  # a clear error before any expert is read
        parts: dict[str, list[Tensor]] = {}
        for e in range(store.size):
            w_in, w_out, *biases = store.read(e)
            for name, t in (*_quantize(spec, "in", w_in, D), *_quantize(spec, "out", w_out, I)):
                parts.setdefault(name, []).append(t.to(dtype) if t.is_floating_point() else t)
            for name, b in zip(("b_in", "b_out"), biases):  # DiskStore.read gives both biases or neither
                parts.setdefault(name, []).append(b.to(dtype))
        return cls(spec, store.activation, D, I, {name: torch.stack(ts) for name, ts in parts.items()})

    @classmethod
    def shaped(cls, spec: QuantSpec, activation: Activation, hidden_size: int, intermediate_size: int,
               shapes: dict[str, tuple[tuple[int, ...], torch.dtype]], device="meta") -> QuantizedBank:
        """A bank with buffers of the given [E, ...] shapes and dtypes, registered in `shapes`' order (the
        `tensors()` order): on "meta" it holds no expert bytes (the disk tier), elsewhere uninitialised memory."""
        buffers = {name: torch.empty(shape, dtype=dtype, device=device) for name, (shape, dtype) in shapes.items()}
        return cls(spec, activation, hidden_size, intermediate_size, buffers)

    def _apply(self, fn, recurse=True):
        if self.on_host or any(t.is_meta for t in self.tensors()):  # a budget's host store, or the disk tier's
            return self  # shapes-only bank: device slots copy from it, nothing here moves
        return super()._apply(fn, recurse)

    def empty(self, num_experts: int, device) -> "QuantizedBank":
        """A bank of the same format with room for `num_experts` experts (a slot pool's slots)."""
        buffers = {name: torch.empty((num_experts, *t.shape[1:]), dtype=t.dtype, device=device)
                   for name, t in self._buffers.items() if t is not None}
        return QuantizedBank(self.spec, self.activation, self.hidden_size, self.intermediate_size, buffers)

    def keep_on_host(self, pin: bool) -> None:
        """Stay in host memory when the model moves to a device (the host store of an expert budget); `pin`
        page-locks the tensors, so copies to CUDA slots run asynchronously."""
        if pin:
            pin_buffers(self)
        self.on_host = True

    @property
    def num_experts(self) -> int:
        return self._buffers["q_in" if self.spec.dtype == "int8" else "p_in"].shape[0]

    def tensors(self) -> tuple[Tensor, ...]:
        return tuple(t for t in self._buffers.values() if t is not None)

    def tensor_names(self) -> tuple[str, ...]:
        """The buffer names of `tensors()`, in the same order."""
        return tuple(name for name, t in self._buffers.items() if t is not None)

    def expert_bytes(self) -> int:
        """Bytes of one expert in its quantized form (weights, scales, biases)."""
        return sum(t[0].numel() * t.element_size() for t in self.tensors())

    def parameter_count(self) -> int:
        """Weights and biases the quantized tensors stand for (as if unquantized)."""
        n = 2 * self.intermediate_size if self.activation.gated else self.intermediate_size
        biases = sum(t.numel() for t in (self.b_in, self.b_out) if t is not None)
        return self.num_experts * (n * self.hidden_size + self.hidden_size * self.intermediate_size) + biases

    def linear_in(self, e: int, x: Tensor) -> Tensor:
        """x [M, D] -> [M, N]: expert e's first projection (bias included)."""
        h = (mm_int8(x, self.q_in[e], self.s_in[e]) if self.spec.dtype == "int8"
             else mm_int4(x, self.p_in[e], self.z_in[e], self.g_in, self.spec.layout))
        return h if self.b_in is None else h + self.b_in[e]

    def linear_out(self, e: int, a: Tensor) -> Tensor:
        """a [M, I] -> [M, D]: expert e's second projection (bias included)."""
        y = (mm_int8(a, self.q_out[e], self.s_out[e]) if self.spec.dtype == "int8"
             else mm_int4(a, self.p_out[e], self.z_out[e], self.g_out, self.spec.layout))
        return y if self.b_out is None else y + self.b_out[e]


def _quantize(spec: QuantSpec, side: str, w: Tensor, K: int) -> list[tuple[str, Tensor]]:
    """One projection w [N, K] -> its named quantized tensors."""
    g = spec.group(K)
    if spec.dtype == "int8":
        q, scale = quantize_int8(w, g)
        return [(f"q_{side}", q), (f"s_{side}", scale)]
    q, scales_and_zeros = quantize_int4(w, g)
    if spec.layout == "plain":
        scales_and_zeros = block_scales(scales_and_zeros)
    return [(f"p_{side}", pack_int4(q, spec.layout)), (f"z_{side}", scales_and_zeros)]
