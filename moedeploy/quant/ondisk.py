"""Pre-quantized checkpoints on disk: which format a checkpoint ships, reading it as if it were float, and
reading one routed expert in its quantized form.

- `format_of(config)`: config.json's `quantization_config` -> `Mxfp4()`, `Fp8(block)` or None (not quantized);
  any other `quant_method` is a clear error naming it.
- `Dequantizing(ckpt, fmt)`: the checkpoint as the loader sees it. A read of an FP8 weight (float8 with its
  `<name>_scale_inv`) returns the dequantized weight; a fused MXFP4 expert tensor `<name>` exists as
  `<name>_blocks` + `<name>_scales` and reads as transformers' float tensor (dequantized, transposed to
  [E, K, R]). Everything but the routed experts' bank (attention, dense MLPs, shared experts, routers) loads
  through it, so those weights are dequantized once, at load; so are experts on the paths with no quantized
  bank yet (the disk store, expert parallelism, int8/int4 requantization, the generic-family check).
- `read_expert(ckpt, fmt, layout, prefix, e, D, I)`: expert e's quantized tensors in the uniform layout
  (w_in rows gate then up, w_out [D, I]) for a `PrequantizedBank`: the bytes as shipped, rows reordered only.

Layouts (models/layouts.py) say where the experts are: GPT-OSS's MXFP4 experts are `Fused`, transposed and
interleaved (blocks [E, 2I, D/32, 16]: output rows alternate gate, up); DeepSeek-V3's FP8 experts are
`PerExpert` (`experts.{e}.gate_proj.weight` [I, D] + `weight_scale_inv`), and transformers 5's own FP8 save
is `Fused` ([E, 2I, D] + `gate_up_proj_scale_inv` [E, ceil(2I/bn), ceil(D/bk)]).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CheckpointError, UnsupportedModelError
from ..models.layouts import Fused, PerExpert
from .fp8 import Fp8
from .fp8 import dequantize as dequantize_fp8
from .mxfp4 import Mxfp4
from .mxfp4 import dequantize as dequantize_mxfp4

METHODS = ("mxfp4", "fp8")
FLOAT8 = {torch.float8_e4m3fn, torch.float8_e5m2}


def format_of(config) -> Mxfp4 | Fp8 | None:
    """The pre-quantized format config.json declares, or None; refused where moedeploy cannot run it."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "mxfp4":
        return Mxfp4()
    if method != "fp8":
        raise UnsupportedModelError(f"config.json's quantization_config has quant_method {method!r}; moedeploy reads "
                                    f"pre-quantized checkpoints in {', '.join(METHODS)} only (or a float checkpoint)")
    for key, allowed in (("fmt", ("e4m3", None)), ("activation_scheme", ("dynamic", None))):
        if qc.get(key) not in allowed:
            raise UnsupportedModelError(f"fp8 checkpoints with {key}={qc.get(key)!r} are not supported (only "
                                        f"{allowed[0]!r}, DeepSeek-V3's)")
    block = qc.get("weight_block_size")
    if not block or len(block) != 2:
        raise UnsupportedModelError(f"fp8 checkpoints need weight_block_size [rows, cols] in quantization_config "
                                    f"(per-tensor scales are not supported); got {block!r}")
    return Fp8(block=(int(block[0]), int(block[1])))


def _check(fmt, name: str, q_shape, s_shape, rows: int, cols: int) -> None:
    why = fmt.check(name, tuple(q_shape), tuple(s_shape), rows, cols)
    if why is not None:
        raise CheckpointError(f"pre-quantized ({fmt.name}) tensor {name} does not fit config.json: {why}")


