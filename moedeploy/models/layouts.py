"""How checkpoints name and shape expert tensors on disk, and how to read one expert into the uniform
layout of `experts.py` (w_in [N, D] with rows gate then up, w_out [D, I], optional biases).

Two kinds exist in the wild: one tensor per expert and projection (`PerExpert`, e.g. Mixtral's
`experts.3.w1.weight`), and one tensor for all experts (`Fused`, e.g. transformers 5's in-memory
`experts.gate_up_proj` [E, 2I, D], GraniteMoE's `input_linear.weight`, GPT-OSS's transposed and
interleaved `experts.gate_up_proj` [E, D, 2I]). Names are relative to the MoE block's prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..store import Checkpoint


@dataclass(frozen=True)
class ExpertTensors:
    w_in: Tensor  # [N, D]
    w_out: Tensor  # [D, I]
    b_in: Tensor | None = None  # [N]
    b_out: Tensor | None = None  # [D]


@dataclass(frozen=True)
class Piece:
    """One stored tensor of an expert and where it lands in the uniform layout, as stored (no transform)."""

    field: str  # "w_in", "w_out", "b_in" or "b_out"
    rows: slice  # of that field
    name: str  # the checkpoint tensor
    index: int | None  # along its first axis (a fused tensor), or None (the whole tensor)


def _expect(name: str, shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(shape) != expected:
        raise CheckpointError(f"expert tensor {name} has shape {tuple(shape)}, expected {expected} from config.json")


def _check_header(ckpt: Checkpoint, name: str, expected: tuple[int, ...]) -> None:
    """`name` is in the checkpoint with the shape config.json implies: from the file's header, no data read."""
    if name not in ckpt:
        raise CheckpointError(f"{ckpt.root}: expert tensor {name!r} is missing")
    _expect(name, ckpt.shape(name), expected)


def _check(name: str, t: Tensor, expected: tuple[int, ...]) -> Tensor:
    _expect(name, t.shape, expected)
    return t


@dataclass(frozen=True)
class PerExpert:
    up: str  # templates with {e}; `up` is the whole first projection when `gate` is None
    down: str
    gate: str | None = None
    up_bias: str | None = None
    down_bias: str | None = None

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return f"{prefix}.{self.up.format(e=0)}" in ckpt

    def read(self, ckpt: Checkpoint, prefix: str, e: int, D: int, I: int) -> ExpertTensors:
        def get(template, shape):
            name = f"{prefix}.{template.format(e=e)}"
            if name not in ckpt:
                raise CheckpointError(f"{ckpt.root}: expert tensor {name!r} is missing (expert {e} of {prefix})")
            return _check(name, ckpt.read(name), shape)

        up = get(self.up, (I, D))
        w_in = up if self.gate is None else torch.cat([get(self.gate, (I, D)), up], dim=0)
        return ExpertTensors(
            w_in=w_in,
            w_out=get(self.down, (D, I)),
            b_in=None if self.up_bias is None else get(self.up_bias, (I,)),
            b_out=None if self.down_bias is None else get(self.down_bias, (D,)),
        )

    def check(self, ckpt: Checkpoint, prefix: str, E: int, D: int, I: int) -> None:
        """Every expert's tensors are there with their shapes (headers only): a disk store reads experts only
        when they are routed to, so a gap would surface mid-run, or never."""
        shapes = ((self.gate, (I, D)), (self.up, (I, D)), (self.down, (D, I)), (self.up_bias, (I,)),
                  (self.down_bias, (D,)))
        for e in range(E):
            for template, shape in shapes:
                if template is not None:
                    _check_header(ckpt, f"{prefix}.{template.format(e=e)}", shape)

    def pieces(self, ckpt: Checkpoint, prefix: str, e: int, I: int) -> list[Piece] | None:
        """`read`'s tensors as stored, for a read straight into a slot; None where one is missing (`read` says)."""
        whole = slice(None)
        pieces = ([Piece("w_in", whole, self.up, None)] if self.gate is None else
                  [Piece("w_in", slice(0, I), self.gate, None), Piece("w_in", slice(I, 2 * I), self.up, None)])
        pieces.append(Piece("w_out", whole, self.down, None))
        pieces += [Piece(field, whole, t, None) for field, t in (("b_in", self.up_bias), ("b_out", self.down_bias))
                   if t is not None]
        pieces = [Piece(p.field, p.rows, f"{prefix}.{p.name.format(e=e)}", None) for p in pieces]
        return pieces if all(p.name in ckpt for p in pieces) else None


