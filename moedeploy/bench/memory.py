"""Peak activation memory of a call, on any device, by watching the tensors torch allocates.

torch has no allocator statistics on CPU, so `StorageTracker` (a `TorchDispatchMode`) looks at every
tensor an operator returns while it is active. An output whose storage is new (not the storage of
one of the operator's inputs, and not already counted) is an allocation: its bytes are added to the
live total, and a `weakref.finalize` on the storage subtracts them when torch frees it. The peak of
the live total is the call's peak activation memory.

What it counts: every storage created by an operator inside the `with` block, views and in-place
results not counted twice, including the call's output. What it does not count: tensors that
existed before (weights, inputs: their views and in-place updates alias an input storage), memory a
kernel allocates and frees internally without returning it (BLAS/oneDNN workspaces, the
allocator's own slack), and Python objects. It slows the call down: measure memory and time in
separate calls.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_ptrs(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)}


class StorageTracker(TorchDispatchMode):
    """`with StorageTracker() as m: f()` -> `m.peak` bytes of tensor storage live at once inside."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}  # storage data_ptr -> nbytes, for storages allocated inside
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storage_ptrs((args, kwargs))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._record(t.untyped_storage(), inputs)
        return out

    def _record(self, storage: torch.UntypedStorage, inputs: set[int]) -> None:
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in inputs or ptr in self.live:
            return
        self.live[ptr] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, ptr, nbytes)  # runs when torch frees the storage

    def _free(self, ptr: int, nbytes: int) -> None:
        if self.live.get(ptr) == nbytes:
            del self.live[ptr]
            self.current -= nbytes


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensor storage allocated and live at once while `fn()` runs (its result included)."""
    with StorageTracker() as tracker:
        fn()
    return tracker.peak
