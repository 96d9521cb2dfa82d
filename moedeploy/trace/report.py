"""Run the whole characterisation of a trace and write it as Markdown, PNG plots and one JSON.

    Trace ──analyze_trace()──┐
    AggregateLoad ──analyze_aggregate()──► Analysis ──write_report(out)──► report.md, *.png, analysis.json

`Analysis` is the one value the writer needs: the results of stats.py (and memory.py, profile.py when
the trace carries a model's memory, config or profile). Sections that need per-token routing are
absent for aggregate counts, and the report says so.

This module does not record or read traces (record.py, io.py) and holds no statistics of its own.

Legend: L = MoE layers, E = experts, D = domains.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import plots, stats
from .memory import Memory, config_memory
from .profile import CATEGORIES, TimeShares
from ..errors import TraceError
from .schema import Trace

ACTIVATION_TOKENS = 4096  # the batch the memory view sizes activations for
PER_TOKEN_ONLY = "batch coverage, temporal locality (reuse distance, cache hit rates) and per-token prediction"


@dataclass(frozen=True)
class Analysis:
    title: str
    source: str
    per_token: bool  # False for aggregate counts (OLMoE)
    num_experts: int
    top_k: int
    layer_labels: tuple[str, ...]  # L
    domains: tuple[str, ...]  # D
    tokens: dict  # domain -> tokens (per-token traces) or routed tokens per layer (aggregate)
    domain_load: np.ndarray  # [D, L, E]
    skew: stats.Skew
    coverage: stats.Coverage | None = None
    locality: dict = field(default_factory=dict)  # domain -> stats.Locality (one cold cache per domain)
    coactivation: stats.CoActivation | None = None
    train_domains: tuple[str, ...] = ()  # where the co-activation counts came from; () = even requests
    pairwise: dict = field(default_factory=dict)  # "a->b" -> pairwise accuracy (aggregate counts)
    shifts: dict = field(default_factory=dict)  # (a, b) -> stats.DomainShift, hot set of a applied to b
    memory: Memory | None = None
    time: TimeShares | None = None
    seconds: dict = field(default_factory=dict)  # section -> seconds it took to compute

    @property
    def load(self) -> np.ndarray:
        return self.domain_load.sum(0)  # [L, E]


def _shifts(domain_load: np.ndarray, domains: tuple[str, ...]) -> dict:
    return {(a, b): stats.domain_shift(domain_load[i], domain_load[j])
            for i, a in enumerate(domains) for j, b in enumerate(domains) if i != j}


def _memory_of(meta) -> Memory | None:
    if "memory" in meta.extra:
        return Memory.from_dict(meta.extra["memory"])
    if "config" in meta.extra:
        return config_memory(meta.extra["config"], meta.family or "deepseek_v2")
    return None


def analyze_trace(trace: Trace, cache_sizes=None, batch_sizes=None, progress: bool = True,
                  train_domains: tuple[str, ...] = ()) -> Analysis:
    """Every analysis of a per-token trace. Locality runs once per domain (each its own cold cache).

    The co-activation predictor is fit on `train_domains` and scored on the others; without them, fit
    on even-numbered requests and scored on odd ones (first and second half of the tokens if only one).
    """
    meta, E = trace.meta, trace.meta.num_experts
    clock, seconds = time.perf_counter(), {}

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        seconds[name] = round(now - clock, 3)
        clock = now

    parts = trace.by_domain()
    domains = tuple(parts)
    domain_load = np.stack([stats.expert_load(t.experts, E) for t in parts.values()])  # [D, L, E]
    sk = stats.skew(domain_load.sum(0))
    lap("load")
    cov = stats.coverage(trace.experts, E, batch_sizes)
    lap("coverage")
    loc = {name: stats.locality(t.experts, E, cache_sizes, progress) for name, t in parts.items()}
    lap("locality")
    requests = np.unique(trace.request)
    if train_domains:
        unknown = set(train_domains) - set(trace.domains)
        if unknown or set(train_domains) >= set(trace.domains):
            raise TraceError(f"--train-domains {sorted(train_domains)} must name some, not all, of the trace's "
                             f"domains {list(trace.domains)}")
        train = np.isin(trace.domain, [trace.domains.index(d) for d in train_domains])
    elif len(requests) > 1:
        train = np.isin(trace.request, requests[::2])
    else:
        train = np.arange(trace.num_tokens) < trace.num_tokens // 2
    co = stats.coactivation(trace.experts, E, train) if meta.num_layers > 1 else None
    lap("coactivation")
    shifts = _shifts(domain_load, domains)
    lap("domain_shift")
    mem = _memory_of(meta)
    lap("memory")
    ts = TimeShares.from_dict(meta.extra["profile"]) if "profile" in meta.extra else None
    title = meta.extra.get("model") or " ".join(x for x in (meta.family, Path(meta.source).name) if x) or "trace"
    return Analysis(title=title, source=meta.source, per_token=True,
                    num_experts=E, top_k=meta.top_k, layer_labels=meta.layer_names, domains=domains,
                    tokens={n: t.num_tokens for n, t in parts.items()}, domain_load=domain_load, skew=sk, coverage=cov,
                    locality=loc, coactivation=co, train_domains=tuple(train_domains), shifts=shifts, memory=mem,
                    time=ts, seconds=seconds)


def analyze_aggregate(agg) -> Analysis:
    """What aggregate counts allow: load, skew, domain shift, pairwise co-activation (rank-aligned)."""
    start = time.perf_counter()
    pooled = {}
    for pairs in agg.cooccurrence.values():
        for key, co in pairs.items():
            pooled[key] = pooled.get(key, 0) + co
    pairwise = {f"{a}->{b}": stats.pairwise_accuracy(co, agg.top_k) for (a, b), co in pooled.items()}
    return Analysis(title=f"{agg.model} (aggregate counts)", source=agg.source, per_token=False,
                    num_experts=agg.num_experts, top_k=agg.top_k, layer_labels=tuple(f"layer {l}" for l in agg.layers),
                    domains=agg.domains, tokens={d: int(agg.load[i, 0].sum() // agg.top_k) for i, d in enumerate(agg.domains)},
                    domain_load=agg.load, skew=stats.skew(agg.load.sum(0)), pairwise=pairwise,
                    shifts=_shifts(agg.load, agg.domains), seconds={"all": round(time.perf_counter() - start, 3)})


# -- output -------------------------------------------------------------------------------------------------
def _r(x, digits: int = 4):
    """Arrays and floats -> JSON-ready, rounded."""
    if isinstance(x, np.ndarray):
        return np.round(x.astype(np.float64), digits).tolist() if x.dtype.kind == "f" else x.tolist()
    if isinstance(x, float | np.floating):
        return round(float(x), digits)
    return x


def _shift_matrices(a: Analysis) -> tuple[np.ndarray, np.ndarray]:
    """[D, D] mean over layers of: share of column's load served by row's hot set; Jaccard of hot sets."""
    D = len(a.domains)
    transfer, jacc = np.eye(D), np.eye(D)
    for i, x in enumerate(a.domains):
        for j, y in enumerate(a.domains):
            if i != j:
                s = a.shifts[(x, y)]
                transfer[i, j] = s.transfer_coverage.mean()
                jacc[i, j] = s.jaccard.mean()
    for j in range(D):  # the diagonal: a domain's own hot set (its busiest quarter) on its own load
        transfer[j, j] = stats.skew(a.domain_load[j]).top_quarter_share.mean()
    return transfer, jacc


def to_json(a: Analysis) -> dict:
    out = {
        "title": a.title, "source": a.source, "per_token": a.per_token, "num_experts": a.num_experts,
        "top_k": a.top_k, "layers": list(a.layer_labels), "domains": list(a.domains), "tokens": a.tokens,
        "seconds": a.seconds,
        "load": {"per_layer_expert": a.load.tolist(),
                 "per_domain": {d: a.domain_load[i].tolist() for i, d in enumerate(a.domains)}},
        "skew": {k: _r(v) for k, v in vars(a.skew).items()},
        "skew_per_domain": {d: {k: _r(v) for k, v in vars(stats.skew(a.domain_load[i])).items()}
                            for i, d in enumerate(a.domains)},
    }
    if a.coverage is not None:
        c = a.coverage
        out["coverage"] = {"batch_sizes": c.batch_sizes.tolist(), "contiguous": _r(c.contiguous),
                           "random": _r(c.random), "uniform": _r(c.uniform),
                           "idle_fraction_random_mean": _r(1 - c.random.mean(1) / a.num_experts)}
    if a.locality:
        out["locality"] = {d: {"cache_sizes": l.cache_sizes.tolist(), "belady": _r(l.belady), "lru": _r(l.lru),
                               "belady_mean": _r(l.belady.mean(1)), "lru_mean": _r(l.lru.mean(1)),
                               "reuse_percentiles_tokens": {"p50": _r(l.reuse_percentiles[0]),
                                                            "p90": _r(l.reuse_percentiles[1]),
                                                            "p99": _r(l.reuse_percentiles[2])},
                               "reuse_histogram_log2": l.reuse_histogram.tolist(),
                               "mean_reuse_tokens": _r(np.nan_to_num(l.mean_reuse, nan=-1.0), 2),
                               "accesses": l.accesses}
                           for d, l in a.locality.items()}
    if a.coactivation is not None:
        c = a.coactivation
        out["coactivation"] = {"predictor": _r(c.predictor), "frequency": _r(c.frequency), "pairwise": _r(c.pairwise),
                               "predictor_mean": _r(c.predictor.mean()), "frequency_mean": _r(c.frequency.mean()),
                               "train_tokens": c.train_tokens, "test_tokens": c.test_tokens,
                               "train_domains": list(a.train_domains) or "even requests"}
    if a.pairwise:
        out["pairwise_rank_aligned"] = {k: _r(v) for k, v in a.pairwise.items()}
    if a.shifts:
        transfer, jacc = _shift_matrices(a)
        out["domain_shift"] = {
            "hot_experts_per_layer": next(iter(a.shifts.values())).hot,
            "transfer_coverage_mean": _r(transfer), "jaccard_mean": _r(jacc),
            "pairs": {f"{x}->{y}": {"jaccard": _r(s.jaccard), "total_variation": _r(s.total_variation),
                                    "transfer_coverage": _r(s.transfer_coverage), "own_coverage": _r(s.own_coverage),
                                    "hot_only_in_a": [list(t) for t in s.only_a],
                                    "hot_only_in_b": [list(t) for t in s.only_b]}
                      for (x, y), s in a.shifts.items()}}
    if a.memory is not None:
        out["memory"] = {**a.memory.as_dict(), "activation_tokens": ACTIVATION_TOKENS,
                         "activation_bytes": (a.memory.kv_bytes_per_token + a.memory.moe_activation_bytes_per_token)
                         * ACTIVATION_TOKENS}
    if a.time is not None:
        shares = a.time.seconds / max(a.time.seconds.sum(), 1e-12)
        out["time"] = {**a.time.as_dict(), "share_of_moe_time": dict(zip(CATEGORIES, _r(shares.sum(0)))),
                       "moe_share_of_model_time": _r(a.time.seconds.sum() / max(a.time.model_seconds, 1e-12))}
    return out


def _pct(x) -> str:
    return f"{100 * float(x):.1f}%"


def write_report(a: Analysis, out: str | Path) -> dict:
    """Write report.md, the PNGs and analysis.json under `out`; returns the JSON object."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = to_json(a)
    L, E, K = len(a.layer_labels), a.num_experts, a.top_k
    domains = ", ".join(f"{d or 'trace'} ({n:,} tokens)" for d, n in a.tokens.items())
    md = [f"# Routing characterisation: {a.title}", "",
          f"Source: `{a.source}`. {L} MoE layers, {E} experts per layer, top-{K}. Domains: {domains}.", ""]
    if not a.per_token:
        md += [f"These are aggregate counts: {PER_TOKEN_ONLY} need per-token traces and are not shown.", ""]

    ticks = [int(x.split()[-1]) for x in a.layer_labels] if not a.per_token else None
    plots.load_heatmap(a.load, list(a.layer_labels), out / "load_heatmap.png", f"{a.title}: expert load per layer")
    plots.skew(a.skew.gini, a.skew.top_quarter_share, out / "skew.png", "load skew per layer", ticks)
    s = a.skew
    md += ["## Expert load and skew", "", "![load heatmap](load_heatmap.png)", "", "![skew](skew.png)", "",
           "| | mean over layers | min | max |", "| --- | --- | --- | --- |"]
    for name, v in (("Gini", s.gini), ("normalised entropy", s.normalized_entropy),
                    ("top-quarter share", s.top_quarter_share), ("busiest / mean", s.max_over_mean)):
        md.append(f"| {name} | {v.mean():.3f} | {v.min():.3f} | {v.max():.3f} |")
    md.append("")
    if len(a.domains) > 1:
        md += ["Per domain (mean over layers):", "", "| domain | Gini | top-quarter share | busiest / mean |",
               "| --- | --- | --- | --- |"]
        for i, d in enumerate(a.domains):
            ds = stats.skew(a.domain_load[i])
            md.append(f"| {d} | {ds.gini.mean():.3f} | {ds.top_quarter_share.mean():.3f} | {ds.max_over_mean.mean():.3f} |")
        md.append("")

    if a.coverage is not None:
        c = a.coverage
        plots.coverage(c, out / "coverage.png", "distinct experts per batch")
        md += ["## Distinct experts per batch (idle experts)", "", "![coverage](coverage.png)", "",
               "| tokens in batch | " + " | ".join(str(b) for b in c.batch_sizes) + " |",
               "| --- |" + " --- |" * len(c.batch_sizes),
               "| consecutive | " + " | ".join(f"{v:.1f}" for v in c.contiguous.mean(1)) + " |",
               "| random | " + " | ".join(f"{v:.1f}" for v in c.random.mean(1)) + " |",
               "| uniform routing | " + " | ".join(f"{v:.1f}" for v in c.uniform) + " |", ""]
    if a.locality:
        plots.cache(a.locality, out / "cache_hit_rate.png", "ideal (Belady) and LRU cache, per layer")
        plots.reuse(a.locality, out / "reuse_distance.png", "reuse distance")
        first = next(iter(a.locality.values()))
        md += ["## Temporal locality", "", "![cache hit rate](cache_hit_rate.png)", "",
               "![reuse distance](reuse_distance.png)", "",
               "Hit rate of a per-layer expert cache (mean over layers, cold start; Belady = optimal offline):", "",
               "| domain | policy | " + " | ".join(str(x) for x in first.cache_sizes) + " | median reuse (tokens) |",
               "| --- | --- |" + " --- |" * len(first.cache_sizes) + " --- |"]
        for d, l in a.locality.items():
            for name, v in (("Belady", l.belady), ("LRU", l.lru)):
                md.append(f"| {d or 'trace'} | {name} | " + " | ".join(f"{x:.3f}" for x in v.mean(1))
                          + f" | {np.nanmean(l.reuse_percentiles[0]):.1f} |")
        md.append("")
    if a.coactivation is not None:
        c = a.coactivation
        plots.coactivation(c, out / "coactivation.png", "predicting layer l+1's experts from layer l's")
        md += ["## Cross-layer co-activation", "", "![co-activation](coactivation.png)", "",
               f"Counts from {c.train_tokens:,} tokens ({', '.join(a.train_domains) or 'even requests'}), "
               f"accuracy on {c.test_tokens:,} others: "
               f"the co-activation predictor gets {_pct(c.predictor.mean())} of layer l+1's {K} experts right "
               f"(per layer pair {_pct(c.predictor.min())}..{_pct(c.predictor.max())}); guessing l+1's {K} most used "
               f"experts gets {_pct(c.frequency.mean())}; uniform guessing {_pct(K / E)}.", ""]
    if a.pairwise:
        md += ["## Cross-layer co-activation (aggregate, rank-aligned)", "",
               "Share of co-activations whose partner is among the expert's top-K partners: "
               + ", ".join(f"layers {k}: {_pct(v)}" for k, v in a.pairwise.items())
               + f" (uniform: {_pct(K / E)}). The counts pair a token's r-th choice at one layer with its r-th choice "
               "at the other, so they are not directly comparable with the per-token measure.", ""]
    if a.shifts:
        transfer, jacc = _shift_matrices(a)
        labels = [d or "trace" for d in a.domains]
        plots.matrix(transfer, labels, out / "domain_shift.png",
                     f"share of column's load served by row's hot {next(iter(a.shifts.values())).hot} experts",
                     "workload served", "hot set chosen on")
        md += ["## Domain shift", "", "![domain shift](domain_shift.png)", "",
               f"Hot set = each layer's busiest {next(iter(a.shifts.values())).hot} experts. Mean over layers; "
               "diagonal: a domain's own hot set.", "",
               "| hot set from \\ load of | " + " | ".join(labels) + " |", "| --- |" + " --- |" * len(labels)]
        for i, d in enumerate(labels):
            md.append(f"| {d} | " + " | ".join(f"{transfer[i, j]:.3f}" for j in range(len(labels))) + " |")
        md += ["", "Jaccard overlap of hot sets (mean over layers): "
               + ", ".join(f"{labels[i]}/{labels[j]} {jacc[i, j]:.2f}" for i in range(len(labels))
                           for j in range(i + 1, len(labels))) + ".", ""]
    if a.memory is not None:
        m = a.memory
        plots.memory(m, out / "memory.png", "weights vs activations", ACTIVATION_TOKENS)
        gib = 2.0 ** 30
        md += ["## Memory", "", "![memory](memory.png)", "",
               f"Weights {m.weight_bytes / gib:.2f} GiB ({m.total_params:,} parameters, {m.bytes_per_param} bytes each); "
               f"routed experts {m.expert_bytes / gib:.2f} GiB = {_pct(m.expert_share)} of the model, "
               f"{m.bytes_per_expert / 2**20:.2f} MiB per expert. Active per token: {m.active_params_per_token:,} "
               f"parameters. Activations: KV cache {m.kv_bytes_per_token / 1024:.1f} KiB per token, one MoE layer's "
               f"buffers {m.moe_activation_bytes_per_token / 1024:.1f} KiB per token; for {ACTIVATION_TOKENS} tokens "
               f"{(m.kv_bytes_per_token + m.moe_activation_bytes_per_token) * ACTIVATION_TOKENS / gib:.2f} GiB.", ""]
    if a.time is not None:
        plots.time_shares(a.time, out / "time_shares.png", "time per MoE layer")
        t = data["time"]
        md += ["## Time per MoE layer", "", "![time shares](time_shares.png)", "",
               f"Over {a.time.steps} profiled steps, MoE layers took {_pct(t['moe_share_of_model_time'])} of the "
               "model's time; within them: " + ", ".join(f"{k} {_pct(v)}" for k, v in t["share_of_moe_time"].items()
                                                        if v or k == "transfer")
               + ". Transfers are 0: no expert cache exists yet, every expert is resident.", ""]
    md += [f"Computed in {sum(a.seconds.values()):.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in a.seconds.items())}).",
           "", "All numbers are in `analysis.json`."]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "analysis.json").write_text(json.dumps(data))
    return data