@dataclass(frozen=True)
class Fused:
    gate_up: str  # [E, 2I, D], or [E, D, 2I] when transposed
    down: str  # [E, D, I], or [E, I, D] when transposed
    gate_up_bias: str | None = None  # [E, 2I]
    down_bias: str | None = None  # [E, D]
    transposed: bool = False
    interleaved: bool = False  # gate/up rows alternate (GPT-OSS) instead of gate block then up block
    biases_required: bool = False  # the family's experts always have biases (GPT-OSS): a missing one is an error

    def present(self, ckpt: Checkpoint, prefix: str) -> bool:
        return f"{prefix}.{self.gate_up}" in ckpt

    def check(self, ckpt: Checkpoint, prefix: str, E: int, D: int, I: int) -> None:
        """The fused tensors hold exactly E experts of the shapes config.json implies (headers only); biases
        where present."""
        _check_header(ckpt, f"{prefix}.{self.gate_up}", (E, D, 2 * I) if self.transposed else (E, 2 * I, D))
        _check_header(ckpt, f"{prefix}.{self.down}", (E, I, D) if self.transposed else (E, D, I))
        for name, shape in ((self.gate_up_bias, (E, 2 * I)), (self.down_bias, (E, D))):
            if name is not None and (self.biases_required or f"{prefix}.{name}" in ckpt):
                _check_header(ckpt, f"{prefix}.{name}", shape)

    def read(self, ckpt: Checkpoint, prefix: str, e: int, D: int, I: int) -> ExpertTensors:
        def get(name, shape):
            full = f"{prefix}.{name}"
            if full not in ckpt:
                raise CheckpointError(f"{ckpt.root}: expert tensor {full!r} is missing")
            E = ckpt.shape(full)[0]
            if e >= E:
                raise CheckpointError(f"expert tensor {full} holds {E} experts, config.json says more")
            t = ckpt.read_index(full, e)
            return _check(full, t.T if self.transposed and t.dim() == 2 else t, shape)

        w_in = get(self.gate_up, (2 * I, D))
        b_in = None
        if self.gate_up_bias is not None and f"{prefix}.{self.gate_up_bias}" in ckpt:
            b_in = get(self.gate_up_bias, (2 * I,))
        if self.interleaved:
            w_in = torch.cat([w_in[0::2], w_in[1::2]], dim=0)
            b_in = None if b_in is None else torch.cat([b_in[0::2], b_in[1::2]])
        b_out = None
        if self.down_bias is not None and f"{prefix}.{self.down_bias}" in ckpt:
            b_out = get(self.down_bias, (D,))
        return ExpertTensors(w_in=w_in, w_out=get(self.down, (D, I)), b_in=b_in, b_out=b_out)

    def pieces(self, ckpt: Checkpoint, prefix: str, e: int, I: int) -> list[Piece] | None:
        """`read`'s tensors as stored, for a read straight into a slot; None where they need a transform
        (transposed, interleaved) or one is missing."""
        if self.transposed or self.interleaved:
            return None
        whole, names = slice(None), (("w_in", self.gate_up), ("w_out", self.down), ("b_in", self.gate_up_bias),
                                     ("b_out", self.down_bias))
        pieces = [Piece(field, whole, f"{prefix}.{name}", e) for field, name in names
                  if name is not None and f"{prefix}.{name}" in ckpt]
        return pieces if {p.field for p in pieces} >= {"w_in", "w_out"} else None


# Tried in order; the first whose expert-0 tensor is present wins.
GENERIC_LAYOUTS = (
    PerExpert(gate="experts.{e}.gate_proj.weight", up="experts.{e}.up_proj.weight", down="experts.{e}.down_proj.weight"),
    PerExpert(gate="experts.{e}.w1.weight", up="experts.{e}.w3.weight", down="experts.{e}.w2.weight"),
    Fused(gate_up="experts.gate_up_proj", down="experts.down_proj",
          gate_up_bias="experts.gate_up_proj_bias", down_bias="experts.down_proj_bias"),
    Fused(gate_up="input_linear.weight", down="output_linear.weight"),
)
