"""`moedeploy place`: plan expert placements on the past of a trace, score them on its future.

    moedeploy place --trace T --devices N [--slots S] [--algorithm NAME[,NAME]] [--plan-on 0.5 | --eval-trace T2]
                    [--batch 64,1024] [--domain NAME ...] [--eval-domain NAME ...] [--expert-bytes BYTES]
                    [--every TOKENS] [--window TOKENS] [--penalty P] [--move-tokens TOKENS] [--json] [--out P.json]

    trace ─► plan tokens (the first --plan-on fraction, or all of --trace with --eval-trace)
          ─► policies.* ─► Placement per algorithm ─► evaluate on the rest (or T2), per batch size
             online: replicate on the plan tokens, then online.run_online over the evaluation batches

contiguous, round_robin, greedy and anticorrelation place one slot per expert (S = E); replicate and
online use --slots (default E). --out writes one placement: the first algorithm asked for (with several,
a note on stderr says which); for online, its final placement at the first --batch. With --json,
exactly one JSON object on stdout; progress goes to stderr.

This module parses arguments and calls the library; it holds no logic the library lacks.
"""

from __future__ import annotations

import json
import sys
import time

from ..errors import OptionError, PlacementError

DEFAULT_BATCHES = "64,1024"


def _algorithms(values: list[str] | None) -> list[str]:
    from .policies import ALGORITHMS

    names = [n.strip() for v in (values or [",".join(ALGORITHMS)]) for n in v.split(",") if n.strip()]
    bad = [n for n in names if n not in ALGORITHMS]
    if bad or not names:
        raise OptionError(f"unknown --algorithm {', '.join(bad) or '(empty)'}; choose from {', '.join(ALGORITHMS)}")
    return list(dict.fromkeys(names))


def _select(trace, domains: list[str] | None, flag: str, path: str):
    """The tokens of `trace` in the given domains (trace order), or all of it."""
    import numpy as np

    if not domains:
        return trace
    missing = [d for d in domains if d not in trace.domains]
    if missing:
        raise OptionError(f"{flag} {', '.join(missing)} not in {path} (it has: {', '.join(trace.domains)})")
    ids = [trace.domains.index(d) for d in domains]
    return trace.select(np.isin(trace.domain, ids))


def _named(path: str, domains: list[str] | None) -> str:
    return f"{path} ({', '.join(domains)})" if domains else path


def _expert_bytes(meta, given: int | None) -> int | None:
    """--expert-bytes, else what the trace's metadata says about the model, else unknown."""
    if given is not None:
        if given < 1:
            raise OptionError(f"--expert-bytes must be positive, got {given}")
        return given
    if "memory" in meta.extra or "config" in meta.extra:
        from ..trace.report import _memory_of

        try:
            return int(_memory_of(meta).bytes_per_expert) or None
        except Exception:  # noqa: BLE001 - an unreadable config only loses the byte count, not the run
            return None
    return None


def _model_of(meta):
    from .plan import ModelShape

    return ModelShape(meta.num_layers, meta.num_experts, meta.top_k, meta.source)