class Dequantizing:
    """A `store.Checkpoint` whose quantized tensors read as float32 (the Checkpoint methods the loader uses)."""

    def __init__(self, ckpt, fmt: Mxfp4 | Fp8):
        self.raw, self.fmt, self.root = ckpt, fmt, ckpt.root

    def _packed(self, name: str) -> bool:  # an MXFP4 tensor stored as blocks and scales
        return isinstance(self.fmt, Mxfp4) and name not in self.raw and f"{name}_blocks" in self.raw

    def __contains__(self, name: str) -> bool:
        return name in self.raw or self._packed(name)

    def has_prefix(self, prefix: str) -> bool:
        return self.raw.has_prefix(prefix)

    def release(self) -> None:
        self.raw.release()

    def shape(self, name: str) -> tuple[int, ...]:
        if self._packed(name):
            *lead, R, G, _ = self.raw.shape(f"{name}_blocks")
            return (*lead, G * 32, R)
        return self.raw.shape(name)

    def read(self, name: str, dtype: torch.dtype | None = None, copy: bool = False) -> Tensor:
        t = self._read(name, None, dtype)
        return t.clone() if copy else t  # a tensor read as stored may share the file's mapping

    def read_index(self, name: str, index: int, dtype: torch.dtype | None = None) -> Tensor:
        return self._read(name, index, dtype)

    def _get(self, name: str, index: int | None) -> Tensor:
        return self.raw.read(name) if index is None else self.raw.read_index(name, index)

    def _read(self, name: str, index: int | None, dtype) -> Tensor:
        if self._packed(name):  # [(E,) R, G, 16] + [(E,) R, G] -> [(E,) 32 G, R], as transformers dequantizes
            blocks, scales = self._get(f"{name}_blocks", index), self._get(f"{name}_scales", index)
            R, G = blocks.shape[-3:-1]
            _check(self.fmt, name, blocks.shape[-3:], scales.shape[-2:], R, G * 32)
            if blocks.shape[:-1] != scales.shape:
                raise CheckpointError(f"{name}_blocks {tuple(blocks.shape)} and {name}_scales "
                                      f"{tuple(scales.shape)} do not match")
            t = dequantize_mxfp4(blocks, scales, torch.float32).transpose(-1, -2)
        else:
            t = self._get(name, index)
            if t.dtype in FLOAT8:
                t = self._dequantize_fp8(name, t, index)
        return t if dtype is None else t.to(dtype)

    def _dequantize_fp8(self, name: str, q: Tensor, index: int | None) -> Tensor:
        """q [(E,) N, K] float8 -> float32 with `<name>_scale_inv` [(E,) ceil(N / bn), ceil(K / bk)]."""
        if not isinstance(self.fmt, Fp8):
            raise CheckpointError(f"tensor {name} is float8, but config.json's quantization_config is not fp8")
        scale = f"{name}_scale_inv"
        if scale not in self.raw:
            raise CheckpointError(f"{self.root}: FP8 tensor {name} has no {scale} (its block scales)")
        s = self._get(scale, index).float()
        flat_q, flat_s = q.reshape(-1, *q.shape[-2:]), s.reshape(-1, *s.shape[-2:])
        if q.dim() < 2 or flat_q.shape[0] != flat_s.shape[0]:
            raise CheckpointError(f"FP8 tensor {name} {tuple(q.shape)} and {scale} {tuple(s.shape)} do not match")
        _check(self.fmt, name, q.shape[-2:], s.shape[-2:], *q.shape[-2:])
        out = [dequantize_fp8(qi, si, self.fmt.block, torch.float32) for qi, si in zip(flat_q, flat_s)]
        return torch.stack(out).view(q.shape)


# --- one routed expert, quantized ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class QuantizedExpert:
    q_in: Tensor  # MXFP4: blocks [N, D/32, 16] uint8; FP8: bytes [N, D] uint8
    s_in: Tensor  # MXFP4: scales [N, D/32] uint8; FP8: scale_inv [parts * ceil(N / parts / bn), ceil(D / bk)] f32
    q_out: Tensor  # [D, I/32, 16] or [D, I]
    s_out: Tensor  # [D, I/32] or [ceil(D / bn), ceil(I / bk)]
    b_in: Tensor | None = None  # [N]
    b_out: Tensor | None = None  # [D]
    parts_in: int = 1  # scale grids stacked in w_in: 2 for FP8 gate and up stored apart


def read_expert(ckpt, fmt: Mxfp4 | Fp8, layout, prefix: str, e: int, D: int, I: int) -> QuantizedExpert:
    """Expert e of the block at `prefix` (ckpt: the raw `store.Checkpoint`), in the bank's uniform layout."""
    if isinstance(layout, Fused) and (isinstance(fmt, Mxfp4) or not (layout.transposed or layout.interleaved)):
        return _fused(ckpt, fmt, layout, prefix, e, D, I)
    if isinstance(layout, PerExpert) and isinstance(fmt, Fp8):
        return _per_expert(ckpt, fmt, layout, prefix, e, D, I)
    raise UnsupportedModelError(f"{prefix}: pre-quantized {fmt.name} experts stored as {layout} are not supported "
                                "(MXFP4: GPT-OSS's fused experts; FP8: per-expert or untransposed fused tensors)")


