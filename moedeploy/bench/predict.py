"""`moedeploy bench predict`: SiDA at run time on the demo model, against no prefetch and the lookahead, in one run.

Three parts, each on the held-out plays (never tuned on):

- cost: the predictor's parameters and its time per decode step (one token, state carried) against the
  model's own decode step, both measured here, one after the other, medians.
- decode: per budget (fraction of expert bytes), greedy generation of --new-tokens after a prompt taken
  from the held-out text, each configuration once per round, rounds interleaved (drift hits all alike),
  every round from an empty cache. Configurations: no prefetch (LRU), lookahead, sida (exact routing),
  sida + resident routing, sida + predicted routing. Reported: decode tokens/s and its ratio to no
  prefetch at the same budget, demand misses, prefetches and stall time per token, departures from the
  router, and whether exact configurations generated the resident model's tokens. Expert bytes moved per token
  too, and with `--device cuda` the transfer bound: those bytes over the measured pinned host-to-device
  bandwidth, in ms per token, against the measured ms per token.
- serve: the engine (engine/) given --requests prompts from the held-out text at once, half of them running
  and the rest queued, --new-tokens each, greedy: no prefetch, SiDA prefetch (exact routing), and SiDA with
  queued prompts predicted ahead (`Ahead.queued`, on by default on CUDA only) per budget, rounds interleaved;
  tokens/s, its ratio to no prefetch, and whether each generated the resident engine's tokens. The predictor
  scores all running requests' decode tokens in one batched step (predict/ahead.py).
- quality: perplexity in decode order (one token per forward with a KV cache, as generation runs) over
  the first --max-tokens tokens of the held-out text, for exact routing, predicted routing (independent
  of the budget) and resident routing per budget; the change against exact and the departures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from ..cliargs import at_least
from .layer import machine

HELD_OUT = Path(__file__).resolve().parent.parent / "data" / "heldout"
PLAYS = ("tempest.txt", "twelfth_night.txt")
CPU = torch.device("cpu")
HOST = {"expert_store": "host"}  # budgets wait in host memory, as on a GPU: what is measured is the cache and the
# predictor, not reads from disk (the CPU's default store)
CONFIGS = {  # name -> load options beside the budget
    "no prefetch": {},
    "lookahead": {"prefetch": "lookahead"},
    "sida": {"prefetch": "sida"},
    "sida resident": {"prefetch": "sida", "routing": "resident"},
    "sida predicted": {"prefetch": "sida", "routing": "predicted"},
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cost(model, ids: torch.Tensor, steps: int = 200) -> dict:
    """The predictor's time per decode step against the model's (ms, medians over `steps`)."""
    from ..engine.runner import cache_keyword
    from ..predict.sida import load_for

    predictor = load_for(model)
    name = cache_keyword(model)
    times = {"predictor": [], "model": []}
    with torch.inference_mode():
        _, state = predictor.forward(ids)
        out = model(input_ids=ids, use_cache=True)
        token = ids[:, -1:]
        for _ in range(steps):
            _sync(ids.device)
            start = time.perf_counter()
            _, state = predictor.forward(token, state)
            _sync(ids.device)
            times["predictor"].append(time.perf_counter() - start)
            start = time.perf_counter()
            out = model(input_ids=token, use_cache=True, **{name: out[name]})
            _sync(ids.device)
            times["model"].append(time.perf_counter() - start)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"predictor_parameters": predictor.parameter_count(), "model_parameters": sum(
        p.numel() for p in model.parameters()) + sum(layer.experts.parameter_count() for layer in
                                                       model.moedeploy.layers.values()),
            "predictor_ms_per_step": round(ms["predictor"], 3), "model_ms_per_step": round(ms["model"], 3),
            "predictor_share": round(ms["predictor"] / ms["model"], 3)}


def decode(budgets, ids, new_tokens: int, rounds: int, h2d: float | None = None) -> list[dict]:
    """The decode part on `ids`' device; `h2d` (CUDA: pinned host-to-device bytes/s) adds the transfer bound."""
    from ..api import load
    from ..timing import decode_rate, since

    device = ids.device
    resident = load(device=device)
    models = {(None, "resident"): resident} | {(b, name): load(device=device, expert_memory=b, **HOST, **opts)
                                               for b in budgets for name, opts in CONFIGS.items()}
    rates = {key: [] for key in models}
    last = {}
    for _ in range(rounds):
        for key, model in models.items():
            model.moedeploy.empty_cache()
            model.moedeploy.reset_stats()
            prompt = {}  # the statistics once the prompt step is over: the decode steps' are the difference
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the streaming notice of the prompt step
                rate, out = decode_rate(model, ids, new_tokens, on_first=lambda m=model, p=prompt: p.update(
                    cache=m.moedeploy.cache_stats(), stats=m.moedeploy.stats()))
            rates[key].append(rate)
            last[key] = (out, since(prompt["cache"], model.moedeploy.cache_stats()),
                         since(prompt["stats"], model.moedeploy.stats()))
    rows = []
    steps = new_tokens - 1  # decode steps after the first new token
    for budget, name in models:
        out, cache, stats = last[(budget, name)]
        rate = statistics.median(rates[(budget, name)])
        base = statistics.median(rates[(budget, "no prefetch")]) if budget is not None else rate
        row = {"budget": budget, "config": name, "decode_tokens_per_s": round(rate, 2),
               "vs_no_prefetch": round(rate / base, 3),
               "same_tokens_as_resident": bool(torch.equal(out, last[(None, "resident")][0]))}
        if cache is not None:
            row |= {"misses_per_token": round(cache["misses"] / steps, 3),
                    "prefetched_per_token": round(cache["prefetched"] / steps, 3),
                    "useful_prefetches_per_token": round(cache["prefetch_hits"] / steps, 3),
                    "stall_ms_per_token": round(cache["stall_s"] / steps * 1e3, 3),
                    "bytes_moved_per_token": round(cache["bytes_moved"] / steps)}
            if h2d:
                row |= {"ms_per_token": round(1e3 / rate, 3),
                        "transfer_bound_ms_per_token": round(cache["bytes_moved"] / steps / h2d * 1e3, 3)}
        if "departed_pairs" in stats:
            row["departed_fraction"] = round(stats["departed_pairs"] / max(stats["routed_pairs"], 1), 4)
        rows.append(row)
    return rows


