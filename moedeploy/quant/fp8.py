"""Block-scaled FP8, as DeepSeek-V3 checkpoints ship their Linear weights (`quant_method: fp8`, `fmt: e4m3`,
`weight_block_size: [bn, bk]`; transformers' `integrations/finegrained_fp8.py`):

    weight           [N, K] float8_e4m3fn
    weight_scale_inv [ceil(N / bn), ceil(K / bk)] float32: one scale per bn x bk block (the last row and column
                     of blocks may be partial)
    w[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]

8 bits per weight plus 32 bits per block (8.002 bits at 128 x 128). `dequantize` is the reference and the expert
path: w.float() times the scales expanded to the blocks, then the model's dtype (one rounding). A weight made of
stacked projections, each with its own scale grid (DeepSeek's gate and up, concatenated into one w_in), is
dequantized part by part (`parts`), so a partial last block of one part never borrows the next part's scale.
`quantize` (max |w| of a block -> 448) writes test checkpoints, as transformers' `Fp8Quantize` does.

Legend: N outputs, K inputs, bn x bk the block.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

DTYPE = torch.float8_e4m3fn
MAX = torch.finfo(DTYPE).max  # 448


def grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The scale grid of a [rows, cols] weight: (ceil(rows / bn), ceil(cols / bk))."""
    return math.ceil(rows / block[0]), math.ceil(cols / block[1])


def dequantize(q: Tensor, scale_inv: Tensor, block: tuple[int, int], dtype: torch.dtype, parts: int = 1) -> Tensor:
    """q [N, K] float8_e4m3fn (or its bytes as uint8), scale_inv [parts * ceil(N / parts / bn), ceil(K / bk)]
    -> w [N, K] in `dtype`."""
    w = (q.view(DTYPE) if q.dtype == torch.uint8 else q).float()
    N, K = w.shape
    rows, srows = N // parts, scale_inv.shape[0] // parts
    out = torch.empty(N, K, dtype=dtype, device=q.device)
    for p in range(parts):
        s = scale_inv[p * srows:(p + 1) * srows].float()  # [ceil(rows / bn), ceil(K / bk)]
        s = s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :K]  # [rows, K]
        out[p * rows:(p + 1) * rows] = w[p * rows:(p + 1) * rows] * s
    return out


def quantize(w: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """w [N, K] -> q [N, K] float8_e4m3fn, scale_inv [ceil(N / bn), ceil(K / bk)] float32."""
    N, K = w.shape
    gn, gk = grid(N, K, block)
    padded = torch.zeros(gn * block[0], gk * block[1])
    padded[:N, :K] = w.float()
    tiles = padded.view(gn, block[0], gk, block[1])
    amax = tiles.abs().amax(dim=(1, 3))  # [gn, gk]
    scale_inv = torch.where(amax > 0, amax / MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[:, None, :, None]).clamp(-MAX, MAX).to(DTYPE)
    return q.view(gn * block[0], gk * block[1])[:N, :K].contiguous(), scale_inv


@dataclass(frozen=True)
class Fp8:
    """The format of a pre-quantized bank (quant/prequantized.py): how one expert's projection dequantizes."""

    block: tuple[int, int] = (128, 128)
    name = "fp8"

    @property
    def kernel(self) -> str:  # what runs: no FP8 matmul kernel on CPU
        return f"fp8 (e4m3, {self.block[0]}x{self.block[1]} blocks): dequantize per expert, then matmul"

    def weight(self, q: Tensor, s: Tensor, parts: int, dtype: torch.dtype) -> Tensor:
        """q [N, K] FP8 bytes, s [parts * ceil(N / parts / bn), ceil(K / bk)] -> w [N, K]."""
        return dequantize(q, s, self.block, dtype, parts)

    def check(self, name: str, q_shape: tuple, s_shape: tuple, rows: int, cols: int) -> str | None:
        """Why a weight of shape q_shape with scales s_shape is not one [rows, cols] projection, or None."""
        want = grid(rows, cols, self.block)
        if tuple(q_shape) != (rows, cols) or tuple(s_shape) != want:
            return (f"{name} {tuple(q_shape)} with {name}_scale_inv {tuple(s_shape)}, expected {(rows, cols)} with "
                    f"{want} ({self.block[0]}x{self.block[1]} blocks)")
        return None
