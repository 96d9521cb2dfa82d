"""`QuantizedDiskStore`: one MoE layer's quantized experts (int8 / int4, quant/bank.py's buffers stacked
[E, ...]) in a safetensors file of moedeploy's quantized cache (quant/cache.py writes and checks it), read
one expert at a time (tensorfile.py: the pages read leave the process as reading goes on): the disk tier of
quantized experts.

`read(e)` returns expert e's tensors in `QuantizedBank.tensors()` order (the file's tensor order is its
own, sorted by name: the cache's manifest records the bank's), as stored, so a slot copy moves the
quantized bytes unchanged. `shapes()` gives each tensor's [E, ...] shape and dtype from the file's header,
so the layer's bank can be built on the meta device (`QuantizedBank.shaped`): no expert bytes in the process
until a pool copies one into a slot.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError
from .tensorfile import TensorFile


class QuantizedDiskStore:
    def __init__(self, path: str | Path, names: tuple[str, ...], num_experts: int):
        self.path = Path(path)
        self.names = tuple(names)  # QuantizedBank.tensors() order
        self.num_experts = num_experts
        self._handle: TensorFile | None = None

    @property
    def size(self) -> int:
        return self.num_experts

    def _file(self) -> TensorFile:
        if self._handle is None:
            try:
                self._handle = TensorFile(self.path)
            except CheckpointError as ex:
                raise CheckpointError(f"moedeploy's quantized cache {self.path} is truncated or corrupt; delete it "
                                      "and load again to rebuild it") from ex
        return self._handle

    def read(self, expert: int) -> tuple[Tensor, ...]:
        f = self._file()
        return tuple(f.read(name, expert) for name in self.names)

    def read_into(self, expert: int, dst: tuple[Tensor, ...]) -> bool:
        """Expert `expert` straight into `dst` (slot views in `read`'s order) on the CPU: one copy from the OS's
        page cache, no page of the file left in the process. False (CUDA slots): use `read`."""
        if any(t.device.type != "cpu" or not t.is_contiguous() for t in dst):
            return False
        f = self._file()
        for name, t in zip(self.names, dst, strict=True):
            f.read_into(name, expert, t)
        return True

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> ([E, ...] shape, dtype) for each tensor, in `read` order, from the file's header."""
        f = self._file()
        out = {}
        for name in self.names:
            e = f.entry(name)
            if not e.shape or e.shape[0] != self.num_experts:
                raise CheckpointError(f"{self.path}: tensor {name} is {e.dtype} {list(e.shape)}, not "
                                      f"[{self.num_experts}, ...] experts; delete the file and load again")
            out[name] = (e.shape, e.dtype)
        return out

    def release(self) -> None:
        """Drop the pages read and let the mapping go (the next read maps the file again)."""
        if self._handle is not None:
            self._handle.close()
