"""One rank of the expert-parallel tests, launched by tests/test_parallel.py under torchrun.

    torchrun --nproc-per-node N tests/ep_worker.py --model DIR --out FILE [--placement NAME=FILE ...]
        [--budget 0.5] [--rebalance] [--spin SECONDS --ready DIR [--stall]]

For each placement (and contiguous) and each exchange (all_gather, all_to_all), loads the model in float32,
computes the logits of fixed input ids, a greedy continuation and the serving engine's batched answers (also
with an expert cache per rank, and with --rebalance while moving experts online); rank 0 saves them with
torch.save. --spin runs forward passes until killed (the failure tests), after writing this rank's pid into
--ready; with --stall the last rank stops answering.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

from moedeploy import load, parallel
from moedeploy.errors import MoeDeployError
from moedeploy.parallel.layer import EXCHANGES

IDS = torch.tensor([[5, 17, 3, 44, 9, 28, 61, 2, 33, 12, 7, 50]])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out")
    p.add_argument("--placement", action="append", default=[], help="NAME=FILE")
    p.add_argument("--budget", type=float)
    p.add_argument("--rebalance", action="store_true", help="also: the last placement, rebalanced online")
    p.add_argument("--spin", type=float)
    p.add_argument("--ready")
    p.add_argument("--stall", action="store_true", help="with --spin: the last rank stops answering once ready")
    p.add_argument("--timeout", type=float, default=60)
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="moedeploy: the expert budget")  # budget 0.5 streams: expected
    group = parallel.init(torch.device("cpu"), timeout_s=args.timeout)
    try:
        if args.spin:
            return spin(args, group)
        results = {}
        runs = [(spec, exchange, None) for spec in ["contiguous=", *args.placement] for exchange in EXCHANGES]
        runs += [(spec, None, args.budget) for spec in ["contiguous=", *args.placement] if args.budget]
        for spec, exchange, budget in runs:  # each placement with each exchange, and with an expert cache
            name, _, file = spec.partition("=")
            model = load(args.model, dtype="float32", placement=file or None, expert_memory=budget, exchange=exchange)
            with torch.inference_mode():
                logits = model(IDS).logits
                tokens = model.generate(IDS[:, :4], max_new_tokens=12, do_sample=False, pad_token_id=0,
                                        attention_mask=torch.ones(1, 4, dtype=torch.long))
            results[f"{name}/{exchange}" if budget is None else f"{name}@{budget}"] = {
                "logits": logits, "tokens": tokens, "engine": engine_tokens(model),
                "parallel": model.moedeploy.parallel_stats()}
        if args.rebalance:  # re-plan every 4 tokens from the last 8, a layer per token: moves during generate
            from moedeploy.placement.online import OnlineConfig

            model = load(args.model, dtype="float32", placement=file or None,
                         rebalance=OnlineConfig(every=4, window=8, penalty=0.0, move_tokens=1))
            with torch.inference_mode():
                logits = model(IDS).logits
                tokens = model.generate(IDS[:, :4], max_new_tokens=12, do_sample=False, pad_token_id=0,
                                        attention_mask=torch.ones(1, 4, dtype=torch.long))
                logits_after = model(IDS).logits  # with the placement the moves left
            results["rebalanced"] = {"logits": logits_after, "tokens": tokens, "engine": engine_tokens(model),
                                     "parallel": model.moedeploy.parallel_stats()}
        if group.rank == 0:
            torch.save(results, args.out)
    except MoeDeployError as ex:
        print(f"moedeploy: error (rank {group.rank}): {ex}", file=sys.stderr)
        return 2
    parallel.close()
    return 0


def engine_tokens(model) -> list[list[int]]:
    """Three prompts of different lengths batched by the serving engine (chunked prefill, decodes)."""
    from transformers import AutoTokenizer

    from moedeploy.engine import Engine, EngineConfig, SamplingParams

    engine = Engine(model, AutoTokenizer.from_pretrained(model.moedeploy.path), EngineConfig(max_batch_tokens=8))
    outputs = engine.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
    return [o.tokens for o in outputs]


PROMPTS = [IDS[0, :3].tolist(), IDS[0].tolist(), IDS[0, 5:].tolist()]


def spin(args, group) -> int:
    model = load(args.model, dtype="float32")
    with open(os.path.join(args.ready, f"rank{group.rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    end = time.monotonic() + args.spin
    with torch.inference_mode():
        while time.monotonic() < end:
            if args.stall and group.rank == group.world - 1:
                time.sleep(args.spin)  # alive but silent: the others' next collective must time out
            model(IDS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