def cmd_place(args) -> int:
    from tqdm.auto import tqdm

    from ..cliargs import int_list
    from ..trace import load_trace
    from . import policies
    from .evaluate import evaluate, evaluate_slots
    from .load import LoadStats
    from .online import OnlineConfig, run_online

    algorithms = _algorithms(args.algorithm)
    batches = int_list(args.batch, "--batch")
    if not batches or min(batches) < 1:
        raise OptionError(f"--batch takes positive token counts, got {args.batch!r}")
    trace = _select(load_trace(args.trace), args.domain, "--domain", args.trace)
    model = _model_of(trace.meta)
    if args.eval_trace:
        if args.plan_on is not None:
            raise OptionError("give either --plan-on (split --trace) or --eval-trace, not both")
        other = _select(load_trace(args.eval_trace), args.eval_domain, "--eval-domain", args.eval_trace)
        diff = model.differs(_model_of(other.meta))
        if diff:
            raise PlacementError(f"--eval-trace {args.eval_trace} is of another model than --trace {args.trace} "
                                 f"({', '.join(diff)}); evaluate on a trace of the same model")
        plan_x, eval_x = trace.experts, other.experts
        split = {"plan": _named(args.trace, args.domain), "eval": _named(args.eval_trace, args.eval_domain)}
    else:
        if args.eval_domain:
            raise OptionError("--eval-domain selects domains of --eval-trace; give --eval-trace too")
        fraction = 0.5 if args.plan_on is None else args.plan_on
        if not 0 < fraction < 1:
            raise OptionError(f"--plan-on is the fraction of the trace's tokens to plan on, in (0, 1); got {fraction}")
        n = int(trace.num_tokens * fraction)
        plan_x, eval_x = trace.experts[:n], trace.experts[n:]
        split = {"plan": f"the first {fraction:g} of {_named(args.trace, args.domain)}",
                 "eval": f"the remaining {1 - fraction:g}"}
    E = model.num_experts
    slots = E if args.slots is None else args.slots
    for S in {E, slots} if any(a in policies.ONE_REPLICA for a in algorithms) else {slots}:
        policies._check(model, args.devices, S)  # impossible shapes fail here, once, before any work
    expert_bytes = _expert_bytes(trace.meta, args.expert_bytes)
    config = OnlineConfig(every=args.every, window=args.window, penalty=args.penalty, move_tokens=args.move_tokens)

    start = time.perf_counter()
    stats = LoadStats.of(plan_x, E)
    plans, plan_s = {}, {}
    for a in algorithms:
        t = time.perf_counter()
        if a == "contiguous":
            plans[a] = policies.contiguous(model, args.devices)
        elif a == "round_robin":
            plans[a] = policies.round_robin(model, args.devices)
        elif a == "greedy":
            plans[a] = policies.greedy(stats.total, model, args.devices)
        elif a == "anticorrelation":
            plans[a] = policies.anticorrelation(stats, model, args.devices)
        else:  # replicate, and online's starting point
            plans[a] = policies.replicate(stats.total, model, args.devices, slots)
        plan_s[a] = time.perf_counter() - t

    results, finals = [], {}
    with tqdm(total=len(algorithms) * len(batches), desc="moedeploy: placing", unit="run", disable=None,
              leave=False, file=sys.stderr) as bar:
        for a in algorithms:
            for B in batches:
                moved = None
                if a == "online":
                    run = run_online(plans[a], plan_x, eval_x, B, config)
                    ev = evaluate_slots(eval_x, E, B, args.devices, run.slots, run.share)
                    finals.setdefault(a, run.final)
                    moved = {"replans": run.replans, "layer_moves": run.layer_moves, "slots_moved": run.moved_slots}
                else:
                    ev = evaluate(plans[a], eval_x, B)
                entry = {"algorithm": a, "batch": B, "slots": plans[a].num_slots, **ev.balanced.as_dict(),
                         "by_share": ev.by_share.as_dict(), "plan_seconds": round(plan_s[a], 4),
                         "slots_moved": moved["slots_moved"] if moved else 0,
                         "bytes_moved": (moved["slots_moved"] if moved else 0) * expert_bytes if expert_bytes else None}
                if moved:
                    entry.update(replans=moved["replans"], layer_moves=moved["layer_moves"])
                results.append(entry)
                bar.update()

    out_note = None
    if args.out:
        first = algorithms[0]
        placement = finals.get(first, plans[first])
        path = placement.save(args.out)
        out_note = {"path": str(path), "algorithm": first}
        if len(algorithms) > 1:
            print(f"moedeploy: wrote the {first} placement to {path} (the first of {len(algorithms)} algorithms; "
                  "give one --algorithm to choose)", file=sys.stderr)
    summary = {"trace": args.trace, "eval_trace": args.eval_trace, "plan": split["plan"], "eval": split["eval"],
               "plan_tokens": int(plan_x.shape[0]), "eval_tokens": int(eval_x.shape[0]), "devices": args.devices,
               "num_experts": E, "num_layers": model.num_layers, "top_k": model.top_k, "expert_bytes": expert_bytes,
               "online": config.__dict__ if "online" in algorithms else None, "results": results, "out": out_note,
               "seconds": round(time.perf_counter() - start, 2)}
    if args.json:
        print(json.dumps(summary))
    else:
        _print_tables(summary, batches)
    return 0


