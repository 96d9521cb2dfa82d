"""The Python door: `moedeploy.load(path, **options)`."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from torch import nn

from .cache import CacheConfig, attach_cache, make_policy, parse_budget
from .errors import OptionError
from .layer import MoELayer
from .loader import build_model
from .options import LoadOptions
from .parallel import Sharding
from .parallel import current as current_group
from .parallel.rebalance import Rebalancer
from .placement import read_placement
from .placement.online import OnlineConfig
from .predict.ahead import PREFETCHERS, ROUTING_MODES, Ahead
from .predict.lookahead import attach_lookahead
from .quant import QuantSpec
from .quant.formats import for_device
from .store import STORES, Checkpoint


@dataclass
class Runtime:
    """What moedeploy did to a model; reachable as `model.moedeploy`."""

    path: Path
    family: str
    options: LoadOptions
    layers: dict[str, MoELayer]
    pools: list = field(default_factory=list)  # cache.SlotPool per budget scope; empty when all experts resident
    group: object = None  # parallel.Group of an expert-parallel run; None in one process
    rebalancer: object = None  # parallel.Rebalancer when the run rebalances online
    ahead: object = None  # predict.Ahead when a SiDA predictor runs ahead of the model
    routing: str = "exact"

    def stats(self) -> dict:
        """Routing statistics since load (or the last reset): one host sync per layer."""
        routed = sum(layer.routed_pairs for layer in self.layers.values())
        dropped = sum(int(layer.dropped_pairs) for layer in self.layers.values())
        return {
            "moe_layers": len(self.layers),
            "gating": self.options.gating.mode,
            "backend": sorted({layer.backend for layer in self.layers.values()}),
            # quantized experts (int8, int4, MXFP4, FP8): how their matmuls run on this device; empty otherwise
            "expert_kernel": sorted({getattr(layer.experts, "kernel", None) for layer in self.layers.values()} - {None}),
            "routed_pairs": routed,
            "dropped_pairs": dropped,
            "dropped_fraction": dropped / routed if routed else 0.0,
            **self.routing_stats(),
        }

    def routing_stats(self) -> dict:
        """The routing mode and, when it is not exact, how far it departed from the router: the share of the
        router's pairs not chosen, and the router's weight on them per token and MoE layer (0 = no departure;
        times the MoE layers for a token's whole departed weight)."""
        out = {"routing": self.routing}
        if self.routing != "exact":
            routed = sum(layer.routed_pairs for layer in self.layers.values())
            departed = sum(int(layer.departed_pairs) for layer in self.layers.values())
            weight = sum(float(layer.departed_weight) for layer in self.layers.values())
            K = next(iter(self.layers.values())).router.top_k
            out |= {"departed_pairs": departed, "departed_fraction": departed / routed if routed else 0.0,
                    "departed_weight_per_token": weight * K / routed if routed else 0.0}
        if self.ahead is not None:
            out |= self.ahead.stats.as_dict()
        return out

    def parameters(self, model: nn.Module) -> dict:
        """Parameter counts: total, expert (routed experts only), and active per token (all but the
        routed experts a token does not use: E - K of E per layer)."""
        dense = sum(p.numel() for p in model.parameters())  # routed experts are buffers, not here
        expert = active_expert = 0
        for layer in self.layers.values():
            n = layer.experts.parameter_count()
            expert += n
            active_expert += n * layer.router.top_k / layer.experts.num_experts
        total = dense + expert
        return {"total": total, "routed_expert": expert, "expert_share": round(expert / total, 4),
                "active_per_token": int(dense + active_expert)}

    def cache_stats(self) -> dict | None:
        """Expert-buffering statistics summed over the pools, or None when every expert is resident."""
        if not self.pools:
            return None
        for pool in self.pools:
            pool.drain()  # copies in flight finish and their times (CUDA events) are counted
        per_pool = [pool.stats.as_dict() for pool in self.pools]
        total = {key: sum(d[key] for d in per_pool) for key in per_pool[0] if key != "miss_rate"}
        total["miss_rate"] = total["misses"] / max(total["hits"] + total["misses"], 1)
        series = resident_over_time([pool.stats for pool in self.pools])
        total["peak_resident_bytes"] = max((b for _, b in series), default=0)  # of the pools together (each pool's
        # own peak is exact; after SERIES_CAP acquires per pool, their sum is sampled)
        total["resident_bytes_over_time"] = downsample(series, SERIES_POINTS)  # [seconds, bytes]
        total["slots"] = sum(pool.num_slots for pool in self.pools)
        total["budget_bytes"] = self.options.cache.budget_bytes
        total["policy"] = self.options.cache.policy
        total["scope"] = self.options.cache.scope
        total["store"] = self.options.expert_store
        total["pinned"] = sum(len(pool.pinned) for pool in self.pools)
        total["prefetch"] = self.options.cache.prefetch
        return total

    def parallel_stats(self) -> dict | None:
        """Expert parallelism on this rank: time in collectives, pair rows sent to other ranks, and the busiest
        rank's share of the routed pairs per layer (max/mean over ranks, from the replicas' split);
        None in one process."""
        if self.group is None:
            return None
        world = self.group.world
        imbalance = []
        for layer in self.layers.values():
            tokens = layer.parallel.slot_tokens.reshape(world, -1).sum(axis=1)  # [W] pairs per rank
            if tokens.sum():
                imbalance.append(float(tokens.max() / tokens.mean()))
        held = sum(layer.experts.expert_bytes() * layer.experts.num_experts for layer in self.layers.values())
        return {**self.group.stats(), "placement": self.options.sharding.placement.algorithm,
                "exchange": self.options.sharding.exchange,
                "max_mean_load": round(sum(imbalance) / len(imbalance), 4) if imbalance else None,
                "expert_bytes_this_rank": held,
                "rebalance": None if self.rebalancer is None else self.rebalancer.stats()}

    def reset_stats(self) -> None:
        for layer in self.layers.values():
            layer.reset_stats()
        if self.ahead is not None:
            self.ahead.stats = type(self.ahead.stats)()
        if self.group is not None:
            self.group.reset_stats()

    def empty_cache(self) -> None:
        """A cold start: every pool drops its unpinned experts and forgets its statistics."""
        for pool in self.pools:
            pool.reset()
        if self.ahead is not None:
            self.ahead.reset()


SERIES_POINTS = 100  # the most points of a time series in cache_stats(): a JSON a person can read


def downsample(series: list, points: int) -> list:
    """At most `points` entries of `series`, evenly spaced, the first and the last kept."""
    n = len(series)
    if n <= points:
        return series
    return [series[round(i * (n - 1) / (points - 1))] for i in range(points)]


def resident_over_time(stats: list) -> list[tuple[float, int]]:
    """Resident expert bytes of all pools together after each acquire, with seconds since the first:
    the pools' series merged in time order."""
    events = sorted((t, i, b) for i, s in enumerate(stats) for t, b in zip(s.resident_at, s.resident_bytes))
    now = [0] * len(stats)
    series = []
    for t, i, b in events:
        now[i] = b
        series.append((round(t - events[0][0], 6), sum(now)))
    return series


DEMO_MODEL = Path(__file__).parent / "data" / "demo"


def load(path: str | Path | None = None, *, device="cpu", dtype="auto", gating: str = "dynamic",
         capacity_factor: float | None = None, capacity_fraction: float | None = None, backend: str = "auto",
         expert_memory=None, policy: str | None = None, cache_scope: str | None = None,
         expert_store: str | None = None, pin: str | Path | None = None, pin_fraction: float | None = None,
         prefetch: str | None = None, placement=None, rebalance=None, exchange: str | None = None,
         expert_dtype: str | None = None, group_size: int | None = None, routing: str = "exact",
         predictor: str | Path | None = None) -> nn.Module:
    """Load a local Hugging Face MoE checkpoint with moedeploy's MoE layers in place.

    path: a checkpoint directory; None loads the embedded demo model (docs/demo-model.md).
    Returns the transformers model (`model(input_ids)`, `model.generate(...)` work as usual), with
    `model.moedeploy` describing the runtime.

    device: "cpu" or "cuda[:N]". dtype: "auto" (the checkpoint's), "float32", "bfloat16", "float16".
    gating: "dynamic" (sort tokens by expert; exact) or "static" (capacity buffers; the baseline).
    capacity_factor / capacity_fraction: static gating's capacity, C = ceil(f * k * S / E) or
    ceil(fraction * S); by default the model's own capacity (Switch, NLLB-MoE) or room for every token.
    backend: expert kernel, "auto", "loop", "grouped_mm", or the CPU decode kernels "compiled" and "native".
    expert_memory: keep only this much of the experts resident ("2GiB", "512MB", bytes, or a fraction
    of all expert bytes such as 0.25); the rest stay in host memory and are copied in when needed.
    policy: which resident expert to evict: "lru" (default), "lfu", "fifo", "lifo" (the paper's).
    cache_scope: "layer" (an equal share per MoE layer, default) or "global" (one pool for all).
    expert_store: where the non-resident experts wait: "host" memory (loaded once; the default on a GPU) or
    "disk" (the checkpoint's safetensors files, read one expert per miss; the default on the CPU, where the
    slots are host memory too, so a host store would hold every expert and the slots: more memory than no
    budget; except for a pre-quantized checkpoint, whose shipped form only the host store keeps). Needs an
    expert_memory budget. With expert_dtype, "disk" reads the
    quantized experts from a copy written once into moedeploy's cache folder ($MOEDEPLOY_CACHE, else
    $XDG_CACHE_HOME/moedeploy, else ~/.cache/moedeploy; `quantized/<key>/`, never beside the checkpoint):
    the first load quantizes and writes it, later loads check it (sizes, sha256) and map it; a stale
    (the checkpoint changed), truncated or corrupt copy is named in a warning and rebuilt (quant/cache.py).
    pin: a routing trace recorded from this model (`moedeploy eval-ppl --trace FILE`): its hottest
    experts stay resident for good, filling `pin_fraction` (default 0.5) of each pool's slots.
    prefetch: "lookahead": after each MoE layer, the next layer's router scores the current hidden
    states and the experts it would pick are copied in ahead of need (predict/lookahead.py). "sida": a
    trained predictor (`predictor`) scores every MoE layer from the step's tokens in its own thread, and the
    step's predicted experts are copied in, layer by layer, while the first layers compute (predict/ahead.py).
    routing: "exact" (default: the router decides; a prefetch never changes a result), "resident" (under
    a budget, with prefetch="sida", each token's top-k is chosen among the experts resident when its layer
    runs: no layer waits for a copy) or "predicted" (SiDA's: the predictor's top-k replaces the router's choice,
    weighted by the router's scores over them). The last two are approximate: `model.moedeploy.stats()`
    reports how often and by how much they departed from the router.
    predictor: a SiDA predictor file trained for this model (`moedeploy predict train`), for
    prefetch="sida" or routing="predicted"; the demo model's own ships and is the default there.
    placement: in an expert-parallel run (`moedeploy.parallel.init` called in every process torchrun
    started), where the experts live: a placement file (`moedeploy place --out`) or a `Placement`;
    contiguous when None. Each rank then holds only its experts (docs/parallel.md).
    expert_dtype: "int8" or "int4": the routed experts are quantized weight-only (group-wise scales) as they
    load and run on torch's packed CPU kernels (on CUDA each expert dequantized on the device, then a matmul:
    `stats()["expert_kernel"]`); dense weights, routers and shared experts keep `dtype`.
    Under an expert_memory budget the slots hold the quantized form, and a miss copies it from host memory or,
    with expert_store="disk", from moedeploy's quantized cache on disk (see expert_store).
    A pre-quantized checkpoint (config.json's quantization_config: GPT-OSS's "mxfp4" experts, DeepSeek-V3's
    block-scaled "fp8") is detected: its routed experts stay in that form (bank and budget slots; each expert
    dequantized per call, then a matmul in `dtype`: `model.moedeploy.stats()["expert_kernel"]`), its other
    quantized weights are dequantized to `dtype` at load. There, expert_dtype requantizes the dequantized
    experts; the disk store and expert parallelism run them dequantized to `dtype` (quant/ondisk.py).
    group_size: inputs per scale (int8: default the whole row; int4: 32, 64 (default), 128 or 256).
    exchange: in an expert-parallel run, how pairs reach their experts: "all_gather" (default: one
    collective per layer, each rank computing its slots' pairs over every token) or "all_to_all" (the
    paper's: tokens sharded over ranks, sent to their experts' ranks and back, three collectives).
    rebalance: in an expert-parallel run, follow the load online: True (or a placement.OnlineConfig) re-plans
    from recent steps and moves experts between steps, a few layers at a time; outputs do not change.
    """
    cache_options = dict(policy=policy, cache_scope=cache_scope, expert_store=expert_store, pin=pin,
                         pin_fraction=pin_fraction, prefetch=prefetch)
    if expert_memory is None and any(v is not None for v in cache_options.values()):
        raise OptionError(f"{', '.join(cache_options)} apply only with an expert_memory budget")
    if pin_fraction is not None and pin is None:
        raise OptionError("pin_fraction needs pin=<routing trace of this model>")
    if prefetch is not None and prefetch not in PREFETCHERS:
        raise OptionError(f"unknown prefetcher {prefetch!r}; choose one of: {', '.join(PREFETCHERS)}")
    if routing not in ROUTING_MODES:
        raise OptionError(f"unknown routing {routing!r}; choose one of: {', '.join(ROUTING_MODES)}")
    if predictor is not None and prefetch != "sida" and routing != "predicted":
        raise OptionError("predictor applies to prefetch='sida' or routing='predicted'")
    if routing == "resident" and expert_memory is not None and prefetch != "sida":
        raise OptionError("routing='resident' chooses among the experts SiDA's predictor fetched; under a budget it "
                          "needs prefetch='sida' (without it nothing fills the slots and every pair is dropped)")
    if routing != "exact" and (gating != "dynamic" or current_group() is not None):
        raise OptionError(f"routing={routing!r} runs with dynamic gating in one process; leave it out or use "
                          "routing='exact'")
    if expert_store is not None and expert_store not in STORES:
        raise OptionError(f"unknown expert store {expert_store!r}; choose one of: {', '.join(STORES)}")
    opts = LoadOptions.build(device=device, dtype=dtype, gating=gating, capacity_factor=capacity_factor,
                             capacity_fraction=capacity_fraction, backend=backend)
    if rebalance and (current_group() is None or expert_memory is not None):
        raise OptionError("rebalance applies to an expert-parallel run without an expert_memory budget (the cache's "
                          "slots would have to follow the moves): launch with `torchrun --nproc-per-node N -m "
                          "moedeploy ... --rebalance` and leave out the budget")
    quant = _quant(expert_dtype, group_size, opts, placement)
    opts = replace(opts, expert_store=expert_store, buffered=expert_memory is not None, quant=quant,
                   sharding=_sharding(placement, gating, prefetch, pin, exchange))
    path = DEMO_MODEL if path is None else Path(path)
    model, family, opts = build_model(Checkpoint(path), opts)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoELayer)}
    pools = []
    if expert_memory is not None:
        total = sum(m.experts.expert_bytes() * m.experts.num_experts for m in layers.values())
        cache = CacheConfig(budget_bytes=parse_budget(expert_memory, total), policy=policy or "lru",
                            scope=cache_scope or "layer", pin_profile=None if pin is None else str(pin),
                            pin_fraction=0.5 if pin_fraction is None else pin_fraction, prefetch=prefetch)
        make_policy(cache.policy)  # validates the name before any memory is allocated
        pools = attach_cache(layers, cache, opts.device)
        if prefetch == "lookahead":
            attach_lookahead(list(layers.values()))
        opts = replace(opts, cache=cache)
    model.moedeploy = Runtime(path=path, family=family.name, options=opts, layers=layers, pools=pools,
                              group=None if opts.sharding is None else opts.sharding.group, routing=routing)
    _attach_routing(model, routing, prefetch == "sida", predictor)
    if rebalance:  # online rebalancing, hooked before every model step
        config = rebalance if isinstance(rebalance, OnlineConfig) else OnlineConfig()
        model.moedeploy.rebalancer = Rebalancer(list(layers.values()), opts.sharding, config)
        model.register_forward_pre_hook(model.moedeploy.rebalancer)
    return model


