"""`moedeploy simulate`: replay a routing trace through the expert cache, one point or a sweep, with or
without prefetching (`--prefetch history|sida`, prefetch.py; the scores from scores.py). Also registers `moedeploy predict` (predict/cli.py)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from ..cliargs import int_list
from ..errors import MoeDeployError
from .replay import CostModel, replay

SWEEP_POLICIES = ("lru", "lfu", "fifo", "lifo", "belady")


def cmd_simulate(args) -> int:
    from ..trace import load_trace

    trace = load_trace(args.trace)
    if args.domain:
        domains = trace.by_domain()
        if args.domain not in domains:
            raise MoeDeployError(f"--domain {args.domain!r} is not in the trace (it has: {', '.join(domains)})")
        trace = domains[args.domain]
    cost = replace(CostModel(), **{k: v for k, v in (("expert_bytes", args.expert_bytes), ("link_gbps", args.link_gbps),
                                                       ("memory_gbps", args.memory_gbps)) if v is not None})
    capacities = int_list("8,16,32" if args.sweep and args.capacity is None else args.capacity or "16", "--capacity",
                          low=1)
    if args.prefetch != "none":
        return _simulate_prefetch(args, trace, capacities, cost)
    policies = SWEEP_POLICIES if args.sweep else (args.policy,)
    results = [replay(trace, policy, c, cost, progress=not args.json) for policy in policies for c in capacities]
    out = {"trace": str(args.trace), "domain": args.domain, "tokens": trace.num_tokens, "layers": trace.meta.num_layers,
           "experts": trace.meta.num_experts, "top_k": trace.meta.top_k, "cost_model": cost.__dict__,
           "results": [r.as_dict() for r in results]}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "simulate.json").write_text(json.dumps(out, indent=1))
        if args.sweep:
            _plot(results, trace.meta.num_experts, Path(args.out) / "miss_rate.png")
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{trace.num_tokens:,} tokens x {trace.meta.num_layers} layers, top-{trace.meta.top_k} of "
          f"{trace.meta.num_experts}; decode order, per-layer caches")
    print(f"{'policy':8s} {'capacity':>8s} {'miss rate':>10s} {'GB moved':>9s} {'ms/token':>9s} {'(all resident)':>15s}")
    for r in results:
        print(f"{r.policy:8s} {r.capacity:8d} {r.miss_rate:10.3f} {r.bytes_moved / 1e9:9.1f} "
              f"{r.seconds_per_token * 1e3:9.2f} {r.all_resident_seconds_per_token * 1e3:15.2f}")
    return 0


def _prefetch_config(args, policy: str):
    from .prefetch import PrefetchConfig

    base = PrefetchConfig()
    score = replace(base.score, **{k: v for k, v in (("lookahead", args.lookahead),) if v is not None})
    given = {k: v for k, v in (("width", args.prefetch_width), ("threshold", args.prefetch_threshold)) if v is not None}
    return replace(base, evict=policy, score=score, **given)


def _simulate_prefetch(args, trace, capacities: list[int], cost) -> int:
    from . import scores
    from .prefetch import EVICTIONS, replay_prefetch

    policies = EVICTIONS if args.sweep else (args.policy,)
    cfg = _prefetch_config(args, policies[0])
    notes = []
    if args.prefetch == "history" and args.predictor and Path(args.predictor).suffix != ".npz":
        from ..predict import files
        from ..predict.routenet import KIND, RouteConfig  # a trained trace predictor
        from .prefetch import ROUTENET_THRESHOLD

        pf = files.read(args.predictor)
        kind = pf.kind
        if kind != KIND:
            raise MoeDeployError(f"{args.predictor} is a {kind!r} predictor; --prefetch history takes a trace "
                                 f"predictor (`moedeploy predict train --trace`) or a co-occurrence table (.npz)"
                                 + ("; a SiDA predictor goes with --prefetch sida, on a trace with token ids"
                                    if kind == "sida" else ""))
        if args.lookahead is None:  # its own lookahead (a different --lookahead is refused by scores.of)
            cfg = replace(cfg, score=replace(cfg.score, lookahead=RouteConfig.from_dict(pf.config).lookahead))
            notes.append(f"lookahead {cfg.score.lookahead}: the predictor's own")
        if args.prefetch_threshold is None:
            cfg = replace(cfg, threshold=ROUTENET_THRESHOLD)
            notes.append(f"threshold {ROUTENET_THRESHOLD}: the trained predictor's default")
    S = scores.of(trace, args.prefetch, args.predictor, cfg.score, args.model)
    belady = {c: replay(trace, "belady", c, cost).misses for c in capacities}
    results = [replay_prefetch(trace, c, None, replace(cfg, evict=p), cost, belady[c], S=S)
               for p in policies for c in capacities]
    out = {"trace": str(args.trace), "domain": args.domain, "tokens": trace.num_tokens, "prefetch": args.prefetch,
           "predictor": args.predictor, "notes": notes, "cost_model": cost.__dict__,
           "results": [r.as_dict() for r in results]}
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "simulate.json").write_text(json.dumps(out, indent=1))
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{trace.num_tokens:,} tokens x {trace.meta.num_layers} layers; decode order, per-layer caches, prefetch "
          f"{args.prefetch} (predictor {args.predictor or 'online only'}); ratios are to Belady without prefetch")
    print(f"width {cfg.width}, threshold {cfg.threshold}, lookahead {cfg.score.lookahead}"
          + "".join(f"; {n}" for n in notes))
    print("stalls: demand misses and useful prefetches still copying when their layer ran (late); stall time: "
          "seconds layers waited for copies, against Belady's (one whole copy per miss)")
    print(f"{'evict':9s} {'capacity':>8s} {'misses':>7s} {'belady':>7s} {'late':>8s} {'stalls x':>8s} {'time x':>7s} "
          f"{'prefetch':>9s} {'useful':>7s} {'GB moved':>9s} {'bytes x':>7s} {'ms/token':>9s} {'(all resident)':>15s}")
    for r in results:
        accesses = r.hits + r.misses
        print(f"{r.policy:9s} {r.capacity:8d} {r.miss_rate:7.3f} {r.belady_misses / accesses:7.3f} "
              f"{r.late_prefetch_hits:8d} {r.stall_ratio:8.2f} {r.stall_time_ratio:7.2f} {r.prefetched:9d} "
              f"{r.prefetch_hits:7d} {r.bytes_moved / 1e9:9.1f} {r.bytes_ratio:7.2f} {r.seconds_per_token * 1e3:9.2f} "
              f"{r.all_resident_seconds_per_token * 1e3:15.2f}")
    return 0


def _plot(results, num_experts: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for policy in dict.fromkeys(r.policy for r in results):
        rows = [r for r in results if r.policy == policy]
        ax.plot([r.capacity for r in rows], [r.miss_rate for r in rows], marker="o", label=policy)
    ax.set_xlabel(f"resident experts per layer (of {num_experts})")
    ax.set_ylabel("miss rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def add_commands(sub) -> None:
    s = sub.add_parser("simulate", help="replay a routing trace through the expert cache with a cost model")
    s.add_argument("--trace", required=True, help="a Parquet trace or an ESFT domain directory")
    s.add_argument("--domain", help="only this domain of a multi-domain trace")
    s.add_argument("--policy", default="lru", help="lru, lfu, fifo, lifo (the paper's) or belady (offline optimum); "
                   "with --prefetch: lru or predicted")
    s.add_argument("--capacity", help="resident experts per layer, comma-separated (default 16; 8,16,32 with --sweep)")
    s.add_argument("--sweep", action="store_true", help="every policy at every --capacity (default 8,16,32 then)")
    s.add_argument("--out", help="directory for simulate.json (and miss_rate.png with --sweep)")
    s.add_argument("--expert-bytes", type=int, help="bytes of one expert (default: DeepSeek-V2-Lite in bf16)")
    s.add_argument("--link-gbps", type=float, help="host-to-device bandwidth, GB/s (default 25)")
    s.add_argument("--memory-gbps", type=float, help="device memory bandwidth, GB/s (default 2000)")
    s.add_argument("--prefetch", default="none", help="none (default), history (a trace-history predictor), sida "
                   "(SiDA's over the trace's token ids) or oracle (a perfect predictor: the bound for any): prefetch "
                   "what it scores highest; --sweep then runs evictions lru and predicted (lookahead needs hidden "
                   "states: refused)")
    s.add_argument("--predictor", help="with history: a .npz from `moedeploy predict fit` (its counts are the prior; "
                   "without one the table learns online only) or a .safetensors from `moedeploy predict train --trace`; "
                   "with sida: a SiDA predictor (default: the demo model's)")
    s.add_argument("--model", help="with --prefetch sida: the model the trace was recorded from (default the demo)")
    s.add_argument("--lookahead", type=int, help="layers between issuing a prefetch and its use (default 1; a "
                   "trained predictor's own, and another is refused)")
    s.add_argument("--prefetch-width", type=int, help="at most this many experts prefetched per layer (default 6)")
    s.add_argument("--prefetch-threshold", type=float, help="prefetch only experts scoring at least this (default "
                   "0.4; 0.7 with a trained predictor, .safetensors)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_simulate)

