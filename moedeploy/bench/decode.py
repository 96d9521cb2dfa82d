"""`moedeploy bench decode`: CPU decode speed against the memory's bandwidth and against llama.cpp, in one run.

Decoding a large MoE on a CPU reads, per token, every dense weight and the K routed experts of every MoE layer:

    bytes per token = dense bytes (without the embedding table: one row is read) + sum over MoE layers of K * expert bytes
    bound (tok/s)   = read bandwidth / bytes per token

The read bandwidth is measured here, per thread count (a sum over 1 GiB of float32), before the first round and
again after every round, and the best is kept (on a shared machine one early measurement can come out low and
put a rate above its "bound"), so each rate is also reported as a share of its bound. Configurations are
`MODEL_DTYPE[+EXPERT_DTYPE][@BACKEND]` (`float32`, `bfloat16`, `bfloat16+int8`, `bfloat16+int4`; `@compiled`
or `@loop` to time another expert kernel than `auto`'s in the same run); llama.cpp runs through
its own `llama-bench` (`--llama-cpp DIR --gguf NAME=FILE ...`: DIR a llama.cpp checkout built in DIR/build;
text generation only, the same number of tokens), its bytes per token read from the GGUF's tensor table
(DIR/gguf-py) the same way. Every round runs every configuration once per thread count, so drift hits them
alike; rates are medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..cliargs import at_least, int_list
from .layer import machine

GIB = 1 << 30


def read_bandwidth(threads: int, repeats: int = 5) -> float:
    """Bytes/s of a plain streaming read (torch.sum over 1 GiB of float32) with `threads` threads, best of `repeats`
    (the GiB is freed after: between measurements it would crowd llama.cpp's GGUFs out of the page cache)."""
    torch.set_num_threads(threads)
    a = torch.ones(GIB // 4)
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a.sum()
        best = max(best, a.numel() * 4 / (time.perf_counter() - start))
    return best


def model_bytes_per_token(model) -> int:
    """Dense weights (less the input embedding, of which a token reads one row, unless it is also the output
    head, which reads it whole) + K experts per MoE layer, in the bytes the model holds."""
    layers = model.moedeploy.layers.values()
    expert_params = {id(t) for layer in layers for t in layer.experts.parameters()}
    expert_params |= {id(t) for layer in layers for t in layer.experts.buffers()}
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embedding
    skip = expert_params if tied else expert_params | {id(embedding)}
    dense = sum(t.numel() * t.element_size() for t in model.parameters() if id(t) not in skip)
    if not tied:
        dense += embedding[0].numel() * embedding.element_size()
    routed = sum(layer.router.rule.top_k * layer.experts.expert_bytes() for layer in layers)
    return dense + routed


def gguf_bytes_per_token(path: Path, llama_cpp: Path, top_k: int, num_experts: int) -> int:
    """The same count from a GGUF's tensor table (llama.cpp's gguf-py): `*_exps` tensors hold all experts; without
    an `output.weight` the embeddings are tied and the head reads `token_embd` whole."""
    sys.path.insert(0, str(llama_cpp / "gguf-py"))
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    tied = not any(t.name == "output.weight" for t in tensors)
    total = 0
    for t in tensors:
        if t.name == "token_embd.weight" and not tied:
            total += int(t.n_bytes) // int(t.shape[-1])  # one row
        elif "_exps" in t.name:
            total += int(t.n_bytes) * top_k // num_experts
        else:
            total += int(t.n_bytes)
    return total


def llama_bench(binary: Path, gguf: Path, threads: int, new_tokens: int, timeout: float) -> float:
    """llama.cpp's decode tokens/s (llama-bench, text generation of `new_tokens`, one repetition)."""
    cmd = [str(binary), "-m", str(gguf), "-p", "0", "-n", str(new_tokens), "-r", "1", "-t", str(threads), "-o", "json"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench decode: llama-bench on {gguf} did not finish in {timeout:.0f} s") from None
    except subprocess.CalledProcessError as ex:
        raise SystemExit(f"bench decode: llama-bench failed on {gguf}:\n{ex.stderr[-2000:]}") from None
    return float(json.loads(out)[0]["avg_ts"])


def _load(model_dir, config: str):
    from ..api import load

    config, _, backend = config.partition("@")
    dtype, _, expert_dtype = config.partition("+")
    return load(model_dir, dtype=dtype, expert_dtype=expert_dtype or None, backend=backend or "auto")


def run(args) -> int:
    from ..timing import decode_rate

    threads = int_list(args.threads, "--threads", low=1)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [g for g in args.gguf or [] if "=" not in g or not g.split("=", 1)[1]]
    if bad:
        raise SystemExit(f"bench decode: --gguf takes NAME=FILE (a name for the table, then the GGUF), got {bad[0]!r}")
    ggufs = dict(g.split("=", 1) for g in args.gguf or [])
    llama_cpp = Path(args.llama_cpp) if args.llama_cpp else None
    binary = llama_cpp / "build" / "bin" / "llama-bench" if llama_cpp else None
    if ggufs and not (binary and binary.is_file()):
        raise SystemExit("bench decode: --gguf needs --llama-cpp DIR, a llama.cpp checkout with build/bin/llama-bench "
                         "(cmake -B build && cmake --build build --target llama-bench)")
    missing = [f for f in ggufs.values() if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"bench decode: --gguf {missing[0]} is not a file")
    log = (lambda line: None) if args.json else (lambda line: print(line, file=sys.stderr))
    bandwidth = {n: read_bandwidth(n) for n in threads}
    log("read bandwidth: " + ", ".join(f"{n} thread(s) {b / 1e9:.1f} GB/s" for n, b in bandwidth.items()))
    models = {c: _load(args.model, c) for c in configs}
    first = next(iter(models.values()))
    layer = next(iter(first.moedeploy.layers.values()))
    top_k, num_experts = layer.router.rule.top_k, layer.experts.num_experts
    per_token = {c: model_bytes_per_token(m) for c, m in models.items()}
    per_token |= {f"llama.cpp {name}": gguf_bytes_per_token(Path(f), llama_cpp, top_k, num_experts)
                  for name, f in ggufs.items()}
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(first.moedeploy.path)(args.prompt, return_tensors="pt")["input_ids"]
    for m in models.values():
        for n in threads:  # warm-up: compiles the decode kernel for each thread count
            torch.set_num_threads(n)
            decode_rate(m, ids, 4)
    rates: dict[tuple[str, int], list[float]] = {(c, n): [] for c in per_token for n in threads}
    for r in range(args.rounds):
        for n in threads:
            torch.set_num_threads(n)
            for c, m in models.items():
                rates[c, n].append(decode_rate(m, ids, args.new_tokens)[0])
            for name, f in ggufs.items():
                rates[f"llama.cpp {name}", n].append(llama_bench(binary, Path(f), n, args.new_tokens, args.timeout))
            bandwidth[n] = max(bandwidth[n], read_bandwidth(n, repeats=2))
        log(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c} x{n} {v[-1]:.1f}" for (c, n), v in rates.items()))
    rows = []
    for c, b in per_token.items():
        for n in threads:
            rate = statistics.median(rates[c, n])
            rows.append({"config": c, "threads": n, "decode_tok_s": round(rate, 1),
                         "range_tok_s": [round(min(rates[c, n]), 1), round(max(rates[c, n]), 1)],  # the rounds' spread
                         "bytes_per_token": b,
                         "bound_tok_s": round(bandwidth[n] / b, 1), "bandwidth_share": round(rate * b / bandwidth[n], 3)})
    out = {"benchmark": "moedeploy bench decode", "date": time.strftime("%Y-%m-%d"), "machine": machine().__dict__,
           "model": str(args.model), "new_tokens": args.new_tokens, "rounds": args.rounds,
           "read_bandwidth": {str(n): round(b) for n, b in bandwidth.items()}, "rows": rows}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{'config':>28} {'threads':>7} {'tok/s':>8} {'rounds':>13} {'MB/token':>9} {'bound tok/s':>11} {'share':>6}")
    for row in rows:
        spread = "{}-{}".format(*row["range_tok_s"])
        print(f"{row['config']:>28} {row['threads']:>7} {row['decode_tok_s']:>8} {spread:>13} "
              f"{row['bytes_per_token'] / 1e6:>9.1f} {row['bound_tok_s']:>11} {row['bandwidth_share']:>6.0%}")
    return 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--configs", default="float32,bfloat16,bfloat16+int8,bfloat16+int4",
                   help="MODEL_DTYPE[+EXPERT_DTYPE][@BACKEND], comma-separated")
    p.add_argument("--threads", default="1,2", help="torch (and llama.cpp) threads (default 1,2)")
    p.add_argument("--llama-cpp", help="a llama.cpp checkout built in DIR/build (llama-bench; gguf-py reads the GGUFs)")
    p.add_argument("--gguf", action="append", metavar="NAME=FILE", help="a GGUF of the same model (repeatable)")
    p.add_argument("--new-tokens", type=at_least(2), default=32)
    p.add_argument("--rounds", type=at_least(1), default=5)
    p.add_argument("--prompt", default="the experts of the model")
    p.add_argument("--timeout", type=float, default=600, help="seconds one llama-bench call may take")
    p.add_argument("--json", action="store_true")
