"""Build a transformers model from a local checkpoint with every MoE block replaced by a `MoELayer`.

1. The transformers model is built on the meta device: no memory, no random init.
2. Each MoE block is replaced by a `MoELayer` whose router and experts are read from the safetensors
   files by name, one expert at a time, into the uniform expert layout. The block's shared experts
   keep their transformers modules and names. With the disk store (`expert_store="disk"`), experts
   stay in the checkpoint on disk and the layer's bank holds their shapes only (meta device);
   quantized experts (`expert_dtype`) on the disk store are quantized once into moedeploy's cache folder
   (quant/cache.py), and each later load reads those files instead.
3. Every other tensor is read by name; non-persistent buffers (rotary frequencies, sinusoidal
   positions) are recomputed by the model's own `_init_weights`; tied weights are tied.
4. Anything still on the meta device means the checkpoint lacks it: a clear error, no model.

No full copy of the model's expert weights is ever made outside the expert banks.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import replace
from functools import partial

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig

from .errors import CheckpointError, UnsupportedModelError
from .kernels import dense, native
from .layer import MoELayer
from .models import Family, family_for, supported_model_types
from .models.base import router_module
from .models.verify import verify_block
from .options import LoadOptions
from .placement import ModelShape
from .quant import QuantizedBank
from .quant.cache import QuantCache
from .quant.formats import kernel as quant_kernel
from .quant.ondisk import Dequantizing, format_of
from .quant.prequantized import PrequantizedBank
from .routing import Router
from .store import Checkpoint, DiskStore, HostStore, QuantizedDiskStore, default_store

log = logging.getLogger(__name__)


def read_config(ckpt: Checkpoint):
    try:
        return AutoConfig.from_pretrained(ckpt.root)
    except (ValueError, KeyError, OSError) as ex:
        raise UnsupportedModelError(f"{ckpt.root}/config.json cannot be read by transformers: {ex}") from ex


def _first_present(ckpt: Checkpoint, prefix: str, names: tuple[str, ...]) -> str | None:
    return next((f"{prefix}.{n}" for n in names if f"{prefix}.{n}" in ckpt), None)


def _disk_prefix(ckpt: Checkpoint, family: Family, path: str) -> str:
    for prefix in family.disk_prefixes(path):
        if ckpt.has_prefix(prefix + "."):
            return prefix
    raise CheckpointError(f"{ckpt.root}: no tensors for the MoE block {path} (looked under {family.disk_prefixes(path)})")


def _read_router(ckpt: Checkpoint, family: Family, config, block: nn.Module, prefix: str, E: int, D: int,
                 dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> Router:
    """keep_fp32: the model class's names of weights transformers keeps in float32 whatever the dtype (its
    `_keep_in_fp32_modules_strict`: DeepSeek's `gate.weight` since 5.24); a router among them, on a family that
    computes its logits in float32, is read in float32 too, as transformers reads it."""
    name = _first_present(ckpt, prefix, family.router_weight_names)
    if name is None:
        raise CheckpointError(f"{ckpt.root}: router weight of {prefix} is missing (looked for {family.router_weight_names})")
    if family.logits_dtype_for(config) == torch.float32 and any(name.endswith(f".{k}") for k in keep_fp32):
        dtype = torch.float32
    weight = ckpt.read(name, dtype, copy=True)
    if tuple(weight.shape) != (E, D):
        raise CheckpointError(f"router tensor {name} has shape {tuple(weight.shape)}, expected {(E, D)} from config.json")
    bias_name = _first_present(ckpt, prefix, family.router_bias_names)
    if bias_name is None and family.router_bias_required:
        raise CheckpointError(f"{ckpt.root}: router bias of {prefix} is missing (looked for {family.router_bias_names})")
    bias = None if bias_name is None else ckpt.read(bias_name, dtype, copy=True)
    correction = None
    if family.correction_bias_names:
        cname = _first_present(ckpt, prefix, family.correction_bias_names)
        if cname is None:
            raise CheckpointError(f"{ckpt.root}: router correction bias of {prefix} is missing")
        correction = ckpt.read(cname, torch.float32, copy=True)  # transformers keeps it in fp32
    return Router(family.rule(config, block), weight, bias, correction, logits_dtype=family.logits_dtype_for(config))


def _expert_store(ckpt: Checkpoint, family: Family, config, block: nn.Module, prefix: str, E: int) -> DiskStore:
    layout = next((lay for lay in family.layouts if lay.present(ckpt, prefix)), None)
    if layout is None:
        raise CheckpointError(f"{ckpt.root}: no expert tensors found under {prefix} in any known layout")
    D, I = family.dims(block)
    if getattr(ckpt, "fmt", None) is None:  # a pre-quantized checkpoint's shapes are its format's (quant/ondisk.py)
        layout.check(ckpt, prefix, E, D, I)
    return DiskStore(ckpt, layout, prefix, E, D, I, family.activation(config, block))


def _layer_store(ckpt: Checkpoint, family: Family, config, path: str, block: nn.Module) -> DiskStore:
    """The float experts of the MoE block at `path`, as the checkpoint has them."""
    return _expert_store(ckpt, family, config, block, _disk_prefix(ckpt, family, path), block.experts.num_experts)


def build_layer(ckpt: Checkpoint, family: Family, config, path: str, block: nn.Module, opts: LoadOptions,
                dtype: torch.dtype, index: int = 0, quantized: QuantizedDiskStore | None = None,
                keep_fp32: tuple[str, ...] = ()) -> MoELayer:
    """MoE layer number `index` (model order) from its block. Under expert parallelism (opts.sharding)
    only this rank's slots are read. `quantized`: the layer's experts in moedeploy's quantized cache (the
    disk tier of quantized experts; quant/cache.py)."""
    prefix = _disk_prefix(ckpt, family, path)
    E = block.experts.num_experts
    D, _ = family.dims(block)
    router = _read_router(ckpt, family, config, block, prefix, E, D, dtype, keep_fp32)
    disk = source = _expert_store(ckpt, family, config, block, prefix, E)
    parallel = None
    if opts.sharding is not None:
        parallel = opts.sharding.layer(index)
        disk = disk.subset(opts.sharding.local(index))
    prequantized = getattr(ckpt, "fmt", None) is not None  # MXFP4 / FP8 on disk (quant/ondisk.py)
    if opts.quant is not None and quantized is not None:  # the disk tier: read from the cache, shapes only here
        if quantized.size != disk.size:
            raise CheckpointError(f"{quantized.path} holds {quantized.size} experts for {path}, the model has "
                                  f"{disk.size}; delete it and load again")
        experts = QuantizedBank.shaped(opts.quant, disk.activation, disk.D, disk.I, quantized.shapes())
        store = quantized
    elif opts.quant is not None:  # quantized one expert at a time as they stream (pre-quantized: from the dequantized)
        experts = QuantizedBank.from_store(disk, opts.quant, dtype)
        store = HostStore(experts) if opts.buffered else disk
        if opts.buffered:  # on CUDA the host copy is pinned
            experts.keep_on_host(pin=opts.device.type == "cuda")
    elif prequantized and parallel is None and opts.expert_store != "disk":  # kept in the checkpoint's own format
        experts = PrequantizedBank.from_store(disk, dtype)
        store = HostStore(experts)
        if opts.buffered:
            experts.keep_on_host(pin=opts.device.type == "cuda")
    elif opts.expert_store == "disk":  # experts stay in the checkpoint; the layer knows their shapes only
        experts, store = disk.bank(dtype, device="meta"), disk
    else:
        experts = disk.bank(dtype)
        store = HostStore(experts)
        if opts.buffered:  # only the slots go to the device; on CUDA the host copy is pinned
            experts.keep_on_host(pin=opts.device.type == "cuda")
    if opts.quant is not None:
        integer = native.integer_isa() if native.every_step(experts) else None
        experts.kernel = quant_kernel(opts.quant, opts.device, integer)  # stats() names what runs
    shared, shared_gate = family.shared(block)
    layer = family.layer_class(router, experts, opts.gating, shared, shared_gate, parallel=parallel)
    layer.store = store
    layer.source = source
    family.configure(layer, config)
    return layer


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if attr in owner._parameters:
        owner._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _keep_fp32(model: nn.Module, name: str) -> bool:
    patterns = set(getattr(model, "_keep_in_fp32_modules", None) or []) | set(
        getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    parts = name.split(".")
    return any(p in parts for p in patterns)


def _load_remaining(ckpt: Checkpoint, model: nn.Module, dtype: torch.dtype) -> None:
    """Read every tensor still on the meta device by name; recompute non-persistent buffers. Expert
    banks of the disk tier stay on the meta device."""
    on_disk = {f"{path}.experts.{name}" for path, m in model.named_modules() if isinstance(m, MoELayer)
               and isinstance(m.store, (DiskStore, QuantizedDiskStore)) for name, _ in m.experts.named_buffers()}
    entries = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, tensor in entries:
        if not tensor.is_meta or name in on_disk:
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in owner._buffers and attr in owner._non_persistent_buffers_set:
            owner._buffers[attr] = torch.empty_like(tensor, device="cpu")
            model._init_weights(owner)
            continue
        if name not in ckpt:
            continue  # tied weights are not stored; anything else is reported after tying
        value = ckpt.read(name, copy=True)  # owned: the mapping's pages are dropped as reading goes on
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(value.shape)}, expected {tuple(tensor.shape)}")
        if value.is_floating_point() and not _keep_fp32(model, name):
            value = value.to(dtype)
        _set_tensor(model, name, value)
    model.tie_weights()
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta and n not in on_disk]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"{ckpt.root}: the checkpoint lacks {len(missing)} tensors the model needs: {shown}")


def _resolve_dtype(config, requested: torch.dtype | None) -> torch.dtype:
    if requested is not None:
        return requested
    saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(saved, str):
        saved = getattr(torch, saved, None)
    return saved if isinstance(saved, torch.dtype) and saved.is_floating_point else torch.float32


def build_model(ckpt: Checkpoint, opts: LoadOptions):
    """The checkpoint as a transformers model with moedeploy's MoE layers, the family adapter used, and
    the options as applied (an expert-parallel run's placement resolved for this model)."""
    config = read_config(ckpt)
    fmt = format_of(config)
    if fmt is not None:  # pre-quantized: everything reads dequantized, except the routed experts' bank (build_layer)
        ckpt = Dequantizing(ckpt, fmt)
    family = family_for(config)
    dtype = _resolve_dtype(config, opts.dtype)
    if opts.expert_store is None:
        opts = replace(opts, expert_store=default_store(opts.device, opts.buffered, prequantized=fmt is not None))
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(config, dtype=dtype)
    except ValueError as ex:
        raise UnsupportedModelError(
            f"{ckpt.root}: transformers has no generation model for model_type {config.model_type!r} ({ex})"
        ) from ex
    blocks = family.blocks(model)
    if not blocks:
        raise UnsupportedModelError(
            f"{ckpt.root}: {config.model_type!r} has no Mixture-of-Experts blocks; moedeploy runs MoE models "
            f"only (known families: {', '.join(supported_model_types())})"
        )
    given = opts.sharding is not None and opts.sharding.placement is not None
    if opts.sharding is not None:
        opts = replace(opts, sharding=opts.sharding.resolve(
            ModelShape(len(blocks), blocks[0][1].experts.num_experts, 0, str(ckpt.root))))
    integer = (opts.quant is not None and opts.device.type == "cpu"  # moedeploy's kernel takes every step
               and native.takes(_layer_store(ckpt, family, config, *blocks[0]), opts.quant))
    if integer and opts.quant.dtype == "int4":
        opts = replace(opts, quant=replace(opts.quant, layout="plain"))  # the layout it reads
    if opts.quant is not None and not integer and dtype == torch.float32 and opts.device.type == "cpu":
        warnings.warn(f"{opts.quant.dtype} experts in a float32 model: torch's {opts.quant.dtype} CPU kernel takes a "
                      "scalar path for float32 inputs, 8-17x slower than for bfloat16 (docs/benchmarks.md); load "
                      "with dtype='bfloat16' (--dtype bfloat16) for speed", stacklevel=2)
    quantized = [None] * len(blocks)
    if opts.quant is not None and opts.expert_store == "disk":  # quantized once into moedeploy's cache, then read
        quantized = QuantCache(ckpt.root, opts.quant, dtype).ensure(
            [(path, partial(_layer_store, ckpt, family, config, path, block)) for path, block in blocks])
    keep_fp32 = tuple(getattr(type(model), "_keep_in_fp32_modules_strict", None) or ())  # transformers' (a private
    # attribute; tests/test_families.py names it)
    for index, (path, block) in enumerate(tqdm(blocks, desc="moedeploy: loading MoE layers", unit="layer",
                                               disable=None, leave=False)):
        if not hasattr(router_module(block), "weight") and not hasattr(router_module(block), "classifier"):
            raise UnsupportedModelError(f"{path}: router {type(router_module(block)).__name__} has no weight")
        model.set_submodule(path, build_layer(ckpt, family, config, path, block, opts, dtype, index,
                                              quantized=quantized[index], keep_fp32=keep_fp32))
    if given:  # its top-k, now that a router is built
        first = model.get_submodule(blocks[0][0])
        opts.sharding.placement.check_model(ModelShape(len(blocks), first.router.num_experts, first.router.top_k))
    _load_remaining(ckpt, model, dtype)
    if not family.model_types:  # no adapter: the generic guess must reproduce transformers' block
        path, block = blocks[0]
        verify_block(block, model.get_submodule(path), config.model_type, path)
    ckpt.release()
    if fmt is not None:
        kept = sorted({getattr(m.experts, "kernel", "dequantized to float as read") for _, m in model.named_modules()
                       if isinstance(m, MoELayer)})
        log.info("%s: %s checkpoint; routed experts: %s; its other quantized weights dequantized to %s at load",
                 ckpt.root, fmt.name, ", ".join(kept), dtype)
    if (ckpt.root / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(ckpt.root)
    if opts.device.type == "cpu" and opts.gating.backend not in ("loop", "grouped_mm"):  # torch's kernels asked for
        dense.install(model)  # decode-sized bfloat16 projections on the native kernel
    return model.to(opts.device).eval(), family, opts
