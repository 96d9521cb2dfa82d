"""One safetensors file, read so that the pages read do not stay in the process.

safetensors' own reader (`safe_open`) maps the file, and every page read through the mapping stays in the
process's resident memory while the file is mapped, though its bytes were copied elsewhere: an expert store
reading one expert per miss would, over a long run, hold the whole checkpoint (its RSS grows past a
resident model's). Here:

- `read_into` reads a tensor (or one expert's slice) straight into a tensor of the caller's, a slot, by
  positional reads (`os.preadv`): one copy from the OS's page cache, nothing mapped (an expert store's miss);
- `read` gives a view of a mapping (no copy, as safetensors does: loading, and reads that convert), and once
  `DROP_BYTES` have been read the mapping's pages are dropped (`madvise(MADV_DONTNEED)`): they stay in the
  OS's page cache (shared, reclaimable, not the process's), and a view still in use reads its bytes again
  from there (the mapping is private and never written, so dropping a page never loses data).

The format (https://github.com/huggingface/safetensors): 8 bytes, the header's length N (little-endian), N
bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, then the data,
offsets relative to its start, each tensor C-contiguous. The header is checked against the file's size and
each tensor's byte count, so a truncated or corrupt file is refused when opened, not read as garbage. The
file is reopened (for the mapping, for positional reads) after `close`; a reopen checks that it is still the
file whose header was read (same inode, size and modification time), so a checkpoint replaced while in use
is refused, not read at its old offsets. A tensor in a dtype moedeploy does not read is refused when read,
not when the file is opened.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size
DROP_BYTES = 64 << 20  # bytes read between two drops of the mapping's pages: what the mapping may hold


@dataclass(frozen=True)
class Entry:
    dtype: torch.dtype | None  # None: a dtype moedeploy does not read (`kind` names it)
    kind: str  # the file's dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


class TensorFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._map: mmap.mmap | None = None
        self._read = 0  # bytes read through the mapping since the last drop
        self._fd: int | None = None  # the open file (positional reads; the mapping maps it)
        self._opening = threading.Lock()  # a miss and a prefetch may open the file at once
        self.entries, self._identity = _header(self.path)  # name -> Entry, in the file's order

    def entry(self, name: str) -> Entry:
        try:
            e = self.entries[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is missing") from None
        if e.dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {e.kind}, which moedeploy does not read")
        return e

    def _extent(self, name: str, index: int | None) -> tuple[Entry, int, int, tuple[int, ...]]:
        """Tensor `name`, or its `index`-th slice along the first axis: (entry, begin, end, shape)."""
        e = self.entry(name)
        if index is None:
            return e, e.begin, e.end, e.shape
        if not e.shape or not 0 <= index < e.shape[0]:
            raise CheckpointError(f"{self.path}: tensor {name!r} of shape {list(e.shape)} has no index {index}; "
                                  "the checkpoint holds fewer experts than its config.json says")
        row = (e.end - e.begin) // e.shape[0]
        return e, e.begin + index * row, e.begin + (index + 1) * row, e.shape[1:]

    def read(self, name: str, index: int | None = None) -> Tensor:
        """Tensor `name`, or its `index`-th slice along the first axis (one expert of a fused tensor), as a view
        of the file's mapping: copy what is kept beyond the next read."""
        e, begin, end, shape = self._extent(name, index)
        if end == begin:
            return torch.empty(shape, dtype=e.dtype)
        self._read += end - begin
        if self._read > DROP_BYTES:
            self.drop()
            self._read = end - begin
        raw = torch.frombuffer(self._mapping(), dtype=torch.uint8, count=end - begin, offset=begin)
        if begin % e.dtype.itemsize:  # not aligned for its dtype: a copy that is
            raw = raw.clone()
        return raw.view(e.dtype).view(shape)

    def read_into(self, name: str, index: int | None, out: Tensor) -> None:
        """`read(name, index)` straight into `out` (contiguous, on the CPU, its dtype and size) by positional reads:
        no mapping, no page of the file in the process, one copy (from the OS's page cache). Safe from several
        threads at once."""
        e, begin, end, _ = self._extent(name, index)
        if out.dtype != e.dtype or out.numel() * out.element_size() != end - begin or not out.is_contiguous():
            raise ValueError(f"{self.path}: {name!r}[{index}] ({e.dtype}, {end - begin} bytes) does not fit "
                             f"{out.dtype} {list(out.shape)}")
        if not hasattr(os, "preadv"):  # not on Windows: through the mapping
            out.reshape(-1).view(torch.uint8).copy_(self.read(name, index).reshape(-1).view(torch.uint8))
            return
        fd = self._file()
        view, done = memoryview(out.reshape(-1).view(torch.uint8).numpy()), 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], begin + done)
            if n == 0:
                raise CheckpointError(f"{self.path} ended early (truncated while in use?); copy it again")
            done += n

    def _file(self) -> int:
        """The open file, opened (again, after `close`) if need be, and checked to be the one whose header was read."""
        with self._opening:
            if self._fd is None:
                fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
                if _identity(os.fstat(fd)) != self._identity:
                    os.close(fd)
                    raise CheckpointError(f"{self.path} changed on disk since it was opened (replaced or rewritten); "
                                          "load the model again")
                self._fd = fd
            return self._fd

    def _mapping(self) -> mmap.mmap:
        if self._map is None:  # private (copy-on-write): a stray write never reaches the file
            self._map = mmap.mmap(self._file(), 0, access=mmap.ACCESS_COPY)
        return self._map

    def drop(self) -> None:
        """The pages read so far leave the process (views stay valid: they read them again if used)."""
        if self._map is not None and hasattr(self._map, "madvise"):  # madvise: not on Windows
            self._map.madvise(mmap.MADV_DONTNEED)

    def close(self) -> None:
        """Drop the pages and let the mapping go (unmapped once no view of it is left); close the file."""
        self.drop()
        self._map, self._read = None, 0
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self):
        if self._fd is not None:
            os.close(self._fd)


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _offset(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _header(path: Path) -> tuple[dict[str, Entry], tuple[int, ...]]:
    """The file's tensors, checked against its size, and the file's identity (`_identity`)."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path} is not a readable safetensors file ({why}); it may be truncated or corrupt: "
                               "copy or download it again")

    try:
        with open(path, "rb") as f:
            identity = _identity(os.fstat(f.fileno()))
            size = identity[2]
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its header")
            n = int.from_bytes(head, "little")
            if n > min(MAX_HEADER, size - 8):
                raise bad(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as ex:
        raise bad(str(ex)) from ex
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    header.pop("__metadata__", None)
    entries, start = {}, 8 + n
    for name, spec in header.items():
        try:
            kind, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        except (TypeError, KeyError, ValueError) as ex:
            raise bad(f"tensor {name!r} has no dtype, shape and data_offsets") from ex
        if not all(map(_offset, (*shape, begin, end))):
            raise bad(f"tensor {name!r} has shape {list(shape)} and data offsets {[begin, end]}: not counts of "
                      "elements and bytes")
        dtype = DTYPES.get(kind)
        if (dtype is not None and end - begin != math.prod(shape) * dtype.itemsize) or begin > end or start + end > size:
            raise bad(f"tensor {name!r} ({kind} {list(shape)}) spans bytes {begin}..{end} of {size - start}")
        entries[name] = Entry(dtype, str(kind), shape, start + begin, start + end)
    return entries, identity
