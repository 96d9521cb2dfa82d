"""Weight-only quantization of one projection w [N, K] (N outputs, K inputs), group-wise along K:

    int8: symmetric, scale = max|w| / 127 per (row, group); q in -127..127        w ~ q * scale
    int4: asymmetric, per (row, group) min and max: scale = (max - min) / 15,
          q = round((w - min) / scale) in 0..15, zero = min + 8 * scale            w ~ (q - 8) * scale + zero
          stored two codes per byte, in one of two layouts (QuantSpec.layout): "cpu", torch's CPU int4
          kernel's packing, scales_and_zeros [G, N, 2]; "plain", input 2j in the low nibble of byte j and 2j + 1
          in the high one, scales_and_zeros in blocks of 16 rows [N / 16, G, 16, 2] (`block_scales`: a block's
          are read in one pass, where [G, N, 2] scatters them one line per group, N rows apart)

Kernels (CPU; x in float32 or bfloat16, scales in x's dtype):
    int8: torch._weight_int8pack_mm(x, q [N, K], scale [N]) once per group (one call when the group is the row);
          decode steps moedeploy's native kernel (kernels/native.py)
    int4: torch._weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros [K/g, N, 2]) ("cpu" layout)
    On a CPU with AVX2, for the experts it computes (kernels/native.py `takes`), every step of both runs
    moedeploy's native kernel instead, int4 over the "plain" layout.
Each has `dequantize` as its reference: the float weight the kernel stands for, then a plain matmul. The native
kernel's integer path (AVX512-VNNI or AVX2) multiplies the weights by int8 inputs, as llama.cpp's quantized dot
products do: its reference quantizes the inputs first (`quantize_inputs`). Off the CPU the experts run the reference
(each expert's weight dequantized on the device, then a matmul: the slots and a miss's copy hold the small
bytes): int8 as stored, int4 in the "plain" layout (the CPU kernel's packing is its own, and CUDA's int4 kernel
takes another).

Legend: N output features, K input features, g group size, G = K / g groups.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import OptionError

EXPERT_DTYPES = ("int8", "int4")
DEFAULT_GROUP = {"int8": None, "int4": 64}  # int8: one scale per row (one kernel call); int4: 64 (32 where 64
# does not divide the inputs), between llama.cpp's Q4_0 (32) and GPTQ's usual 128
INT4_GROUPS = (32, 64, 128, 256)  # what torch's int4 kernel takes
INT4_LAYOUTS = ("cpu", "plain")


@dataclass(frozen=True)
class QuantSpec:
    dtype: str  # "int8" or "int4"
    group_size: int | None = None  # inputs per scale; None: the format's default (int8: the whole row)
    layout: str = "cpu"  # int4's two codes per byte: "cpu" (torch's CPU kernel) or "plain" (off the CPU)

    def __post_init__(self):
        if self.dtype not in EXPERT_DTYPES:
            raise OptionError(f"unknown expert dtype {self.dtype!r}; choose one of: {', '.join(EXPERT_DTYPES)}")
        if self.layout not in INT4_LAYOUTS or (self.layout != "cpu" and self.dtype != "int4"):
            raise OptionError(f"layout {self.layout!r}: int4 takes {' or '.join(INT4_LAYOUTS)}, int8 only 'cpu'")
        g = self.group_size
        if g is not None and g < 1:
            raise OptionError(f"the group size must be a positive number of inputs, got {g}")
        if self.dtype == "int4" and g is not None and g not in INT4_GROUPS:
            raise OptionError(f"int4 groups are {', '.join(map(str, INT4_GROUPS))} inputs (torch's int4 kernel); "
                              f"got {g}")

    def group(self, K: int) -> int:
        """The group size for a projection with K inputs, checked: it must divide K."""
        g = self.group_size or DEFAULT_GROUP[self.dtype] or K
        if self.group_size is None and self.dtype == "int4" and K % g and K % 32 == 0:
            g = 32  # the default, 64, does not fit this projection: the next smaller group the kernel takes
        if K % g:
            raise OptionError(f"group size {g} does not divide the expert's input dimension {K}; choose a group "
                              f"size that divides {K}" + (f" (int4 takes {', '.join(map(str, INT4_GROUPS))})"
                                                           if self.dtype == "int4" else ""))
        return g


INPUT_BLOCK = 32  # inputs per scale where the native kernel quantizes a step's inputs to int8 (llama.cpp's Q8_0's)


def quantize_inputs(x: Tensor) -> Tensor:
    """x [M, K] -> the float32 values the native kernel's integer paths (kernels/native.cpp) multiply
    the weights by: per block of 32 inputs, d * round(x / d) with d = max|x| / 127. Its reference in tests."""
    M, K = x.shape
    xb = x.float().view(M, K // INPUT_BLOCK, INPUT_BLOCK)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(xb / d), 0).clamp(-127, 127)
    return (q * d).view(M, K)


# --- int8 ---------------------------------------------------------------------------------------------------------

def quantize_int8(w: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """w [N, K] -> q [N, K] int8, scale [N, G] float32."""
    N, K = w.shape
    wg = w.float().view(N, K // g, g)
    scale = wg.abs().amax(-1).clamp(min=1e-12) / 127  # [N, G]
    q = torch.round(wg / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q.view(N, K), scale


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    N, K = q.shape
    G = scale.shape[1]
    return (q.view(N, G, K // G).float() * scale.float().unsqueeze(-1)).view(N, K)


def for_device(spec: QuantSpec, device: torch.device) -> QuantSpec:
    """`spec` with the int4 layout `device` runs: torch's CPU kernel's on the CPU, "plain" elsewhere. (The loader
    takes "plain" on the CPU too where moedeploy's native kernel computes the model's experts: loader.py.)"""
    plain = spec.dtype == "int4" and device.type != "cpu"
    return replace(spec, layout="plain" if plain else "cpu")


def kernel(spec: QuantSpec, device: torch.device, integer: str | None = None) -> str:
    """What runs for `spec`'s experts on `device` (the runtime's stats say it); `integer`: the native kernel's integer
    path (kernels/native.py `integer_isa`) where it runs every step of the bank (`every_step`)."""
    if device.type == "cpu" and integer:
        return f"{spec.dtype}: moedeploy's native kernel (kernels/native.py), int8 inputs ({integer})"
    if device.type != "cpu" or spec.layout == "plain":
        return f"{spec.dtype}: dequantize per expert, then matmul (no packed {spec.dtype} kernel on {device.type})"
    return {"int8": "int8: torch._weight_int8pack_mm; decode steps moedeploy's native kernel (kernels/native.py)",
            "int4": "int4: torch._weight_int4pack_mm_for_cpu"}[spec.dtype]


def mm_int8(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """x [M, K] @ dequantized(q).T -> [M, N], in x's dtype."""
    if x.device.type != "cpu":  # no packed int8 kernel used here: the reference, on the device
        return F.linear(x, dequantize_int8(q, scale).to(x.dtype))
    G = scale.shape[1]
    s = scale.to(x.dtype)
    if G == 1:
        return torch._weight_int8pack_mm(x.contiguous(), q, s[:, 0].contiguous())
    g = q.shape[1] // G
    out = torch.zeros(x.shape[0], q.shape[0], dtype=torch.float32, device=x.device)  # [M, N]
    for i in range(G):  # one kernel call per group (the kernel takes one scale per row), summed in float32: in
        # x's dtype (bfloat16) each group's partial sum would be rounded once more
        out += torch._weight_int8pack_mm(x[:, i * g:(i + 1) * g].contiguous(), q[:, i * g:(i + 1) * g].contiguous(),
                                         s[:, i].contiguous())
    return out.to(x.dtype)


