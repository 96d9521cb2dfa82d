"""moedeploy's quantized cache: a checkpoint's routed experts quantized once (int8 / int4, `QuantizedBank`)
and written to moedeploy's cache folder, so the disk tier of quantized experts maps them and reads one expert
at a time (store/quantized.py: `QuantizedDiskStore`); loads after the first quantize nothing.

Where (never beside the user's checkpoint): `cache_root()` is $MOEDEPLOY_CACHE, else $XDG_CACHE_HOME/moedeploy,
else ~/.cache/moedeploy; the cache of one checkpoint state is `quantized/<identity>-<state>/`, where

    identity = hash(the checkpoint's resolved path, expert dtype, group size, model dtype, FORMAT, and int4's
                    layout where it is not the CPU kernel's, with the arrangement of its scales)
    state    = hash(identity, and per checkpoint file (config.json, the safetensors index, every
               safetensors file) its name, byte size and mtime_ns)

so a changed checkpoint gets a new folder; the older folders of the same identity are stale, named in a
warning and removed once the new one is in place.

Contents: `layer_NNN.safetensors` per MoE layer (model order), holding the layer's QuantizedBank buffers
stacked [E, ...] under their buffer names (what `QuantizedBank.tensors()` gives); `manifest.json`, written
last, records the key (the fields above), per layer its module path, file, experts and tensor names in the
bank's order, and per file its byte size and the sha256 of the whole file.

Checks on every load, before anything is used: the manifest parses and its key equals this checkpoint's;
its layers are the model's; each file exists, has its recorded size (truncation) and its recorded sha256
(any changed byte, in the header or in an expert's data). The full sha256 reads the whole cache once per
load (files hashed in parallel threads; hashlib releases the GIL: about 1-2 GB/s per core, or the disk's
sequential read rate): a header-and-size check would be cheaper, but a flipped byte in an expert would
then run silently. Any failure gives one `QuantCacheWarning` saying what was wrong, and the folder is
rebuilt; it is never used.

Writes are atomic: a build writes into a temporary folder `.tmp-<name>-<pid>-...` beside the final one
(same file system), each file fsynced, the manifest last, then renames the folder into place. A crash
leaves only a temporary folder, which no load reads and a later build removes once its process is gone.
Two processes building the same cache at once each write their own; the first rename wins, the other
finds a whole cache in place, leaves it (the winner may be reading it) and uses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ..errors import CheckpointError, OptionError
from ..store.checkpoint import _safetensors_files
from ..store.quantized import QuantizedDiskStore
from .bank import QuantizedBank
from .formats import SCALE_ROWS, QuantSpec

FORMAT = 1  # bump when the files' layout or the quantization itself changes: old caches are then not found
MANIFEST = "manifest.json"
_SCRATCH = re.compile(r"^\.(?:tmp|old)-[0-9a-f]{16}-[0-9a-f]{16}-(\d+)-")

log = logging.getLogger(__name__)


class QuantCacheWarning(UserWarning):
    """moedeploy's quantized cache was unusable (stale, incomplete or corrupt) and is rebuilt."""


