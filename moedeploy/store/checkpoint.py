"""Read tensors by name from a Hugging Face checkpoint directory's safetensors files.

Reading one tensor, or one expert's slice of a fused tensor, touches only those bytes: they are views of the
file's mapping (tensorfile.py), whose pages leave the process's memory as reading goes on, so an expert store
reading one expert per miss holds its slots, not the checkpoint. A tensor kept beyond loading is read with
`copy=True` (it owns its memory). This module knows nothing about models; it validates that the directory
is a checkpoint and that its files are whole, and says so clearly when they are not.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from .tensorfile import TensorFile


def _safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as ex:
            raise CheckpointError(f"{index} is not a valid safetensors index ({ex}); re-save the checkpoint") from ex
        files = [root / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{root} is incomplete: the index names {', '.join(missing)}, which are missing")
        return files
    return sorted(root.glob("*.safetensors"))


class Checkpoint:
    def __init__(self, path: str | Path):
        root = Path(path)
        if not root.is_dir():
            raise CheckpointError(f"{root} is not a directory; pass the folder that holds config.json and *.safetensors")
        if not (root / "config.json").is_file():
            raise CheckpointError(f"{root} has no config.json, so it is not a Hugging Face checkpoint directory")
        files = _safetensors_files(root)
        if not files:
            raise CheckpointError(
                f"{root} has no *.safetensors files; moedeploy reads safetensors only "
                "(re-save the model with save_pretrained(..., safe_serialization=True))"
            )
        self.root = root
        self._files = {file: TensorFile(file) for file in files}  # headers checked here
        self._where: dict[str, TensorFile] = {name: f for f in self._files.values() for name in f.entries}

    def release(self) -> None:
        """Drop every page read so far from the process and let the mappings go (the next read maps again)."""
        for f in self._files.values():
            f.close()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def has_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self._where)

    def _file(self, name: str) -> TensorFile:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name!r} is missing from the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).entry(name).shape

    def read(self, name: str, dtype: torch.dtype | None = None, copy: bool = False) -> torch.Tensor:
        """Tensor `name` (in `dtype`): a view of the file's mapping unless converted, or `copy=True` for one kept
        beyond loading (it owns its memory)."""
        t = self._file(name).read(name)
        return t if dtype is None and not copy else t.to(dtype or t.dtype, copy=copy)

    def dtype(self, name: str) -> torch.dtype:
        return self._file(name).entry(name).dtype

    def read_into(self, name: str, index: int | None, out: torch.Tensor) -> None:
        """`read(name)` (or its [index]) straight into `out`, contiguous on the CPU in the stored dtype: one copy
        from the OS's page cache, no page of the file left in the process (an expert store's miss)."""
        self._file(name).read_into(name, index, out)

    def read_index(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`read(name)[index]` without reading the rest of the tensor (one expert of a fused tensor)."""
        t = self._file(name).read(name, index)
        return t if dtype is None else t.to(dtype)
