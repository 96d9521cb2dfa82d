"""`moedeploy bench layer`: time one MoE layer on this machine, four implementations side by side.

For token counts 1, 2, 4, ..., 4096 and two settings of Huang et al. 2023 ("Towards MoE Deployment",
LM: 512 experts, MT: 128 experts, top-2) it measures router + experts of

- `dynamic`:  moedeploy's `MoELayer` with dynamic gating (sort pairs by expert, backend "auto");
- `static`:   moedeploy's `MoELayer` with static gating (one-hot [G, S, E, C] dispatch/combine, G = 1,
              capacity C = ceil(fraction * S) per expert, the paper's setting);
- `hf_eager`, `hf_grouped_mm`, `hf_batched_mm`: transformers' `MixtralExperts` with each
              `experts_implementation`, fed by the same router.

All share one set of expert weights (gated SiLU FFN; w_in = gate_up_proj [E, 2I, D], w_out = down_proj
[E, D, I], the same storage) and one router module.

Per token count and implementation:
- one untimed call on the first input (also the warm-up) gives the output, checked against
  `hf_eager` (dynamic must agree to 1e-5 relative; static drops pairs when its capacity is short,
  so its dropped-pair fraction is reported instead), and the peak activation memory, tracked by
  `memory.StorageTracker`;
- then samples, interleaved round-robin across implementations, median taken. A sample is
  back-to-back calls timed with `time.perf_counter` on successive inputs of a pool (up to 64 inputs
  of T tokens, the same for all) after an untimed 64 MiB write has emptied the caches. Each input
  routes to other experts, so weights mostly come from memory, as in a real model, rather than from
  a cache kept warm by calling one layer on one input, or by the implementation timed just before.

Memory limits are checked before running, from predicted peak bytes: static gating's S*E*C one-hot
tensors against the budget (12 GiB by default), where they do not fit the table says so; transformers'
batched_mm (a copy of each pair's expert weights) against a lower cap, as it is kept where cheap.

What it does not do: attention, shared experts, real checkpoints (weights and router are random, so
routing is close to balanced; real routers are skewed), dtypes other than float32, several processes,
or GPU-specific settings (it runs on whatever device torch defaults to: the CPU here).

Legend: T = tokens (S = T, one group), E = experts, K = experts per token, P = T*K pairs,
C = capacity, D = hidden size, I = expert intermediate size.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import torch
import transformers
from torch import Tensor
from transformers.activations import ACT2FN
from transformers.models.mixtral.configuration_mixtral import MixtralConfig
from transformers.models.mixtral.modeling_mixtral import MixtralExperts

from ..experts import Activation, ExpertBank
from ..layer import Gating, MoELayer
from ..routing import Router, SoftmaxTopK
from ..static_gating import Capacity
from .memory import StorageTracker

GiB, MiB = 2**30, 2**20
EXACT_RTOL = 1e-5  # dynamic vs hf_eager, max |a - b| / max |b|
MEMORY_TARGET = 0.25  # dynamic's peak activation memory at most this fraction of static's
HF_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
IMPLEMENTATIONS = ("dynamic", "static") + tuple(f"hf_{name}" for name in HF_IMPLEMENTATIONS)


# ---------------------------------------------------------------------------------------------------
# What runs


@dataclass(frozen=True)
class Setting:
    name: str
    num_experts: int
    top_k: int
    capacity_fraction: float  # static gating: C = ceil(fraction * S) slots per expert
    target_speedup: float  # dynamic / static throughput the paper reports at least (Huang et al. 2023)
    about: str


SETTINGS = {
    "lm": Setting("lm", 512, 2, 0.05, 6.21, "the paper's language-modeling setting, capacity 5% of the batch"),
    "mt": Setting("mt", 128, 2, 1.0, 5.75, "the paper's translation setting (NLLB-MoE), capacity = the whole batch"),
}


@dataclass(frozen=True)
class Sizes:
    hidden: int  # D
    intermediate: int  # I

    def expert_bytes(self) -> int:
        return 3 * self.hidden * self.intermediate * 4  # float32 gate, up, down


@dataclass(frozen=True)
class Config:
    settings: tuple[Setting, ...]
    tokens: tuple[int, ...]
    sizes: Sizes
    budget_bytes: int  # an implementation predicted to need more peak memory is not run
    batched_mm_bytes: int  # hf_batched_mm's own, lower cap: it is included only where cheap
    seconds_per_point: float  # timing budget per implementation and token count
    max_seconds_per_point: float  # heavy calls: fewer than min_samples samples to stay within this
    min_samples: int
    max_samples: int
    min_sample_seconds: float  # short calls are repeated (on the next pool inputs) within one sample
    pool_tokens: int  # input pool: pool_tokens // T inputs of T tokens,
    pool_max: int  # at least 2 and at most pool_max
    flush_bytes: int  # written before every sample (untimed) to empty the caches
    threads: int
    seed: int
    quick: bool


# ---------------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Result:
    """One implementation at one token count."""

    impl: str
    predicted_bytes: int
    skipped: str | None = None  # why it did not run, e.g. "dispatch tensors need 17.2 GiB"
    tokens_per_s: float | None = None  # T / median seconds per call
    seconds: float | None = None  # median seconds per call
    seconds_min: float | None = None
    seconds_max: float | None = None
    samples: int = 0
    peak_bytes: int | None = None  # peak activation memory (StorageTracker), output included
    rel_err: float | None = None  # max |y - y_eager| / max |y_eager|
    dropped_fraction: float | None = None  # moedeploy layers: routed pairs dropped for lack of capacity


@dataclass(frozen=True)
class Row:
    tokens: int
    capacity: int  # static gating's C at this token count
    results: tuple[Result, ...]
    hf_best: str  # the HF implementation with the highest throughput here
    dynamic_over_static: float | None  # throughput ratio
    dynamic_over_hf_best: float  # throughput ratio
    static_over_dynamic_memory: float | None  # peak activation memory ratio
    dynamic_exact: bool  # dynamic equals hf_eager to EXACT_RTOL

    def result(self, impl: str) -> Result:
        return next(r for r in self.results if r.impl == impl)


@dataclass(frozen=True)
class Summary:
    static_tokens: tuple[int, ...]  # token counts where static gating ran
    speedup_at_largest: float | None  # dynamic / static throughput at the largest of those
    speedup_min: float | None
    speedup_min_tokens: int | None
    speedup_target: float
    speedup_target_met: bool  # at every token count where static ran
    memory_ratio_at_largest: float | None  # static / dynamic peak memory
    memory_ratio_min: float | None
    memory_target_met: bool  # dynamic <= MEMORY_TARGET * static at every token count where static ran
    hf_ratio_min: float  # min over token counts of dynamic / best-HF throughput
    hf_ratio_min_tokens: int
    hf_slower_tokens: tuple[int, ...]  # token counts where dynamic is slower than HF's best
    hf_target_met: bool
    exact: bool  # dynamic matched hf_eager at every token count


@dataclass(frozen=True)
class SettingReport:
    setting: Setting
    expert_weight_bytes: int
    rows: tuple[Row, ...]
    summary: Summary


@dataclass(frozen=True)
class Machine:
    cores: int | None
    cpu: str
    cpu_capability: str  # the vector instructions torch's CPU kernels use here ("AVX512", "AVX2", ...)
    gpu: str
    torch_threads: int
    torch: str
    transformers: str
    python: str
    platform: str


@dataclass(frozen=True)
class Report:
    benchmark: str
    date: str
    machine: Machine
    config: Config
    settings: tuple[SettingReport, ...]


# ---------------------------------------------------------------------------------------------------
# The contestants


@dataclass(frozen=True)
class Impl:
    name: str
    fn: Callable[[Tensor], Tensor]  # x [T, D] -> y [T, D], router included
    predict: Callable[[int], int]  # T -> predicted peak activation bytes
    big: str  # what dominates the prediction, for the "n/a" message
    limit: int  # not run where the prediction exceeds this
    limit_note: str  # what the limit is, for the "n/a" message
    layer: MoELayer | None = None  # moedeploy's, for the dropped-pair statistics

    def skip_reason(self, tokens: int) -> str | None:
        need = self.predict(tokens)
        return None if need <= self.limit else f"{self.big} need {need / GiB:.1f} GiB > {self.limit_note}"


def _hf_experts(implementation: str, setting: Setting, sizes: Sizes, w_in: Tensor, w_out: Tensor) -> MixtralExperts:
    config = MixtralConfig(hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                           num_local_experts=setting.num_experts, num_experts_per_tok=setting.top_k,
                           hidden_act="silu", experts_implementation=implementation)
    with torch.device("meta"):
        experts = MixtralExperts(config)
    experts.gate_up_proj = torch.nn.Parameter(w_in, requires_grad=False)  # shares storage with the bank
    experts.down_proj = torch.nn.Parameter(w_out, requires_grad=False)
    return experts.eval()


def _with_router(router: Router, experts: MixtralExperts) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:  # x [T, D]
        routing = router(x)  # ids, weights [T, K]
        return experts(x, routing.ids, routing.weights)

    return run


def _activations(setting: Setting, sizes: Sizes, tokens: int) -> int:
    """Rough bytes of one pass's [P, *] activations: x_sorted, h [P, 2I], act [P, I], y [P, D], out."""
    P, D, I = tokens * setting.top_k, sizes.hidden, sizes.intermediate
    return 4 * (P * (2 * D + 3 * I) + 2 * tokens * D) + 8 * tokens * setting.num_experts


