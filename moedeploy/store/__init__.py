"""Where expert weights live: `Checkpoint` reads tensors by name from a checkpoint's safetensors files;
`HostStore` and `DiskStore` hand the expert cache one expert at a time (experts.py), and
`QuantizedDiskStore` one quantized expert from moedeploy's quantized cache (quantized.py)."""

from .checkpoint import Checkpoint
from .experts import STORES, DiskStore, HostStore, default_store
from .quantized import QuantizedDiskStore

__all__ = ["STORES", "Checkpoint", "DiskStore", "HostStore", "QuantizedDiskStore", "default_store"]
