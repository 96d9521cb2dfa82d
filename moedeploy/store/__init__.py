"""Where expert weights live: `Checkpoint` reads tensors by name from a checkpoint's safetensors files;
`HostStore` and `DiskStore` hand the expert cache one expert at a time (experts.py)."""

from .checkpoint import Checkpoint
from .experts import STORES, DiskStore, HostStore

__all__ = ["Checkpoint", "DiskStore", "HostStore", "STORES"]