def serve(budgets, prompts: list[list[int]], new_tokens: int, rounds: int, device: torch.device = CPU) -> list[dict]:
    from transformers import AutoTokenizer

    from ..api import DEMO_MODEL, load
    from ..engine import Engine, EngineConfig, SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    config = EngineConfig(max_running=max(1, len(prompts) // 2))
    want = [o.tokens for o in Engine(load(device=device), tokenizer, config).generate(prompts, greedy)]
    configs = {"no prefetch": {}, "sida": {"prefetch": "sida"}, "sida queued": {"prefetch": "sida"}}
    models = {(b, name): load(device=device, expert_memory=b, **HOST, **opts) for b in budgets
              for name, opts in configs.items()}
    for (_, name), model in models.items():
        if name.startswith("sida"):
            model.moedeploy.ahead.queued = name == "sida queued"
    rates, same = {key: [] for key in models}, {}
    for _ in range(rounds):
        for key, model in models.items():
            model.moedeploy.empty_cache()
            engine = Engine(model, tokenizer, config)
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = engine.generate(prompts, greedy)
            rates[key].append(len(prompts) * new_tokens / (time.perf_counter() - start))
            same[key] = [o.tokens for o in out] == want
    rows = []
    for budget, name in models:
        rate, base = statistics.median(rates[(budget, name)]), statistics.median(rates[(budget, "no prefetch")])
        rows.append({"budget": budget, "config": name, "requests": len(prompts), "tokens_per_s": round(rate, 2),
                     "vs_no_prefetch": round(rate / base, 3), "same_tokens_as_resident": same[(budget, name)]})
    return rows


def quality(budgets, text: str, max_tokens: int, context: int, device: torch.device = CPU) -> list[dict]:
    from transformers import AutoTokenizer

    from ..api import DEMO_MODEL, load
    from ..evaluate import perplexity

    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    runs = [(None, {}), (None, {"routing": "predicted"})] + [
        (b, {"expert_memory": b, "prefetch": "sida", "routing": "resident", **HOST}) for b in budgets]
    rows, exact = [], None
    for budget, opts in runs:
        model = load(device=device, **opts)
        start = time.perf_counter()
        result = perplexity(model, tokenizer, text, context=context, decode=True, limit=max_tokens, progress=True)
        stats, cache = model.moedeploy.stats(), model.moedeploy.cache_stats()
        exact = exact or result.perplexity
        rows.append({"budget": budget, "routing": stats["routing"], "tokens": result.tokens,
                     "perplexity": round(result.perplexity, 4),
                     "change_vs_exact": round(result.perplexity / exact - 1, 5),
                     "departed_fraction": round(stats.get("departed_fraction", 0.0), 4),
                     "departed_weight_per_token": round(stats.get("departed_weight_per_token", 0.0), 4),
                     "demand_misses": None if cache is None else cache["misses"],
                     "seconds": round(time.perf_counter() - start, 1)})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budgets", default="0.1,0.2,0.5", help="fractions of all expert bytes")
    parser.add_argument("--new-tokens", type=at_least(2), default=64)
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--prompt-tokens", type=int, default=64, help="prompt length, from the held-out text")
    parser.add_argument("--max-tokens", type=int, default=8192, help="held-out tokens scored per quality run")
    parser.add_argument("--context", type=int, default=256, help="tokens per scored window")
    parser.add_argument("--requests", type=at_least(1), default=8, help="requests served together (part serve)")
    parser.add_argument("--parts", default="cost,decode,serve,quality", help="which parts to run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the model runs; on cuda the experts wait in pinned host memory (default cpu)")
    parser.add_argument("--json", action="store_true", help="print only the JSON object")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from ..api import DEMO_MODEL, load
    from ..cliargs import fractions
    from ..errors import MoeDeployError

    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = fractions(args.budgets)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"cost", "decode", "serve", "quality"}:
        raise MoeDeployError(f"--parts takes cost, decode, serve and quality, got {args.parts!r}")
    text = "".join((HELD_OUT / name).read_text(encoding="utf-8") for name in PLAYS)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MoeDeployError("--device cuda: torch sees no CUDA device here; leave out --device to run on the CPU")
    tokenizer = AutoTokenizer.from_pretrained(DEMO_MODEL)
    ids = tokenizer(text[:20000], return_tensors="pt").input_ids[:, : args.prompt_tokens].to(device)
    h2d = None
    if device.type == "cuda":
        from .offload import h2d_bandwidth

        h2d = h2d_bandwidth()
    report = {"benchmark": "moedeploy bench predict", "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": asdict(machine()), "device": args.device, "h2d_bytes_per_s": h2d, "text": list(PLAYS),
              "new_tokens": args.new_tokens, "rounds": args.rounds}
    if "cost" in parts:
        report["cost"] = cost(load(device=device), ids)
        _print(args, "cost", [report["cost"]])
    if "decode" in parts:
        report["decode"] = decode(budgets, ids, args.new_tokens, args.rounds, h2d)
        _print(args, "decode", report["decode"])
    if "serve" in parts:
        step = len(text) // args.requests
        prompts = [tokenizer(text[i * step : i * step + 2000]).input_ids[: args.prompt_tokens]
                   for i in range(args.requests)]
        report["serve"] = serve(budgets, prompts, args.new_tokens, args.rounds, device)
        _print(args, "serve", report["serve"])
    if "quality" in parts:
        report["quality"] = quality(budgets, text, args.max_tokens, args.context, device)
        _print(args, "quality", report["quality"])
    print(json.dumps(report))
    exact = [r for r in report.get("decode", []) if r["config"] in ("no prefetch", "lookahead", "sida")]
    return 0 if all(r["same_tokens_as_resident"] for r in exact + report.get("serve", [])) else 1


def _print(args, title: str, rows: list[dict]) -> None:
    if args.json or not rows:
        return
    print(f"== {title}")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(str(r.get(k, "-")) for k in keys))
