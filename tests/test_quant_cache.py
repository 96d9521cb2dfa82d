"""Quantized experts on the disk tier: quantized once into moedeploy's cache folder (quant/cache.py), then mapped
and read one expert per miss (store/quantized.py). Outputs are bit-identical to the same quantized model fully
resident; the cache is written once, never beside the checkpoint, and a stale, truncated or corrupt copy is
named in a warning and rebuilt."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from moedeploy import load
from moedeploy.quant import QuantizedBank, QuantSpec
from moedeploy.quant.cache import QuantCache, QuantCacheWarning, cache_root
from moedeploy.store import QuantizedDiskStore

SMALL = {"hidden_size": 64, "moe_intermediate_size": 32}
IDS = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MOEDEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def own_copy(tiny, tmp_path) -> Path:
    """A checkpoint of this test's own, free to touch."""
    return Path(shutil.copytree(tiny("qwen3_moe", **SMALL), tmp_path / "ckpt"))


def _logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS).logits


def _disk(path, dtype="int8", **options):
    options = {"expert_memory": 0.5, **options}
    return load(path, dtype="float32", expert_dtype=dtype, expert_store="disk", **options)


def _folders(cache_dir: Path) -> list[Path]:
    return sorted(d for d in (cache_dir / "quantized").iterdir() if not d.name.startswith("."))


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _rebuilt(path, match: str, want: torch.Tensor) -> None:
    with pytest.warns(QuantCacheWarning, match=match):
        model = _disk(path)
    assert torch.equal(_logits(model), want)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantCacheWarning)
        _disk(path)  # the rebuilt cache is whole: no warning


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_the_disk_tier_equals_the_resident_quantized_model(tiny, dtype):
    path = tiny("qwen3_moe", **SMALL)
    want = _logits(load(path, dtype="float32", expert_dtype=dtype))
    for budget, policy, extra in ((0.25, "lru", {}), (0.5, "lfu", {}), (0.5, "lru", {"prefetch": "lookahead"}),
                                  (0.3, "lru", {"cache_scope": "global"})):
        model = _disk(path, dtype, expert_memory=budget, policy=policy, **extra)
        assert torch.equal(_logits(model), want), (budget, policy, extra)
        layer = next(iter(model.moedeploy.layers.values()))
        assert isinstance(layer.store, QuantizedDiskStore) and isinstance(layer.experts, QuantizedBank)
        assert all(t.is_meta for t in layer.experts.tensors())  # no expert bytes outside the slots
        stats = model.moedeploy.cache_stats()
        assert stats["store"] == "disk" and stats["misses"] > 0
        assert stats["bytes_moved"] == layer.experts.expert_bytes() * (stats["misses"] + stats["prefetched"])


def test_bfloat16_and_generation(tiny):
    path = tiny("qwen3_moe", **SMALL)
    prompt = IDS[:1, :4]
    want = load(path, dtype="bfloat16", expert_dtype="int4").generate(prompt, max_new_tokens=6, do_sample=False)
    model = load(path, dtype="bfloat16", expert_dtype="int4", expert_store="disk", expert_memory=0.25)
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), want)


def test_the_cache_is_written_once_and_never_beside_the_checkpoint(own_copy, cache_dir, monkeypatch):
    before = _tree(own_copy)
    built = []
    original = QuantizedBank.from_store.__func__
    monkeypatch.setattr(QuantizedBank, "from_store", classmethod(lambda cls, *a: built.append(1) or original(cls, *a)))
    want = _logits(_disk(own_copy))
    assert len(built) == 2  # one per MoE layer
    (folder,) = _folders(cache_dir)
    assert sorted(p.name for p in folder.iterdir()) == ["layer_000.safetensors", "layer_001.safetensors",
                                                        "manifest.json"]
    written = _tree(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantCacheWarning)
        again = _disk(own_copy, expert_memory=0.25)
    assert len(built) == 2 and _tree(folder) == written  # reused: nothing quantized or written
    assert torch.equal(_logits(again), want)
    assert _tree(own_copy) == before  # nothing written inside the checkpoint
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"]["checkpoint"] == str(own_copy.resolve()) and manifest["key"]["expert_dtype"] == "int8"
    assert [entry["path"] for entry in manifest["layers"]] == list(again.moedeploy.layers)


