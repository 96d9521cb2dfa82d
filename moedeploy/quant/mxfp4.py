"""MXFP4 (OCP microscaling FP4), as GPT-OSS checkpoints ship their experts and transformers reads them
(`transformers.integrations.mxfp4.convert_moe_packed_tensors`):

    blocks [..., R, G, 16] uint8: two FP4 (E2M1) codes per byte, the low nibble first (element 2j), the high
                                  nibble second (element 2j + 1); code bit 3 is the sign
    scales [..., R, G]     uint8: one E8M0 exponent per 32 elements, bias 127
    w[..., r, 32 g + i] = FP4_VALUES[code i of blocks[..., r, g]] * 2 ** (scales[..., r, g] - 127)

Rows r are a projection's outputs and the 32 G columns its inputs (the [N, K] orientation of nn.Linear), so
4 + 8 / 32 = 4.25 bits per weight. torch has no MXFP4 matmul on CPU: the expert path dequantizes one expert's
weight with a lookup table and runs a plain matmul in the model's dtype (`dequantize`, exact: every product is a
power of two times a 2-bit mantissa). `quantize` (round to the nearest code under the block's shared exponent,
as the MX spec does) writes test checkpoints.

Legend: R rows (outputs), G = K / 32 blocks per row, K inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

BLOCK = 32  # elements per scale
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
FP4_EMAX = 2  # the largest code, 6.0, is 1.5 * 2 ** 2
SCALE_BIAS = 127


def dequantize(blocks: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """blocks [..., R, G, 16] uint8, scales [..., R, G] uint8 -> w [..., R, 32 G] in `dtype`."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., R, G, 16, 2]: element 2j, 2j + 1
    values = lut[codes].flatten(-3)  # [..., R, 32 G]
    exponents = (scales.long() - SCALE_BIAS).repeat_interleave(BLOCK, dim=-1)  # [..., R, 32 G]
    return torch.ldexp(values, exponents.float()).to(dtype)


def quantize(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [..., R, K] (K a multiple of 32) -> blocks [..., R, K/32, 16] uint8, scales [..., R, K/32] uint8."""
    *lead, R, K = w.shape
    wb = w.float().reshape(*lead, R, K // BLOCK, BLOCK)  # [..., R, G, 32]
    amax = wb.abs().amax(-1)  # [..., R, G]
    exponent = torch.where(amax > 0, torch.floor(torch.log2(amax.clamp(min=2.0 ** -126))) - FP4_EMAX,
                           torch.full_like(amax, -SCALE_BIAS)).clamp(-SCALE_BIAS, SCALE_BIAS)
    scaled = wb / torch.exp2(exponent).unsqueeze(-1)  # [..., R, G, 32], |.| < 8
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled.unsqueeze(-1) - lut).abs().argmin(-1).to(torch.uint8)  # nearest code; beyond 6 -> +-6
    pairs = codes.reshape(*lead, R, K // BLOCK, BLOCK // 2, 2)
    blocks = pairs[..., 0] | (pairs[..., 1] << 4)
    return blocks, (exponent + SCALE_BIAS).to(torch.uint8)


@dataclass(frozen=True)
class Mxfp4:
    """The format of a pre-quantized bank (quant/prequantized.py): how one expert's projection dequantizes."""

    name = "mxfp4"
    kernel = "mxfp4: dequantize per expert, then matmul"  # what runs: no MXFP4 matmul kernel on CPU

    def weight(self, q: Tensor, s: Tensor, parts: int, dtype: torch.dtype) -> Tensor:
        """q [N, G, 16] blocks, s [N, G] scales -> w [N, 32 G] (scales are per row: `parts` does not matter)."""
        return dequantize(q, s, dtype)

    def check(self, name: str, q_shape: tuple, s_shape: tuple, rows: int, cols: int) -> str | None:
        """Why blocks of shape q_shape with scales s_shape are not one [rows, cols] projection, or None."""
        if cols % BLOCK:
            return f"{cols} inputs are not a multiple of MXFP4's {BLOCK}-element blocks"
        want = (rows, cols // BLOCK)
        if tuple(q_shape) != (*want, BLOCK // 2) or tuple(s_shape) != want:
            return (f"{name}_blocks {tuple(q_shape)} and {name}_scales {tuple(s_shape)}, expected "
                    f"{(*want, BLOCK // 2)} and {want}")
        return None