def _pair(ckpt, fmt, name: str, e: int | None, rows: int, cols: int) -> tuple[Tensor, Tensor]:
    """One projection [rows, cols]: (payload, scales) as stored; e indexes a fused [E, ...] tensor."""
    q_name, s_name = (f"{name}_blocks", f"{name}_scales") if isinstance(fmt, Mxfp4) else (name, f"{name}_scale_inv")
    for n in (q_name, s_name):
        if n not in ckpt:
            raise CheckpointError(f"{ckpt.root}: pre-quantized ({fmt.name}) tensor {n!r} is missing")
    q_shape, s_shape = ckpt.shape(q_name), ckpt.shape(s_name)
    if e is not None:
        if min(q_shape[0], s_shape[0]) <= e:
            raise CheckpointError(f"{q_name} {q_shape} / {s_name} {s_shape} hold fewer experts than config.json's")
        q_shape, s_shape = q_shape[1:], s_shape[1:]
    _check(fmt, name, q_shape, s_shape, rows, cols)
    q, s = (ckpt.read(q_name), ckpt.read(s_name)) if e is None else (ckpt.read_index(q_name, e),
                                                                    ckpt.read_index(s_name, e))
    return (q, s) if isinstance(fmt, Mxfp4) else (q.view(torch.uint8), s.float())


def _fused(ckpt, fmt, layout: Fused, prefix: str, e: int, D: int, I: int) -> QuantizedExpert:
    if isinstance(fmt, Mxfp4) and not layout.transposed:
        raise UnsupportedModelError(f"{prefix}: MXFP4 experts are read as transformers stores GPT-OSS's (blocks of "
                                    "the transposed tensors); this layout is not transposed")
    q_in, s_in = _pair(ckpt, fmt, f"{prefix}.{layout.gate_up}", e, 2 * I, D)  # rows (gate, up) or interleaved
    q_out, s_out = _pair(ckpt, fmt, f"{prefix}.{layout.down}", e, D, I)
    b_in = _bias(ckpt, prefix, layout.gate_up_bias, e, (2 * I,))
    b_out = _bias(ckpt, prefix, layout.down_bias, e, (D,))
    if layout.interleaved:  # MXFP4 scales are per row: reordering rows keeps each row's blocks with its scales
        q_in, s_in = _deinterleave(q_in), _deinterleave(s_in)
        b_in = None if b_in is None else _deinterleave(b_in)
    return QuantizedExpert(q_in, s_in, q_out, s_out, b_in, b_out)


def _per_expert(ckpt, fmt: Fp8, layout: PerExpert, prefix: str, e: int, D: int, I: int) -> QuantizedExpert:
    def name(template):
        return f"{prefix}.{template.format(e=e)}"

    parts = [_pair(ckpt, fmt, name(t), None, I, D) for t in (layout.gate, layout.up) if t]  # [I, D] each
    q_out, s_out = _pair(ckpt, fmt, name(layout.down), None, D, I)
    b_in = None if layout.up_bias is None else _bias(ckpt, prefix, layout.up_bias.format(e=e), None, (I,))
    b_out = None if layout.down_bias is None else _bias(ckpt, prefix, layout.down_bias.format(e=e), None, (D,))
    return QuantizedExpert(torch.cat([q for q, _ in parts]), torch.cat([s for _, s in parts]), q_out, s_out,
                           b_in, b_out, parts_in=len(parts))


def _bias(ckpt, prefix: str, name: str | None, e: int | None, shape: tuple[int, ...]) -> Tensor | None:
    full = f"{prefix}.{name}"
    if name is None or full not in ckpt:
        return None
    b = ckpt.read(full) if e is None else ckpt.read_index(full, e)
    if tuple(b.shape) != shape:
        raise CheckpointError(f"expert tensor {full} has shape {tuple(b.shape)}, expected {shape} from config.json")
    return b


def _deinterleave(t: Tensor) -> Tensor:
    """Rows g0, u0, g1, u1, ... -> g0, g1, ..., u0, u1, ... (moedeploy's gate-then-up w_in)."""
    return torch.cat([t[0::2], t[1::2]])