def _attach_routing(model, routing: str, sida: bool, predictor) -> None:
    """Set each MoE layer's routing mode, and start SiDA's predictor where prefetching or routing needs it."""
    layers = list(model.moedeploy.layers.values())
    if routing != "exact":
        odd = sorted({type(layer.router.rule).__name__ for layer in layers if not layer.router.restrictable})
        if odd:
            raise OptionError(f"routing={routing!r} needs a router that ranks experts by its logits alone; "
                              f"{model.moedeploy.family}'s {', '.join(odd)} does not (capacity or bias-corrected "
                              "choice): use routing='exact'")
    for layer in layers:
        layer.routing_mode = routing
    if not sida and routing != "predicted":
        return
    from .predict.sida import load_for

    ahead = Ahead(load_for(model, predictor), layers, prefetch=sida, wait=routing != "exact")
    for layer in layers:
        layer.ahead = ahead
    model.register_forward_pre_hook(ahead.hook, with_kwargs=True)
    model.moedeploy.ahead = ahead


def _quant(expert_dtype, group_size, opts: LoadOptions, placement) -> QuantSpec | None:
    """The quantization asked for, or None; refused where this version has no path for it."""
    if expert_dtype is None:
        if group_size is not None:
            raise OptionError("group_size applies to quantized experts: give expert_dtype='int8' or 'int4' too")
        return None
    spec = for_device(QuantSpec(expert_dtype, group_size), opts.device)
    for asked, why in ((opts.gating.mode != "dynamic", "with static gating"),
                       (current_group() is not None or placement is not None, "with expert parallelism yet")):
        if asked:
            raise OptionError(f"quantized experts (expert_dtype={expert_dtype!r}) do not run {why}; "
                              "leave out expert_dtype or that option")
    return spec


def _sharding(placement, gating: str, prefetch, pin, exchange) -> Sharding | None:
    """This rank's share of an expert-parallel run, or None in one process."""
    group = current_group()
    if group is None:
        if placement is not None or exchange is not None:
            raise OptionError("placement= and exchange= apply to an expert-parallel run: launch with `torchrun "
                              "--nproc-per-node N -m moedeploy ... --placement FILE` (or call "
                              "moedeploy.parallel.init() in each process)")
        return None
    for name, value, why in (("gating", gating != "dynamic", "every rank would need every expert"),
                             ("prefetch", prefetch is not None, "the predictors name experts, not ranks' slots"),
                             ("pin", pin is not None, "a pin profile names experts, not ranks' slots")):
        if value:
            raise OptionError(f"{name} is not supported with expert parallelism ({why}); leave it out under torchrun")
    if isinstance(placement, (str, Path)):
        placement = read_placement(placement)
    return Sharding(group, placement, exchange or "all_gather")