def test_the_cache_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEDEPLOY_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "moedeploy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "moedeploy"


def test_a_changed_checkpoint_makes_the_cache_stale(own_copy, cache_dir):
    want = _logits(_disk(own_copy))
    (old,) = _folders(cache_dir)
    weights = own_copy / "model.safetensors"
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: a new mtime
    _rebuilt(own_copy, "checkpoint changed since .* written \\(model.safetensors changed \\(mtime_ns\\)\\)", want)
    (new,) = _folders(cache_dir)  # the stale folder is gone
    assert new != old
    config = own_copy / "config.json"
    config.write_text(config.read_text() + "\n")  # a new size
    _rebuilt(own_copy, "config.json changed \\(size, mtime_ns\\)", want)
    assert len(_folders(cache_dir)) == 1


def _damage(cache_dir: Path, how) -> None:
    (folder,) = _folders(cache_dir)
    layer = folder / "layer_001.safetensors"
    st = layer.stat()
    data = bytearray(layer.read_bytes())
    layer.write_bytes(how(data))
    os.utime(layer, ns=(st.st_atime_ns, st.st_mtime_ns))  # the check must not rely on times


def test_a_truncated_or_corrupt_cache_is_detected_and_rebuilt(own_copy, cache_dir):
    want = _logits(_disk(own_copy))
    _damage(cache_dir, lambda data: data[: len(data) // 2])
    _rebuilt(own_copy, "layer_001.safetensors is .* bytes, .* expected \\(truncated", want)

    def flip(data):
        data[-5] ^= 0x40  # one byte of the last expert's data; the header and size are intact
        return data

    _damage(cache_dir, flip)
    _rebuilt(own_copy, "layer_001.safetensors is corrupt", want)
    (folder,) = _folders(cache_dir)
    (folder / "layer_000.safetensors").unlink()
    _rebuilt(own_copy, "layer_000.safetensors is missing", want)
    (folder / "manifest.json").write_text("{not json")
    _rebuilt(own_copy, "unreadable manifest.json", want)
    (folder / "manifest.json").unlink()
    _rebuilt(own_copy, "has no manifest.json", want)


def test_a_crashed_build_leaves_nothing_that_is_used(own_copy, cache_dir, monkeypatch):
    from moedeploy.quant import cache

    calls = []

    def crash(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed while writing")
        return real(tensors, filename, metadata=metadata)

    real = cache.save_file
    monkeypatch.setattr(cache, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _disk(own_copy)
    assert _folders(cache_dir) == []
    monkeypatch.setattr(cache, "save_file", real)
    left = cache_dir / "quantized" / f".tmp-{'0' * 16}-{'0' * 16}-{2**22 + 12345}-x"  # a killed build's folder
    left.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("error", QuantCacheWarning)  # a first build: no warning
        model = _disk(own_copy)
    assert torch.equal(_logits(model), _logits(load(own_copy, dtype="float32", expert_dtype="int8")))
    assert not left.exists() and len(_folders(cache_dir)) == 1


def test_each_quantization_has_its_own_folder(tiny, cache_dir):
    path = tiny("qwen3_moe", **SMALL)
    dirs = {QuantCache(path, spec, dtype).dir for spec, dtype in (
        (QuantSpec("int8"), torch.float32), (QuantSpec("int8", 16), torch.float32),
        (QuantSpec("int4", 32), torch.float32), (QuantSpec("int4"), torch.float32), (QuantSpec("int8"), torch.bfloat16))}
    assert len(dirs) == 5
    for group in (None, 16):
        load(path, dtype="float32", expert_dtype="int8", group_size=group, expert_store="disk", expert_memory=0.5)
    assert _folders(cache_dir) == sorted(QuantCache(path, QuantSpec("int8", g), torch.float32).dir for g in (None, 16))


@pytest.mark.parametrize("family, prequantized, overrides", [
    ("gpt_oss", None, {}), ("gpt_oss", "mxfp4", {"hidden_size": 64, "intermediate_size": 64}),
    ("deepseek_v3", "fp8", {"block": (16, 16), "moe_intermediate_size": 32})])
def test_biases_and_prequantized_checkpoints(tiny, tmp_path, family, prequantized, overrides):
    """Expert biases (GPT-OSS) travel in the cache too; a pre-quantized checkpoint's experts are requantized from
    their dequantized form into it."""
    if prequantized is None:
        path = tiny(family)
    else:
        from moedeploy.tiny import save_tiny_prequantized

        path = save_tiny_prequantized(family, tmp_path / "q", reference_dir=tmp_path / "ref", **overrides)
    want = _logits(load(path, dtype="float32", expert_dtype="int8"))
    model = _disk(path, expert_memory=0.25)
    assert torch.equal(_logits(model), want)
    layer = next(iter(model.moedeploy.layers.values()))
    assert isinstance(layer.store, QuantizedDiskStore)
    assert family != "gpt_oss" or "b_in" in layer.store.names


def test_an_unwritable_cache_folder_is_a_clear_error(tiny, cache_dir, monkeypatch):
    from moedeploy.errors import OptionError

    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    cache_dir.write_text("a file, not a folder")
    with pytest.raises(OptionError, match="cannot write its quantized cache .* set MOEDEPLOY_CACHE"):
        _disk(tiny("qwen3_moe", **SMALL))


def test_an_int4_cache_packed_for_another_cpu_is_not_read(own_copy, cache_dir, monkeypatch):
    """torch's CPU int4 packing follows the instruction set it runs with (and may change with torch): a cache
    packed under one is never read under another (a shared home folder, an upgraded torch), and each gives the
    resident model's logits. Here the second process runs torch's portable kernels (ATEN_CPU_CAPABILITY). Both
    take torch's packing (the "cpu" layout) even where the native kernel's "plain" one would be chosen."""
    import subprocess
    import sys

    from moedeploy.kernels import native

    monkeypatch.setattr(native, "integer", lambda: False)
    assert torch.equal(_logits(_disk(own_copy, "int4")), _logits(load(own_copy, dtype="float32", expert_dtype="int4")))
    script = ("import sys, torch\n"
              "from moedeploy import load\n"
              "from moedeploy.kernels import native\n"
              "native.integer = lambda: False\n"
              "ids = torch.randint(3, 100, (2, 11), generator=torch.Generator().manual_seed(3))\n"
              "kw = dict(dtype='float32', expert_dtype='int4')\n"
              "with torch.inference_mode():\n"
              "    disk = load(sys.argv[1], expert_memory=0.5, expert_store='disk', **kw)(ids).logits\n"
              "    print(torch.equal(disk, load(sys.argv[1], **kw)(ids).logits), torch.backends.cpu.get_cpu_capability())\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(own_copy)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "DEFAULT"], done.stdout
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert len(_folders(cache_dir)) == 2  # one per packing


def test_two_builds_of_one_cache_at_once_leave_the_first_in_place(own_copy, cache_dir, monkeypatch):
    """A build that finishes after another process installed the same cache leaves that one where it is (its
    process may be reading it) and uses it."""
    from moedeploy.quant import cache as qc

    seen = {}
    ensure = qc.QuantCache.ensure

    def spy(self, layers):
        seen["cache"], seen["layers"] = self, layers
        return ensure(self, layers)

    monkeypatch.setattr(qc.QuantCache, "ensure", spy)
    model = _disk(own_copy)
    cache = seen["cache"]
    installed = os.stat(cache.dir).st_ino
    assert cache._build(seen["layers"]) is None  # the late build: the winner's stays
    assert os.stat(cache.dir).st_ino == installed and not [d for d in (cache_dir / "quantized").iterdir()
                                                          if d.name.startswith(".")]
    assert torch.equal(_logits(model), _logits(load(own_copy, dtype="float32", expert_dtype="int8")))
