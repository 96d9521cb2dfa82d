"""Expert stores: where the experts that are not in device slots wait, read one expert at a time.

- `DiskStore`: one MoE layer's experts in the checkpoint's safetensors files, read as needed.
  `read(e)` touches only expert e's bytes, so a model whose experts exceed host RAM still runs (the
  layer then keeps a bank on the meta device: shapes, no memory). `bank()` stacks every expert into
  host memory, one at a time, for the layer's own `ExpertBank`.
- `HostStore`: every expert of a layer in host memory (the layer's `ExpertBank`).

A budget without a named store gets `default_store(...)`: disk on the CPU, host on a GPU.

`DiskStore.subset(ids)` is the same store over some experts only, renumbered: a rank's slots under
expert parallelism (a rank holds at most one replica of an expert).

`read(e)` returns expert e's tensors in `ExpertBank.tensors()` order (w_in, w_out, then any biases),
in the store's dtype; copying into a slot converts to the model's dtype exactly as loading does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..errors import CheckpointError
from ..experts import Activation, ExpertBank
from .checkpoint import Checkpoint

STORES = ("host", "disk")


def default_store(device: torch.device, budget: bool, prequantized: bool) -> str:
    """The store when none is named. Under a budget on the CPU, "disk": the slots are host memory too, so a host
    store (every expert in host memory, plus the slots) would hold more than no budget; but a pre-quantized
    checkpoint's shipped form (MXFP4, FP8) stays small in the host store only (the disk store dequantizes it).
    Otherwise "host": on a GPU, and without a budget (every expert is in the bank)."""
    return "disk" if budget and device.type == "cpu" and not prequantized else "host"
FIELDS = ("w_in", "w_out", "b_in", "b_out")  # ExpertBank.tensors() order


@dataclass(frozen=True)
class HostStore:
    bank: ExpertBank

    def read(self, expert: int) -> tuple[Tensor, ...]:
        return tuple(t[expert] for t in self.bank.tensors())

    def read_into(self, expert: int, dst: tuple[Tensor, ...]) -> bool:
        """False: the pool copies `read`'s views of the bank (with the step's other copies, in one call)."""
        return False


@dataclass(frozen=True)
class DiskStore:
    ckpt: Checkpoint
    layout: object  # models.layouts.PerExpert | Fused: how this checkpoint names the layer's experts
    prefix: str  # the MoE block's tensor name prefix in the checkpoint
    num_experts: int
    D: int  # hidden size
    I: int  # intermediate size of one expert
    activation: Activation
    ids: tuple[int, ...] | None = None  # a subset (expert parallelism): expert i here is ids[i] in the checkpoint

    @property
    def size(self) -> int:
        """Experts in this store: the layer's, or the subset's."""
        return self.num_experts if self.ids is None else len(self.ids)

    def subset(self, ids) -> "DiskStore":
        """A view of some of the layer's experts, renumbered 0..len(ids)-1 (a rank's slots)."""
        return replace(self, ids=tuple(int(e) for e in ids))

    def _tensors(self, expert: int):  # -> models.layouts.ExpertTensors
        e = expert if self.ids is None else self.ids[expert]
        return self.layout.read(self.ckpt, self.prefix, e, self.D, self.I)

    def read(self, expert: int) -> tuple[Tensor, ...]:
        t = self._tensors(expert)
        return tuple(getattr(t, name) for name in FIELDS if getattr(t, name) is not None)

    def read_into(self, expert: int, dst: tuple[Tensor, ...]) -> bool:
        """Expert `expert` straight into `dst` (slot views in `read`'s order) where the checkpoint stores it as the
        slots hold it (the same dtype, on the CPU, no transpose or interleave): one copy from the OS's page cache
        and no page of the file left in the process. False: nothing was read; use `read`."""
        if not isinstance(self.ckpt, Checkpoint) or any(t.device.type != "cpu" for t in dst):
            return False  # a pre-quantized checkpoint reads dequantized; CUDA slots take `read`'s views
        e = expert if self.ids is None else self.ids[expert]
        pieces = self.layout.pieces(self.ckpt, self.prefix, e, self.I)
        if pieces is None:
            return False
        fields = [name for name in FIELDS if any(p.field == name for p in pieces)]
        if len(fields) != len(dst):
            return False
        out = dict(zip(fields, dst, strict=True))
        targets = [out[p.field][p.rows] for p in pieces]
        if any(self.ckpt.dtype(p.name) != t.dtype or not t.is_contiguous() for p, t in zip(pieces, targets)):
            return False
        for p, t in zip(pieces, targets, strict=True):
            stored = self.ckpt.shape(p.name)[0 if p.index is None else 1:]
            if tuple(stored) != tuple(t.shape):
                raise CheckpointError(f"expert tensor {p.name} has shape {tuple(stored)}, expected "
                                      f"{tuple(t.shape)} from config.json")
        for p, t in zip(pieces, targets, strict=True):
            self.ckpt.read_into(p.name, p.index, t)
        return True

    def bank(self, dtype: torch.dtype, device: str = "cpu") -> ExpertBank:
        """Every expert stacked [E, ...] in `dtype`: read one expert at a time on "cpu" (never the layer
        twice in memory); shapes only on "meta"."""
        first = self._tensors(0)
        stacks = {name: torch.empty((self.size, *getattr(first, name).shape), dtype=dtype, device=device)
                  for name in FIELDS if getattr(first, name) is not None}
        if device != "meta":
            for e in range(self.size):
                t = first if e == 0 else self._tensors(e)
                for name, stack in stacks.items():
                    stack[e] = getattr(t, name)
        return ExpertBank(stacks["w_in"], stacks["w_out"], self.activation, stacks.get("b_in"), stacks.get("b_out"))
