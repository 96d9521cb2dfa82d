"""Where expert weights live. `Checkpoint` reads tensors by name from a checkpoint's safetensors files."""

from .checkpoint import Checkpoint

__all__ = ["Checkpoint"]
