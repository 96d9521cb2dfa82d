"""`moedeploy bench quant`: quantized experts the way llama.cpp users compare quants, in one run.

Per expert dtype (the checkpoint's, then int8 and int4 with their default groups, or --dtypes): perplexity
on the held-out plays and its change against the checkpoint's dtype; expert bytes; decode tokens/s at 1 and
2 threads (greedy, --new-tokens after a short prompt, median of --rounds interleaved rounds: every
configuration once per round, so drift hits them alike); and greedy agreement with the unquantized model
(tokens until the first divergence, per prompt, --new-tokens each).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from ..cliargs import at_least, int_list, read_text
from .layer import machine

HELD_OUT = Path(__file__).resolve().parent.parent / "data" / "heldout"
PROMPTS = ("ROMEO. ", "The king is dead, and ", "Of man's first disobedience")


def _first_divergence(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def run(args) -> int:
    from transformers import AutoTokenizer

    from ..api import load
    from ..evaluate import perplexity
    from ..timing import decode_rate

    args.text = args.text or sorted(HELD_OUT.glob("*.txt"))
    texts = {path: read_text(path, "--text") for path in args.text}  # before any model loads
    dtypes = [None] + [d.strip() for d in args.dtypes.split(",") if d.strip()]
    threads = int_list(args.threads, "--threads", low=1)
    models = {d: load(args.model, expert_dtype=d) for d in dtypes}
    name = lambda d: d or str(next(iter(models[None].parameters())).dtype).removeprefix("torch.")  # noqa: E731
    tokenizer = AutoTokenizer.from_pretrained(models[None].moedeploy.path)
    rows = {}
    for d, model in models.items():
        layers = model.moedeploy.layers.values()
        rows[d] = {"expert_dtype": name(d), "expert_bytes": sum(l.experts.expert_bytes() * l.experts.num_experts
                                                                  for l in layers), "perplexity": {}}
        for text in args.text:
            rows[d]["perplexity"][text.stem] = round(perplexity(model, tokenizer, texts[text]).perplexity, 4)
            print(f"  {name(d)}: {text.stem} perplexity {rows[d]['perplexity'][text.stem]}", file=sys.stderr)
    prompts = [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]
    greedy = {d: [decode_rate(m, ids, args.new_tokens)[1][0, ids.shape[1]:].tolist() for ids in prompts]
              for d, m in models.items()}
    rates = {(d, n): [] for d in dtypes for n in threads}
    for _ in range(args.rounds):
        for n in threads:
            torch.set_num_threads(n)
            for d, model in models.items():
                rates[d, n].append(decode_rate(model, prompts[0], args.new_tokens)[0])
    base = rows[None]
    for d, row in rows.items():
        row["perplexity_change"] = {k: round(v / base["perplexity"][k] - 1, 5) for k, v in row["perplexity"].items()}
        row["decode_tok_s"] = {str(n): round(statistics.median(rates[d, n]), 1) for n in threads}
        row["decode_vs_checkpoint"] = {str(n): round(statistics.median(rates[d, n]) / statistics.median(rates[None, n]), 3)
                                       for n in threads}
        row["agreement_tokens"] = [_first_divergence(a, b) for a, b in zip(greedy[d], greedy[None], strict=True)]
    out = {"machine": machine().__dict__, "model": args.model or "demo", "new_tokens": args.new_tokens,
           "rounds": args.rounds, "rows": list(rows.values())}
    if args.json:
        print(json.dumps(out))
        return 0
    plays = [t.stem for t in args.text]
    print(f"{'experts':>9} {'bytes':>11} " + " ".join(f"{p[:20]:>20}" for p in plays) + " " +
          " ".join(f"{f'tok/s x{n}':>10}" for n in threads) + "  agreement")
    for row in rows.values():
        ppl = " ".join(f"{row['perplexity'][p]:.3f} ({row['perplexity_change'][p]:+.2%})".rjust(20) for p in plays)
        speed = " ".join(f"{row['decode_tok_s'][str(n)]:>10}" for n in threads)
        print(f"{row['expert_dtype']:>9} {row['expert_bytes']:>11,} {ppl} {speed}  {row['agreement_tokens']}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory; default: the embedded demo model")
    p.add_argument("--dtypes", default="int8,int4", help="expert dtypes besides the checkpoint's (default int8,int4)")
    p.add_argument("--text", type=Path, action="append", help="held-out texts (default: the demo's three plays)")
    p.add_argument("--threads", default="1,2", help="torch threads to decode with (default 1,2)")
    p.add_argument("--new-tokens", type=at_least(2), default=64)
    p.add_argument("--rounds", type=at_least(1), default=5)
    p.add_argument("--json", action="store_true")