def _static_bytes(setting: Setting, sizes: Sizes, tokens: int) -> int:
    """The larger of static gating's two phases: building the one-hot tensors (static_gating.
    dispatch_tensors holds five [S, E, C] floats at once: dispatch and combine, the k-th choice's d
    and c, and a new sum; plus [S, K, E] and [S, E] int64 temporaries), then the padded experts
    (dispatch and combine, and [E, C, *] activations)."""
    E, K, D, I = setting.num_experts, setting.top_k, sizes.hidden, sizes.intermediate
    C = _capacity(setting, tokens)
    one_hot = 4 * tokens * E * C  # one [S, E, C] float32 tensor
    building = 5 * one_hot + 8 * (K + 4) * tokens * (E + 1)
    experts = 2 * one_hot + 4 * E * C * (2 * D + 4 * I)
    return max(building, experts)


def _batched_bytes(setting: Setting, sizes: Sizes, tokens: int) -> int:
    """batched_mm copies each pair's expert weights: [P, 2I, D] and [P, D, I] live together."""
    return tokens * setting.top_k * sizes.expert_bytes() + _activations(setting, sizes, tokens)


def _capacity(setting: Setting, tokens: int) -> int:
    return Capacity(fraction=setting.capacity_fraction).slots(tokens, setting.top_k, setting.num_experts)


