"""Expert stores: where the experts that are not in device slots wait, read one expert at a time.

- `DiskStore`: one MoE layer's experts in the checkpoint's safetensors files, memory-mapped.
  `read(e)` touches only expert e's bytes, so a model whose experts exceed host RAM still runs (the
  layer then keeps a bank on the meta device: shapes, no memory). `bank()` stacks every expert into
  host memory, one at a time, for the layer's own `ExpertBank`.
- `HostStore`: every expert of a layer in host memory (the layer's `ExpertBank`).

`DiskStore.subset(ids)` is the same store over some experts only, renumbered: a rank's slots under
expert parallelism (a rank holds at most one replica of an expert).

`read(e)` returns expert e's tensors in `ExpertBank.tensors()` order (w_in, w_out, then any biases),
in the store's dtype; copying into a slot converts to the model's dtype exactly as loading does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..experts import Activation, ExpertBank
from .checkpoint import Checkpoint

STORES = ("host", "disk")
FIELDS = ("w_in", "w_out", "b_in", "b_out")  # ExpertBank.tensors() order


@dataclass(frozen=True)
class HostStore:
    bank: ExpertBank

    def read(self, expert: int) -> tuple[Tensor, ...]:
        return tuple(t[expert] for t in self.bank.tensors())


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