def _print_tables(s: dict, batches: list[int]) -> None:
    print(f"plan on {s['plan']} ({s['plan_tokens']:,} tokens); evaluate on {s['eval']} ({s['eval_tokens']:,} tokens); "
          f"{s['devices']} devices, {s['num_layers']} layers x {s['num_experts']} experts, top-{s['top_k']}")
    head = ("algorithm", "slots", "max/mean", "worst batch", "fixed split", "balancedness", "max load",
            "avg max load", "cross-device", "moved")
    for B in batches:
        rows = [r for r in s["results"] if r["batch"] == B]
        print(f"\nbatch {B} tokens ({rows[0]['batches']} batches); max/mean = busiest / mean device, mean over "
              "layers and batches, per-batch replica choice; fixed split = the same with replicas split by share")
        table = [head] + [(r["algorithm"], str(r["slots"]), f"{r['max_mean_load']:.3f}",
                           f"{r['max_mean_load_worst']:.3f}", f"{r['by_share']['max_mean_load']:.3f}",
                           f"{r['balancedness']:.3f}", f"{r['max_load']:.0f}", f"{r['avg_max_load']:.1f}",
                           f"{r['cross_device_fraction']:.1%}", _moved(r)) for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        for row in table:
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def _moved(r: dict) -> str:
    if r["algorithm"] != "online":
        return "-"
    if r["bytes_moved"] is None:
        return f"{r['slots_moved']} slots"
    return f"{r['bytes_moved'] / 2**30:.2f} GiB"


def add_commands(sub) -> None:
    from .online import OnlineConfig
    from .policies import ALGORITHMS

    d = OnlineConfig()
    p = sub.add_parser("place", help="plan expert placements over devices on a trace's past, score them on its future")
    p.add_argument("--trace", required=True, help="a Parquet trace or ESFT directory to plan on")
    p.add_argument("--devices", type=int, required=True, help="devices (expert-parallel ranks)")
    p.add_argument("--slots", type=int, help="slots per layer for replicate and online (default: one per expert); "
                   "the one-replica algorithms always use one slot per expert")
    p.add_argument("--algorithm", action="append", metavar="NAME[,NAME]",
                   help=f"{', '.join(ALGORITHMS)} (repeatable or comma-separated; default all)")
    p.add_argument("--plan-on", type=float, metavar="FRACTION",
                   help="plan on this first fraction of the trace's tokens, evaluate on the rest (default 0.5)")
    p.add_argument("--eval-trace", help="evaluate on this trace (same model) and plan on all of --trace")
    p.add_argument("--domain", action="append", help="only these domains of --trace (repeatable; trace order)")
    p.add_argument("--eval-domain", action="append", help="only these domains of --eval-trace (repeatable)")
    p.add_argument("--batch", default=DEFAULT_BATCHES, help=f"evaluation batch sizes in tokens (default {DEFAULT_BATCHES})")
    p.add_argument("--expert-bytes", type=int, help="bytes of one expert's weights, for bytes moved (default: from "
                   "the trace's model metadata when it has any)")
    p.add_argument("--every", type=int, default=d.every, help=f"online: re-plan every this many tokens (default {d.every})")
    p.add_argument("--window", type=int, default=d.window,
                   help=f"online: plan on the most recent this many tokens (default {d.window})")
    p.add_argument("--penalty", type=float, default=d.penalty,
                   help=f"online: cost of moving one expert, in mean device loads (default {d.penalty})")
    p.add_argument("--move-tokens", type=int, default=d.move_tokens,
                   help=f"online: one layer's move completes per this many tokens served (default {d.move_tokens})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", help="write a placement file (the first --algorithm; online: its final placement at "
                   "the first --batch)")
    p.set_defaults(func=cmd_place)
