"""Load options: one small validated dataclass, built at the API/CLI edge and passed down."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache.budget import CacheConfig
from .errors import OptionError
from .layer import Gating
from .static_gating import Capacity

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(value) -> torch.dtype | None:
    """'auto' (the checkpoint's dtype) -> None; a name or torch.dtype -> torch.dtype."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise OptionError(f"unknown dtype {value!r}; choose one of: auto, {', '.join(DTYPES)}")


def parse_device(value) -> torch.device:
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as ex:
        raise OptionError(f"unknown device {value!r}; use 'cpu', 'cuda' or 'cuda:N'") from ex
    if device.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"device {value!r} was asked for, but this machine has no CUDA device; use device='cpu'")
    if device.type not in ("cpu", "cuda"):
        raise OptionError(f"device type {device.type!r} is not supported; use 'cpu' or 'cuda'")
    return device


@dataclass(frozen=True)
class LoadOptions:
    device: torch.device
    dtype: torch.dtype | None  # None: the checkpoint's own dtype
    gating: Gating
    cache: CacheConfig | None = None  # set when an expert memory budget is
    expert_store: str | None = None  # where experts outside the device slots wait: "host" memory or "disk";
    # None: store.default_store's choice for the device and checkpoint (the loader resolves it)
    buffered: bool = False  # an expert memory budget: experts stay in their store, slots on the device
    sharding: object | None = None  # parallel.Sharding: this rank's experts of an expert-parallel run
    quant: object | None = None  # quant.QuantSpec: routed experts quantized as they load (int8, int4)

    @classmethod
    def build(cls, device="cpu", dtype="auto", gating="dynamic", capacity_factor=None, capacity_fraction=None,
              backend="auto") -> "LoadOptions":
        capacity = None
        if capacity_factor is not None or capacity_fraction is not None:
            capacity = Capacity(factor=capacity_factor, fraction=capacity_fraction)
        return cls(device=parse_device(device), dtype=parse_dtype(dtype),
                   gating=Gating(mode=gating, capacity=capacity, backend=backend))
