"""Decode rates of the resident model and of budgets with and without lookahead prefetch, interleaved in
one process (every configuration once per round, each round from an empty cache), so that a noisy
machine moves them together; with --profile, a cProfile and a torch.profiler summary of 50% with and
without prefetch. The numbers in docs/benchmarks.md ("End to end on a GPU") came from this script.

    PYTHONPATH=. python scripts/gpu-decode-interleaved.py MODEL [--device cuda] [--rounds 5] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moedeploy
from moedeploy.timing import decode_rate


def reset(model) -> None:
    if hasattr(model, "moedeploy"):  # transformers' own model has no cache
        model.moedeploy.empty_cache()


def profile(model, ids, tokens: int) -> None:
    reset(model)
    prof = cProfile.Profile()
    prof.enable()
    decode_rate(model, ids, tokens)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumtime").print_stats(r"moedeploy", 14)
    print(out.getvalue())
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    reset(model)
    with torch.profiler.profile(activities=activities) as prof:
        decode_rate(model, ids, tokens // 2)
    print(prof.key_averages().table(sort_by="self_cuda_time_total" if len(activities) > 1 else "self_cpu_time_total",
                                    row_limit=10, max_name_column_width=36))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budgets", default="0.1,0.5")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    ids = AutoTokenizer.from_pretrained(args.model)("ROMEO.\nBut soft, what light", return_tensors="pt").input_ids
    ids = ids.to(args.device)
    models = {"transformers": AutoModelForCausalLM.from_pretrained(args.model, dtype="auto").to(args.device),
              "resident": moedeploy.load(args.model, device=args.device)}
    for budget in map(float, args.budgets.split(",")):
        for prefetch in ("lookahead", None):
            models[f"{budget:g} {prefetch or 'no-prefetch'}"] = moedeploy.load(
                args.model, device=args.device, expert_memory=budget, expert_store="host", prefetch=prefetch)
    for model in models.values():
        decode_rate(model, ids, 4)  # warm-up
    rates = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            reset(model)
            rates[name].append(decode_rate(model, ids, args.new_tokens)[0])
    for name, model in models.items():
        stats = model.moedeploy.cache_stats() if hasattr(model, "moedeploy") and model.moedeploy.pools else None
        per_token = 1e3 / (args.new_tokens - 1)
        print(json.dumps(dict(config=name, median_tok_s=round(statistics.median(rates[name]), 1),
                              rates=[round(r, 1) for r in rates[name]],
                              stall_ms_per_token=stats and round(stats["stall_s"] * per_token, 2),
                              prefetch_ms_per_token=stats and round(stats["prefetch_s"] * per_token, 2))))
    if args.profile:
        for name in [n for n in models if n.startswith("0.5")]:
            print(f"--- {name}")
            profile(models[name], ids, args.new_tokens)


if __name__ == "__main__":
    main()
