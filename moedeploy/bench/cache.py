"""`moedeploy bench cache`: greedy decoding under expert-memory budgets, against the same model with
every expert resident, in one run.

For each budget (a fraction of all expert bytes) and policy, the model is loaded with that budget
and, in every round, generates the same number of tokens from the same prompt, starting from an
empty cache; rounds interleave all configurations, and the median decode rate (tokens after the
first, per second) is reported with its ratio to the fully resident model, plus the cache's misses,
bytes moved, copy stall time and peak resident expert bytes. Every configuration's tokens must equal
the resident model's.

On a CPU, host and device memory are one, so the ratios measure what the cache's bookkeeping and
copies cost, not a PCIe link (the experts wait in host memory, `expert_store="host"`, not on disk, the CPU's
default). GPUs are not covered (expert buffering is CPU-only for now); the disk
store, prefetching, peak memory and transformers + accelerate offloading are in `bench offload`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from ..cliargs import at_least
from ..timing import decode_rate
from .layer import machine

BUDGETS = (0.1, 0.25, 0.5, 1.0)


@dataclass(frozen=True)
class Row:
    budget: float | None  # fraction of all expert bytes; None = every expert resident, no cache
    policy: str | None
    decode_tokens_per_s: float
    ratio_to_resident: float
    identical: bool  # the same tokens as the resident model
    miss_rate: float | None
    bytes_moved: int | None
    stall_s: float | None
    peak_resident_bytes: int | None  # all pools together
    budget_bytes: int | None


def bench(model_path, budgets, policies, new_tokens: int, rounds: int, prompt: str) -> list[Row]:
    from transformers import AutoTokenizer

    from ..api import load

    resident = load(model_path)
    ids = AutoTokenizer.from_pretrained(resident.moedeploy.path)(prompt, return_tensors="pt").input_ids
    configs = [(None, None, resident)] + [(b, p, load(model_path, expert_memory=b, policy=p, expert_store="host"))
                                          for b in budgets for p in policies]
    rates = {i: [] for i in range(len(configs))}
    outputs = {}
    for _ in range(rounds):
        for i, (_, _, model) in enumerate(configs):
            model.moedeploy.empty_cache()
            rate, out = decode_rate(model, ids, new_tokens)
            rates[i].append(rate)
            outputs[i] = out
    base = statistics.median(rates[0])
    rows = []
    for i, (budget, policy, model) in enumerate(configs):
        cache = model.moedeploy.cache_stats()  # the last round's, from an empty cache
        rate = statistics.median(rates[i])
        rows.append(Row(budget=budget, policy=policy, decode_tokens_per_s=round(rate, 2),
                        ratio_to_resident=round(rate / base, 3), identical=bool(torch.equal(outputs[i], outputs[0])),
                        miss_rate=cache and round(cache["miss_rate"], 4), bytes_moved=cache and cache["bytes_moved"],
                        stall_s=cache and round(cache["stall_s"], 4),
                        peak_resident_bytes=cache and cache["peak_resident_bytes"],
                        budget_bytes=cache and cache["budget_bytes"]))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="checkpoint directory; default: the embedded demo model")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="fractions of all expert bytes")
    parser.add_argument("--policies", default="lru,lifo", help="comma-separated eviction policies")
    parser.add_argument("--new-tokens", type=at_least(2), default=64)
    parser.add_argument("--rounds", type=at_least(1), default=3)
    parser.add_argument("--prompt", default="ROMEO.\nBut soft, what light")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")


def run(args: argparse.Namespace) -> int:
    from ..cliargs import fractions

    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = fractions(args.budgets)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    rows = bench(args.model, budgets, policies, args.new_tokens, args.rounds, args.prompt)
    report = {"benchmark": "moedeploy bench cache", "date": started, "machine": asdict(machine()),
              "new_tokens": args.new_tokens, "rounds": args.rounds, "rows": [asdict(r) for r in rows]}
    if not args.json:
        print(f"{'budget':>7s} {'policy':>6s} {'decode tok/s':>12s} {'vs resident':>11s} {'same tokens':>11s} "
              f"{'miss rate':>9s} {'MB moved':>8s} {'stall s':>8s} {'peak/budget':>11s}")
        for r in rows:
            fill = f"{r.peak_resident_bytes / r.budget_bytes:.2f}" if r.budget_bytes else "-"
            print(f"{'all' if r.budget is None else r.budget:>7} {r.policy or '-':>6s} {r.decode_tokens_per_s:12.1f} "
                  f"{r.ratio_to_resident:10.3f}x {str(r.identical):>11s} "
                  f"{'-' if r.miss_rate is None else f'{r.miss_rate:.3f}':>9s} "
                  f"{'-' if r.bytes_moved is None else f'{r.bytes_moved / 1e6:.1f}':>8s} "
                  f"{'-' if r.stall_s is None else f'{r.stall_s:.3f}':>8s} {fill:>11s}")
    print(json.dumps(report))
    return 0 if all(r.identical for r in rows) else 1
