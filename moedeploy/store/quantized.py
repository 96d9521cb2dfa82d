"""`QuantizedDiskStore`: one MoE layer's quantized experts (int8 / int4, quant/bank.py's buffers stacked
[E, ...]) in a safetensors file of moedeploy's quantized cache (quant/cache.py writes and checks it),
memory-mapped and read one expert at a time: the disk tier of quantized experts.

`read(e)` returns expert e's tensors in `QuantizedBank.tensors()` order (the file's tensor order is its
own, sorted by name: the cache's manifest records the bank's), as stored, so a slot copy moves the
quantized bytes unchanged. `shapes()` gives each tensor's [E, ...] shape and dtype from the file's header,
so the layer's bank can be built on the meta device (`QuantizedBank.shaped`): no expert bytes in the process
until a pool copies one into a slot. Like `Checkpoint`, the file stays mapped once read; `release()` unmaps it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from ..errors import CheckpointError

DTYPES = {"I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
          "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}


class QuantizedDiskStore:
    def __init__(self, path: str | Path, names: tuple[str, ...], num_experts: int):
        self.path = Path(path)
        self.names = tuple(names)  # QuantizedBank.tensors() order
        self.num_experts = num_experts
        self._handle = None

    @property
    def size(self) -> int:
        return self.num_experts

    def _file(self):
        if self._handle is None:
            try:
                self._handle = safe_open(str(self.path), framework="pt")
            except Exception as ex:  # safetensors' own error type for a bad header or a short file
                raise CheckpointError(f"{self.path} (moedeploy's quantized cache) is not readable ({ex}); delete "
                                      "it and load again to rebuild it") from ex
        return self._handle

    def read(self, expert: int) -> tuple[Tensor, ...]:
        f = self._file()
        return tuple(f.get_slice(name)[expert] for name in self.names)

    def shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """name -> ([E, ...] shape, dtype) for each tensor, in `read` order, from the file's header."""
        f = self._file()
        out = {}
        for name in self.names:
            s = f.get_slice(name)
            shape, dtype = tuple(s.get_shape()), DTYPES.get(s.get_dtype())
            if dtype is None or not shape or shape[0] != self.num_experts:
                raise CheckpointError(f"{self.path}: tensor {name} is {s.get_dtype()} {list(shape)}, not "
                                      f"[{self.num_experts}, ...] experts; delete the file and load again")
            out[name] = (shape, dtype)
        return out

    def release(self) -> None:
        """Unmap the file (the next read maps it again)."""
        self._handle = None
