"""`moedeploy bench parallel`: expert-parallel throughput with 1, 2, 4 ... ranks per placement, in one run.

Each configuration is its own launch: one plain process for 1 rank (the baseline), `torchrun
--nproc-per-node N` for more, every rank with one thread. Each runs `moedeploy eval-ppl` over the same
text (teacher forcing: prefill-shaped steps of --context tokens) and `moedeploy generate` (decode), and
reports tokens per second, the share of its time rank 0 spent inside the collectives, the share of
pair rows it sent to other ranks, for each exchange (`all_gather`: one collective per layer;
`all_to_all`: the paper's three), and the busiest rank's load (max/mean
pairs per rank, mean over layers). The baseline runs first and last; ratios are to the mean of the two.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from ..cliargs import int_list
from ..errors import MoeDeployError
from .layer import machine

HELD_OUT = Path(__file__).resolve().parent.parent / "data" / "heldout" / "tempest.txt"


def _launch(ranks: int, command: list[str], timeout: float) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("WORLD_SIZE", None)
    prefix = [sys.executable, "-m", "moedeploy"] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}", "-m", "moedeploy"]
    try:
        run = subprocess.run([*prefix, *command, "--json"], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as ex:
        raise MoeDeployError(f"{' '.join(command[:1])} with {ranks} ranks did not finish in {timeout:g} s") from ex
    if run.returncode != 0:
        lines = run.stderr.strip().splitlines()
        said = [line for line in lines if "moedeploy: error" in line or "Error:" in line] or lines[-1:]
        raise MoeDeployError(f"{command[0]} with {ranks} ranks failed: {said[0] if said else 'no message'}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _one(args, ranks: int, name: str, file: str | None, exchange: str | None = None) -> dict:
    common = ["--dtype", args.dtype] + (["--model", args.model] if args.model else [])
    common += ["--placement", file] if file else []
    common += ["--exchange", exchange] if exchange else []
    ppl = _launch(ranks, ["eval-ppl", "--text", str(args.text), "--context", str(args.context), *common], args.timeout)
    gen = _launch(ranks, ["generate", "--prompt", "ROMEO. ", "--max-new-tokens", str(args.new_tokens), *common],
                  args.timeout)
    par = ppl.get("parallel") or {}
    row = {"placement": name, "ranks": ranks, "exchange": exchange or "-", "tokens": ppl["tokens"],
           "prefill_tok_s": round(ppl["tokens"] / ppl["seconds"], 1),
           "decode_tok_s": gen["stats"]["decode_tokens_per_s"],
           "comm_share": round(par["comm_s"] / ppl["seconds"], 3) if par else 0.0,
           "decode_comm_share": round(gen["stats"]["parallel"]["comm_s"] / gen["stats"]["total_s"], 3)
           if par else 0.0,
           "sent_share": par.get("sent_share", 0.0), "max_mean_load": par.get("max_mean_load"),
           "expert_bytes_rank0": par.get("expert_bytes_this_rank")}
    print(f"  {name:>12} x{ranks} {row['exchange']:>10}: prefill {row['prefill_tok_s']:8.1f} tok/s, "
          f"decode {row['decode_tok_s']} tok/s, "
          f"collectives {row['comm_share']:.0%} / {row['decode_comm_share']:.0%}, rows sent {row['sent_share']:.0%}, "
          f"max/mean {row['max_mean_load']}", file=sys.stderr)
    return row


def run(args) -> int:
    ranks = int_list(args.ranks, "--ranks")
    placements = [("contiguous", None)]
    for spec in args.placement or []:
        name, sep, file = spec.partition("=")
        missing = [file.format(ranks=n) for n in ranks if not Path(file.format(ranks=n)).is_file()]
        if not sep or missing:
            raise MoeDeployError(f"--placement takes NAME=FILE with existing files ({{ranks}} in FILE stands for the "
                                 f"rank count), got {spec!r}" + (f"; missing: {', '.join(missing)}" if missing else ""))
        placements.append((name, file))
    first = _one(args, 1, "one process", None)
    exchanges = [x.strip() for x in args.exchange.split(",") if x.strip()]
    rows = [_one(args, n, name, file and file.format(ranks=n), x)
            for name, file in placements for n in ranks if n > 1 for x in exchanges]
    last = _one(args, 1, "one process", None)
    base = {k: statistics.mean([first[k], last[k]]) for k in ("prefill_tok_s", "decode_tok_s")}
    for row in rows:
        row["prefill_vs_one"] = round(row["prefill_tok_s"] / base["prefill_tok_s"], 3)
        row["decode_vs_one"] = round(row["decode_tok_s"] / base["decode_tok_s"], 3)
    out = {"machine": machine().__dict__, "model": args.model or "demo", "dtype": args.dtype, "context": args.context,
           "baseline": [first, last], "rows": rows}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{'placement':>12} {'ranks':>5} {'exchange':>10} {'prefill tok/s':>13} {'vs one':>7} "
              f"{'decode tok/s':>12} {'vs one':>7} "
              f"{'collectives':>11} {'rows sent':>9} {'max/mean':>8}")
        for row in [first, *rows, last]:
            print(f"{row['placement']:>12} {row['ranks']:>5} {row['exchange']:>10} {row['prefill_tok_s']:>13} "
                  f"{row.get('prefill_vs_one', 1.0):>7} "
                  f"{row['decode_tok_s']:>12} {row.get('decode_vs_one', 1.0):>7} {row['comm_share']:>11.1%} "
                  f"{row['sent_share']:>9.1%} {row['max_mean_load'] or '-':>8}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory; default: the embedded demo model")
    p.add_argument("--ranks", default="2,4", help="rank counts besides the one-process baseline (default 2,4)")
    p.add_argument("--placement", action="append", help="NAME=FILE from `moedeploy place --out` (repeatable); "
                   "{ranks} in FILE stands for the rank count, e.g. greedy=plans/greedy{ranks}.json; "
                   "contiguous always runs")
    p.add_argument("--text", type=Path, default=HELD_OUT, help="text for eval-ppl (default: the held-out Tempest)")
    p.add_argument("--exchange", default="all_gather,all_to_all", help="exchanges to compare (default both)")
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--timeout", type=float, default=900, help="seconds per launch before it counts as hung")
    p.add_argument("--json", action="store_true")