def cache_root() -> Path:
    """moedeploy's cache folder: $MOEDEPLOY_CACHE, else $XDG_CACHE_HOME/moedeploy, else ~/.cache/moedeploy."""
    if os.environ.get("MOEDEPLOY_CACHE"):
        return Path(os.environ["MOEDEPLOY_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "moedeploy"


def checkpoint_files(root: Path) -> list[dict]:
    """Name, byte size and mtime_ns of each file a checkpoint's experts come from (its state)."""
    files = [root / "config.json"]
    if (root / "model.safetensors.index.json").is_file():
        files.append(root / "model.safetensors.index.json")
    files += _safetensors_files(root)
    out = []
    for f in files:
        st = f.stat()
        out.append({"name": str(f.relative_to(root)), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _changes(old: dict, new: dict) -> str:
    """What differs between two keys, in words (at most three things)."""
    said = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in new.items() if k != "files" and old.get(k) != v]
    before = {f.get("name"): f for f in old.get("files", []) if isinstance(f, dict)}
    after = {f["name"]: f for f in new["files"]}
    said += [f"{n} is new" for n in after if n not in before]
    said += [f"{n} is gone" for n in before if n not in after]
    said += [f"{n} changed ({', '.join(k for k in ('size', 'mtime_ns') if before[n].get(k) != f[k])})"
             for n, f in after.items() if n in before and before[n] != f]
    return "; ".join(said[:3]) + (f" and {len(said) - 3} more" if len(said) > 3 else "") if said else "another key"


class QuantCache:
    """The quantized cache of one checkpoint, expert quantization and model dtype (see the module's doc)."""

    def __init__(self, checkpoint: str | Path, spec: QuantSpec, dtype: torch.dtype, root: Path | None = None):
        path = Path(checkpoint).resolve()
        self.spec, self.dtype = spec, dtype
        self.identity = {"checkpoint": str(path), "expert_dtype": spec.dtype, "group_size": spec.group_size,
                         "model_dtype": str(dtype).removeprefix("torch."), "format": FORMAT}
        if spec.layout != "cpu":  # named only when not the default, so the caches written before it stay found
            self.identity["layout"] = spec.layout
            self.identity["scales"] = f"blocks of {SCALE_ROWS} rows"  # plain's since 2026-12-08 (not [G, N, 2])
        elif spec.dtype == "int4":  # torch's CPU int4 packing depends on its version and the CPU's instruction set:
            # a cache packed elsewhere (a shared home folder, an upgraded torch) would be read wrong here
            self.identity["packing"] = f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}"
        self.key = {**self.identity, "files": checkpoint_files(path)}
        self.parent = (root or cache_root()) / "quantized"
        self.name = f"{_digest(self.identity)}-{_digest(self.key)}"
        self.dir = self.parent / self.name

    def ensure(self, layers: Sequence[tuple[str, Callable[[], object]]]) -> list[QuantizedDiskStore]:
        """Each layer's `QuantizedDiskStore`, from the cache; (re)built first when it is absent or unusable.
        `layers`: per MoE layer, in model order, its module path and a function that gives its float expert
        store (store.DiskStore)."""
        paths = [path for path, _ in layers]
        manifest, problem = self._check(paths)
        if manifest is None:
            stale = self._stale()
            if problem is None and stale:
                old, why = stale[0]
                problem = f"the checkpoint changed since its quantized cache {old} was written ({why})"
            if problem is not None:
                warnings.warn(f"moedeploy: {problem}; rebuilding it", QuantCacheWarning, stacklevel=4)
            else:
                log.info("moedeploy: quantizing the experts to %s once, into %s", self.spec.dtype, self.dir)
            manifest = self._build(layers) or self._check(paths)[0]
            if manifest is None:
                raise CheckpointError(f"moedeploy's quantized cache {self.dir} was written by another process but "
                                      f"is unusable ({self._check(paths)[1]}); delete it and load again")
            for old, _ in stale:
                shutil.rmtree(old, ignore_errors=True)
                log.info("moedeploy: removed the stale quantized cache %s", old)
        return [QuantizedDiskStore(self.dir / entry["file"], tuple(entry["tensors"]), entry["experts"])
                for entry in manifest["layers"]]

    def _check(self, paths: list[str]) -> tuple[dict | None, str | None]:
        """(the manifest, None) when the folder is whole and this checkpoint's; (None, what is wrong);
        (None, None) when there is no folder."""
        if not self.dir.is_dir():
            return None, None
        where = f"the quantized cache {self.dir}"
        try:
            manifest = json.loads((self.dir / MANIFEST).read_text())
            key, layers = manifest["key"], manifest["layers"]
            if not isinstance(key, dict) or not isinstance(layers, list):
                raise TypeError("its key or layers are malformed")
            for entry in layers:
                if (not isinstance(entry["file"], str) or Path(entry["file"]).name != entry["file"]
                        or not isinstance(entry["bytes"], int) or not isinstance(entry["experts"], int)
                        or not all(isinstance(n, str) for n in entry["tensors"])
                        or not isinstance(entry["sha256"], str)):
                    raise ValueError(f"a malformed layer entry {entry!r:.80}")
        except FileNotFoundError:
            return None, f"{where} has no {MANIFEST} (an interrupted or foreign write)"
        except (OSError, ValueError, KeyError, TypeError) as ex:
            return None, f"{where} has an unreadable {MANIFEST} ({type(ex).__name__}: {ex})"
        if key != self.key:
            return None, f"{where} was written for another checkpoint state ({_changes(key, self.key)})"
        if [entry.get("path") for entry in layers] != paths:
            return None, f"{where} holds other MoE layers than this model's"

        def check(entry) -> str | None:
            f = self.dir / entry["file"]
            try:
                size = f.stat().st_size
                if size != entry["bytes"]:
                    return f"{f.name} is {size:,} bytes, {entry['bytes']:,} expected (truncated or overwritten)"
                if _sha256(f) != entry["sha256"]:
                    return f"{f.name} is corrupt (its sha256 differs from the manifest's)"
            except FileNotFoundError:
                return f"{f.name} is missing"
            except OSError as ex:
                return f"{f.name} is unreadable ({ex})"
            return None

        with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(layers)))) as pool:
            problem = next((p for p in pool.map(check, layers) if p is not None), None)
        return (None, f"{where}: {problem}") if problem else (manifest, None)

    def _stale(self) -> list[tuple[Path, str]]:
        """Older folders of this identity (the checkpoint has changed since), with what changed."""
        out = []
        if self.parent.is_dir():
            for d in sorted(self.parent.glob(f"{self.name.split('-')[0]}-*")):
                if d == self.dir or not d.is_dir():
                    continue
                try:
                    why = _changes(json.loads((d / MANIFEST).read_text())["key"], self.key)
                except (OSError, ValueError, KeyError, TypeError, AttributeError):
                    why = "its manifest is unreadable"
                out.append((d, why))
        return out

    def _sweep(self) -> None:
        """Remove the temporary folders of builds whose process is gone (a crash, a kill)."""
        for d in self.parent.iterdir():
            m = _SCRATCH.match(d.name)
            if m is None:
                continue
            try:
                os.kill(int(m.group(1)), 0)
                continue  # still running (or its pid reused: the folder stays, harmlessly)
            except ProcessLookupError:
                shutil.rmtree(d, ignore_errors=True)
            except (PermissionError, OverflowError, OSError):
                continue

    def _build(self, layers: Sequence[tuple[str, Callable[[], object]]]) -> dict | None:
        """Quantize every layer into a temporary folder, then rename it into place. The manifest written,
        or None when another process put a cache in place first (the caller checks it)."""
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self._sweep()
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.name}-{os.getpid()}-", dir=self.parent))
        except OSError as ex:
            raise OptionError(f"moedeploy cannot write its quantized cache in {self.parent} ({ex}); set "
                              "MOEDEPLOY_CACHE to a writable folder") from ex
        try:
            entries = []
            bar = tqdm(layers, desc=f"moedeploy: quantizing experts to {self.spec.dtype} (first load; cached in "
                                    f"{self.parent}, or MOEDEPLOY_CACHE)", unit="layer", file=sys.stderr, disable=None)
            for i, (path, store_of) in enumerate(bar):
                bank = QuantizedBank.from_store(store_of(), self.spec, self.dtype)
                file = tmp / f"layer_{i:03d}.safetensors"
                names = bank.tensor_names()
                save_file(dict(zip(names, bank.tensors())), str(file),
                          metadata={"format": "pt", "moedeploy": f"quantized experts, format {FORMAT}"})
                entries.append({"path": path, "file": file.name, "experts": bank.num_experts, "tensors": list(names),
                                "bytes": file.stat().st_size, "sha256": _sha256(file)})
                del bank
                _fsync(file)
            manifest = {"moedeploy": "quantized experts", "key": self.key, "layers": entries}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: a folder without it is never used
            _fsync(tmp / MANIFEST)
            _fsync(tmp)
            return manifest if self._install(tmp, [path for path, _ in layers]) else None
        except OSError as ex:  # a full disk, most likely
            raise OptionError(f"moedeploy could not write its quantized cache in {self.parent} ({ex}); free space "
                              "there or set MOEDEPLOY_CACHE to another folder") from ex
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already when installed

    def _install(self, tmp: Path, paths: list[str]) -> bool:
        """Rename the built folder into place (an unusable one there is moved aside, then removed). False
        when another process installed its own first: a whole one is left in place, for it may be in use."""
        old = None
        if self.dir.exists():
            if self._check(paths)[0] is not None:
                return False
            old = self.parent / f".old-{self.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                os.rename(self.dir, old)
            except FileNotFoundError:
                old = None
        try:
            os.rename(tmp, self.dir)
        except OSError:  # ENOTEMPTY / EEXIST: a concurrent build won
            return False
        finally:
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        _fsync(self.parent)
        return True