def build(setting: Setting, config: Config) -> tuple[Impl, ...]:
    """One router and one set of random expert weights, shared by every implementation."""
    sizes = config.sizes
    g = torch.Generator().manual_seed(config.seed)
    E, D, I = setting.num_experts, sizes.hidden, sizes.intermediate
    w_in = torch.randn(E, 2 * I, D, generator=g) * D**-0.5  # [E, 2I, D] gate rows, then up rows
    w_out = torch.randn(E, D, I, generator=g) * I**-0.5  # [E, D, I]
    router = Router(SoftmaxTopK(setting.top_k, renormalize=True), torch.randn(E, D, generator=g) * D**-0.5)
    bank = ExpertBank(w_in, w_out, Activation(ACT2FN["silu"], gated=True))
    dynamic = MoELayer(router, bank, Gating(mode="dynamic")).eval()
    static = MoELayer(router, bank, Gating(mode="static", capacity=Capacity(fraction=setting.capacity_fraction))).eval()
    small = lambda T: _activations(setting, sizes, T)  # noqa: E731
    budget = config.budget_bytes, f"the {config.budget_bytes / GiB:g} GiB budget"
    impls = [
        Impl("dynamic", dynamic.moe, small, "activations", *budget, layer=dynamic),
        Impl("static", static.moe, lambda T: _static_bytes(setting, sizes, T), "dispatch tensors", *budget, layer=static),
    ]
    for name in HF_IMPLEMENTATIONS:
        fn = _with_router(router, _hf_experts(name, setting, sizes, w_in, w_out))
        if name == "batched_mm":  # included where cheap: its cost grows with copies of whole experts
            cap = min(config.budget_bytes, config.batched_mm_bytes)
            impls.append(Impl("hf_batched_mm", fn, lambda T: _batched_bytes(setting, sizes, T),
                              "per-pair weight copies", cap, f"its {cap / GiB:g} GiB cap (kept where cheap)"))
        else:
            impls.append(Impl(f"hf_{name}", fn, small, "activations", *budget))
    return tuple(impls)