# --- int4 ---------------------------------------------------------------------------------------------------------

def quantize_int4(w: Tensor, g: int) -> tuple[Tensor, Tensor]:
    """w [N, K] -> q [N, K] int32 in 0..15, scales_and_zeros [G, N, 2] float32 (the kernel's layout)."""
    N, K = w.shape
    wg = w.float().view(N, K // g, g)
    lo, hi = wg.amin(-1), wg.amax(-1)  # [N, G]
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, 15).to(torch.int32).view(N, K)
    zero = lo + 8 * scale
    return q, torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


def pack_int4(q: Tensor, layout: str = "cpu") -> Tensor:
    """q [N, K] int32 in 0..15 -> packed uint8 [N, K / 2]: the CPU kernel's, or "plain" (even inputs low)."""
    if layout == "plain":
        return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    return torch._convert_weight_to_int4pack_for_cpu(q, 1)


def unpack_int4(packed: Tensor) -> Tensor:
    """The "plain" layout's packed uint8 [N, K / 2] -> q [N, K] in 0..15 (uint8)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


SCALE_ROWS = 16  # rows per block of the "plain" layout's scales and zeros (the native kernel's kQBlock)


def block_scales(scales_and_zeros: Tensor) -> Tensor:
    """[G, N, 2] -> the "plain" layout's [N / r, G, r, 2]: r = 16 rows per block (all N where 16 does not divide N,
    which is [G, N, 2] itself). A 16-row block's scales are 64 contiguous bytes per group in bfloat16, its
    groups one after another: the native kernel reads them in one pass (cold from memory, [G, N, 2]'s lines N
    rows apart read at 9.4 against 11.9 GB/s for int4 experts on an AVX2 EPYC)."""
    G, N, _ = scales_and_zeros.shape
    r = SCALE_ROWS if N % SCALE_ROWS == 0 else N
    return scales_and_zeros.view(G, N // r, r, 2).transpose(0, 1).contiguous()


def unblock_scales(z: Tensor) -> Tensor:
    """`block_scales`' inverse: [N / r, G, r, 2] -> [G, N, 2]."""
    B, G, r, _ = z.shape
    return z.transpose(0, 1).reshape(G, B * r, 2)


def dequantize_int4(q: Tensor, scales_and_zeros: Tensor) -> Tensor:
    N, K = q.shape
    G = scales_and_zeros.shape[0]
    sz = scales_and_zeros.float().transpose(0, 1)  # [N, G, 2]
    w = (q.view(N, G, K // G).float() - 8) * sz[..., :1] + sz[..., 1:]
    return w.view(N, K)


def mm_int4(x: Tensor, packed: Tensor, scales_and_zeros: Tensor, g: int, layout: str = "cpu") -> Tensor:
    """x [M, K] @ dequantized.T -> [M, N], in x's dtype (scales_and_zeros in `layout`'s arrangement)."""
    if layout == "plain":  # the reference, on x's device
        return F.linear(x, dequantize_int4(unpack_int4(packed), unblock_scales(scales_and_zeros)).to(x.dtype))
    if x.device.type != "cpu":
        raise OptionError(f"these int4 experts are packed for torch's CPU kernel and cannot run on {x.device.type}; "
                          f"load the model with device={x.device.type!r} instead of moving it there")
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), packed, g, scales_and_zeros.to(x.dtype))
