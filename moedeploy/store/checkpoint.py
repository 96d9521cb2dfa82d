"""Read tensors by name from a Hugging Face checkpoint directory's safetensors files.

Files are memory-mapped (`safe_open`): reading one tensor, or one expert's slice of a fused tensor,
touches only those bytes. This module knows nothing about models; it validates that the directory is
a checkpoint and that its files are whole, and says so clearly when they are not.

Pages read through a mapping stay in the process's resident memory while the file is mapped, though
their bytes were copied elsewhere. `release()` unmaps every file (the loader calls it after each layer's
experts are stacked, and when loading ends; the weights it keeps are read with `copy=True`); the next
read maps the file again.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError


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
        self._where: dict[str, Path] = {}  # tensor name -> its file
        self._open: dict[Path, object] = {}  # file -> safe_open handle (mapped) until release()
        for file in files:
            for name in self._map(file).keys():
                self._where[name] = file

    def _map(self, file: Path):
        handle = self._open.get(file)
        if handle is None:
            try:
                handle = self._open[file] = safe_open(str(file), framework="pt")
            except Exception as ex:  # safetensors raises its own error type for a bad header or short file
                raise CheckpointError(
                    f"{file} is not a readable safetensors file ({ex}); it may be truncated or corrupt: "
                    "copy or download it again"
                ) from ex
        return handle

    def release(self) -> None:
        """Unmap every file: the pages read so far leave this process (tensors read keep their own copies)."""
        self._open.clear()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def has_prefix(self, prefix: str) -> bool:
        return any(name.startswith(prefix) for name in self._where)

    def _handle(self, name: str):
        try:
            return self._map(self._where[name])
        except KeyError:
            raise CheckpointError(f"{self.root}: tensor {name!r} is missing from the checkpoint") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, dtype: torch.dtype | None = None, copy: bool = False) -> torch.Tensor:
        """Tensor `name` (in `dtype`). safetensors' tensors share the file's mapping, which then stays mapped,
        pages and all, while they live: `copy=True` for one kept beyond loading (it owns its memory)."""
        t = self._handle(name).get_tensor(name)
        return t if dtype is None and not copy else t.to(dtype or t.dtype, copy=copy)

    def read_index(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """`read(name)[index]` without reading the rest of the tensor (one expert of a fused tensor)."""
        t = self._handle(name).get_slice(name)[index]
        return t if dtype is None else t.to(dtype)