# ---------------------------------------------------------------------------------------------------
# Measuring


def _rel_err(y: Tensor, ref: Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(torch.finfo(ref.dtype).tiny)).item()


@dataclass(frozen=True)
class _Untimed:
    y: Tensor  # [T, D]
    peak_bytes: int
    dropped_fraction: float | None  # moedeploy's layers only


def _untimed(impl: Impl, x: Tensor) -> _Untimed:
    """The one untimed call (also the warm-up): output, peak activation memory, dropped pairs."""
    if impl.layer is not None:
        impl.layer.reset_stats()
    with StorageTracker() as tracker:
        y = impl.fn(x)
    dropped = None if impl.layer is None else impl.layer.dropped_pairs.item() / impl.layer.routed_pairs
    return _Untimed(y, tracker.peak, dropped)


def _inputs(tokens: int, config: Config) -> tuple[Tensor, ...]:
    """The pool of inputs x [T, D] every implementation cycles through, in the same order. Different
    inputs route to different experts, so back-to-back calls read most weights from memory, as in a
    model whose layers' experts do not all fit in cache, instead of re-reading a few cached experts."""
    g = torch.Generator().manual_seed(config.seed + tokens)
    count = min(config.pool_max, max(2, config.pool_tokens // tokens))
    return tuple(torch.randn(tokens, config.sizes.hidden, generator=g) for _ in range(count))


class _Flush:
    """Writes a buffer twice the size of a large last-level cache, so that every sample starts with
    no weights cached, whatever the implementation timed before it left there."""

    def __init__(self, nbytes: int):
        self.buffer = torch.zeros(nbytes // 4)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


@dataclass
class _Runner:
    """One implementation's timing state: where it is in the input pool, calls per sample, samples."""

    impl: Impl
    xs: tuple[Tensor, ...]
    flush: _Flush
    position: int = 0
    calls: int = 1
    wanted: int = 0
    samples: list[float] = dataclasses.field(default_factory=list)

    def sample(self, calls: int) -> float:
        """Seconds per call over `calls` back-to-back calls on the next inputs of the pool."""
        fn, xs, first = self.impl.fn, self.xs, self.position
        self.flush()
        start = time.perf_counter()
        for i in range(first, first + calls):
            fn(xs[i % len(xs)])
        seconds = (time.perf_counter() - start) / calls
        self.position = first + calls
        return seconds


def _time_round_robin(impls: tuple[Impl, ...], xs: tuple[Tensor, ...], config: Config) -> dict[str, list[float]]:
    """Samples (seconds per call) of every implementation, one sample of each in turn; warm-up excluded."""
    flush = _Flush(config.flush_bytes)
    runners = [_Runner(impl, xs, flush) for impl in impls]
    for r in runners:  # calibrate on one call; alone it is a sample too (heavy calls: no time wasted)
        once = r.sample(1)
        r.calls = min(len(xs), max(1, math.ceil(config.min_sample_seconds / once)))
        r.wanted = min(config.max_samples, max(config.min_samples, round(config.seconds_per_point / (once * r.calls))))
        r.wanted = max(1, min(r.wanted, int(config.max_seconds_per_point / once)))  # heavy calls: fewer samples
        if r.calls == 1:
            r.samples.append(once)
    gc.collect()
    gc.disable()
    try:
        while any(len(r.samples) < r.wanted for r in runners):
            for r in runners:
                if len(r.samples) < r.wanted:
                    r.samples.append(r.sample(r.calls))
    finally:
        gc.enable()
    return {r.impl.name: r.samples for r in runners}


def measure(impls: tuple[Impl, ...], setting: Setting, tokens: int, config: Config) -> Row:
    xs = _inputs(tokens, config)
    skipped = {impl.name: impl.skip_reason(tokens) for impl in impls}  # decided before running anything
    runnable = tuple(impl for impl in impls if skipped[impl.name] is None)
    untimed = {impl.name: _untimed(impl, xs[0]) for impl in runnable}
    reference = untimed["hf_eager"].y
    timed = _time_round_robin(runnable, xs, config)
    results = []
    for impl in impls:
        predicted = impl.predict(tokens)
        if skipped[impl.name] is not None:
            results.append(Result(impl.name, predicted, skipped=skipped[impl.name]))
            continue
        u, samples = untimed[impl.name], timed[impl.name]
        median = statistics.median(samples)
        results.append(Result(
            impl.name, predicted, tokens_per_s=tokens / median, seconds=median, seconds_min=min(samples),
            seconds_max=max(samples), samples=len(samples), peak_bytes=u.peak_bytes,
            rel_err=_rel_err(u.y, reference), dropped_fraction=u.dropped_fraction,
        ))
    return _row(tokens, _capacity(setting, tokens), tuple(results))


def _row(tokens: int, capacity: int, results: tuple[Result, ...]) -> Row:
    by = {r.impl: r for r in results}
    dyn, static = by["dynamic"], by["static"]
    hf = [r for r in results if r.impl.startswith("hf_") and r.tokens_per_s is not None]
    best = max(hf, key=lambda r: r.tokens_per_s)
    ran = static.skipped is None
    return Row(
        tokens=tokens, capacity=capacity, results=results, hf_best=best.impl,
        dynamic_over_static=dyn.tokens_per_s / static.tokens_per_s if ran else None,
        dynamic_over_hf_best=dyn.tokens_per_s / best.tokens_per_s,
        static_over_dynamic_memory=static.peak_bytes / dyn.peak_bytes if ran else None,
        dynamic_exact=dyn.rel_err <= EXACT_RTOL,
    )


def summarize(setting: Setting, rows: tuple[Row, ...]) -> Summary:
    with_static = [r for r in rows if r.dynamic_over_static is not None]
    slowest = min(with_static, key=lambda r: r.dynamic_over_static, default=None)
    leanest = min(with_static, key=lambda r: r.static_over_dynamic_memory, default=None)
    worst_hf = min(rows, key=lambda r: r.dynamic_over_hf_best)
    largest = with_static[-1] if with_static else None
    return Summary(
        static_tokens=tuple(r.tokens for r in with_static),
        speedup_at_largest=largest and largest.dynamic_over_static,
        speedup_min=slowest and slowest.dynamic_over_static,
        speedup_min_tokens=slowest and slowest.tokens,
        speedup_target=setting.target_speedup,
        speedup_target_met=bool(with_static) and slowest.dynamic_over_static >= setting.target_speedup,
        memory_ratio_at_largest=largest and largest.static_over_dynamic_memory,
        memory_ratio_min=leanest and leanest.static_over_dynamic_memory,
        memory_target_met=bool(with_static) and leanest.static_over_dynamic_memory >= 1 / MEMORY_TARGET,
        hf_ratio_min=worst_hf.dynamic_over_hf_best,
        hf_ratio_min_tokens=worst_hf.tokens,
        hf_slower_tokens=tuple(r.tokens for r in rows if r.dynamic_over_hf_best < 1),
        hf_target_met=worst_hf.dynamic_over_hf_best >= 1,
        exact=all(r.dynamic_exact for r in rows),
    )


def machine() -> Machine:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    return Machine(cores=os.cpu_count(), cpu=cpu, cpu_capability=torch.backends.cpu.get_cpu_capability(), gpu=gpu,
                   torch_threads=torch.get_num_threads(),
                   torch=torch.__version__, transformers=transformers.__version__,
                   python=platform.python_version(), platform=platform.platform())


def bench(config: Config, progress: Callable[[str], None] = lambda line: None) -> Report:
    reports = []
    with torch.inference_mode():
        for setting in config.settings:
            impls = build(setting, config)
            rows = []
            for tokens in config.tokens:
                started = time.perf_counter()
                rows.append(measure(impls, setting, tokens, config))
                progress(f"{setting.name} T={tokens}: {time.perf_counter() - started:.1f} s")
            del impls
            gc.collect()
            rows = tuple(rows)
            reports.append(SettingReport(setting, setting.num_experts * config.sizes.expert_bytes(), rows,
                                         summarize(setting, rows)))
    return Report("moedeploy bench layer", datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  machine(), config, tuple(reports))


# ---------------------------------------------------------------------------------------------------
# Output


def _rate(v: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if v >= scale:
            return f"{v / scale:.3g}{unit}"
    return f"{v:.3g}"


def _mib(b: int) -> str:
    return f"{b / MiB:.3g}"


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def _cells(r: Result) -> list[str]:
    if r.skipped is not None:
        return ["n/a", f"({r.predicted_bytes / GiB:.1f}G)"]
    return [_rate(r.tokens_per_s), _mib(r.peak_bytes)]


def format_table(report: SettingReport, config: Config) -> str:
    s, sz = report.setting, config.sizes
    head = [f"{s.name.upper()}: {s.about}",
            f"  E={s.num_experts}, top-{s.top_k}, static C=ceil({s.capacity_fraction:g}*S), G=1; D={sz.hidden}, "
            f"I={sz.intermediate}, float32; expert weights {report.expert_weight_bytes / MiB:.0f} MiB; "
            f"columns: tokens/s, peak activation MiB"]
    header = ["T", "C"] + [h for impl in IMPLEMENTATIONS for h in (impl, "MiB")] + [
        "drop", "dyn/static", "dyn/HFbest", "HF best", "mem st/dyn", "dyn err"]
    lines = [header]
    for row in report.rows:
        static = row.result("static")
        drop = "n/a" if static.dropped_fraction is None else f"{static.dropped_fraction:.1%}"
        lines.append([str(row.tokens), str(row.capacity)] + [c for r in row.results for c in _cells(r)] + [
            drop, _ratio(row.dynamic_over_static), _ratio(row.dynamic_over_hf_best), row.hf_best.removeprefix("hf_"),
            _ratio(row.static_over_dynamic_memory), f"{row.result('dynamic').rel_err:.1e}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    table = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    notes = [f"  n/a at T={row.tokens}: {r.impl}: {r.skipped}" for row in report.rows for r in row.results if r.skipped]
    m = report.summary
    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    tail = [
        f"  dynamic/static throughput: {_ratio(m.speedup_at_largest)} at T={m.static_tokens[-1] if m.static_tokens else '-'}"
        f", min {_ratio(m.speedup_min)} at T={m.speedup_min_tokens} (target >= {m.speedup_target}x at every T: "
        f"{met(m.speedup_target_met)})",
        f"  static/dynamic peak memory: {_ratio(m.memory_ratio_at_largest)} at the largest T, min "
        f"{_ratio(m.memory_ratio_min)} (target >= {1 / MEMORY_TARGET:g}x: {met(m.memory_target_met)})",
        f"  dynamic/best-HF throughput: min {_ratio(m.hf_ratio_min)} at T={m.hf_ratio_min_tokens} (target >= 1x at "
        f"every T: {met(m.hf_target_met)}; slower at T={list(m.hf_slower_tokens)})",
        f"  dynamic == hf_eager to {EXACT_RTOL:g} relative at every T: {m.exact}",
    ]
    return "\n".join(head + table + notes + tail)


def to_json(report: Report) -> str:
    return json.dumps(dataclasses.asdict(report), separators=(",", ":"))


# ---------------------------------------------------------------------------------------------------
# Command line


def _tokens(text: str) -> tuple[int, ...]:
    try:
        tokens = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tokens takes comma-separated integers, got {text!r}") from None
    if not tokens or min(tokens) < 1:
        raise argparse.ArgumentTypeError("--tokens needs at least one positive token count")
    return tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--setting", choices=("lm", "mt", "both"), default="both")
    parser.add_argument("--tokens", type=_tokens, default=None, help="comma-separated token counts (default 1,2,4,...,4096)")
    parser.add_argument("--quick", action="store_true", help="smoke test: small sizes, two token counts, few repeats")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--out", metavar="FILE.json", help="also write the JSON to this file")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--hidden-size", type=int, default=None, help="D (default 256; 64 with --quick)")
    parser.add_argument("--intermediate-size", type=int, default=None, help="I per expert (default 512; 128 with --quick)")
    parser.add_argument("--memory-budget-gib", type=float, default=12.0,
                        help="skip an implementation whose predicted peak memory exceeds this (default 12)")
    parser.add_argument("--batched-mm-gib", type=float, default=1.0,
                        help="run hf_batched_mm only while its per-pair weight copies need at most this (default 1)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="timing budget per implementation and token count (default 0.8)")
    parser.add_argument("--seed", type=int, default=0)


def config_from(args: argparse.Namespace) -> Config:
    quick = args.quick
    names = ("lm", "mt") if args.setting == "both" else (args.setting,)
    default_tokens = (1, 16) if quick else tuple(2**i for i in range(13))
    return Config(
        settings=tuple(SETTINGS[n] for n in names),
        tokens=args.tokens or default_tokens,
        sizes=Sizes(args.hidden_size or (64 if quick else 256), args.intermediate_size or (128 if quick else 512)),
        budget_bytes=int(args.memory_budget_gib * GiB),
        batched_mm_bytes=int(args.batched_mm_gib * GiB),
        seconds_per_point=args.seconds if args.seconds is not None else (0.01 if quick else 0.8),
        max_seconds_per_point=30.0,
        min_samples=2 if quick else 3,
        max_samples=3 if quick else 31,
        min_sample_seconds=0.001 if quick else 0.02,
        pool_tokens=4096,
        pool_max=8 if quick else 64,
        flush_bytes=(8 if quick else 64) * MiB,
        threads=args.threads or torch.get_num_threads(),
        seed=args.seed,
        quick=quick,
    )


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    config = config_from(args)
    progress = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    report = bench(config, progress)
    line = to_json(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(line + "\n")
    if not args.json:
        for setting in report.settings:
            print(format_table(setting, config) + "\n")
    print(line)
    return 0 if all(s.summary.exact for s in report.settings) else 1


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="moedeploy bench layer", description=__doc__.splitlines()[0])
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args()))
