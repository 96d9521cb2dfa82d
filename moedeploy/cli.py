"""The command line: `moedeploy generate | eval-ppl | serve | bench ... | trace | analyze | simulate | predict | make-tiny`.

The top of the import graph: sub-commands live beside what they drive (bench/, trace/cli.py, sim/cli.py,
predict/cli.py) and share their argument helpers through `cliargs.py`; nothing imports this module.

Environment variables are read here and nowhere else. With --json a command prints exactly one JSON
object on stdout; progress and warnings go to stderr. A moedeploy error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .cliargs import add_load_options, load_options, read_text
from .errors import MoeDeployError
from .timing import TokenClock


def _recording(model, path: str | None):
    """Record the routing of everything run inside, into `path` (Parquet); nothing when path is None."""
    from contextlib import nullcontext

    from .trace import record

    return nullcontext() if path is None else record(model)


def cmd_generate(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .api import load

    if args.max_new_tokens < 1:
        raise MoeDeployError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    start = time.perf_counter()
    model = load(args.model, **load_options(args))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.moedeploy.path)
    except (OSError, ValueError) as ex:
        raise MoeDeployError(f"{model.moedeploy.path} has no usable tokenizer ({ex}); save one with the checkpoint") from ex
    loaded = time.perf_counter()
    prompt = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    _same_on_every_rank(model, prompt["input_ids"], "prompts")
    clock = TokenClock()
    with torch.inference_mode(), _recording(model, args.trace) as recorder:
        out = model.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=clock,
                             pad_token_id=tokenizer.pad_token_id)
    done = time.perf_counter()
    if recorder is not None:
        recorder.write(args.trace)
    new = out[0] if model.config.is_encoder_decoder else out[0, prompt["input_ids"].shape[-1]:]
    text = tokenizer.decode(new, skip_special_tokens=True)
    first = clock.times[1] if len(clock.times) > 1 else done  # times[0] is the prompt
    decode_tokens = max(len(new) - 1, 0)
    stats = {
        "prompt_tokens": int(prompt["input_ids"].shape[-1]),
        "new_tokens": int(len(new)),
        "load_s": round(loaded - start, 4),
        "time_to_first_token_s": round(first - loaded, 4),
        "decode_tokens_per_s": round(decode_tokens / (done - first), 2) if decode_tokens and done > first else None,
        "total_s": round(done - loaded, 4),
        "device": str(model.device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "family": model.moedeploy.family,
        "moe": model.moedeploy.stats(),
        "cache": model.moedeploy.cache_stats(),
        "parallel": model.moedeploy.parallel_stats(),
    }
    if args.json:
        print(json.dumps({"text": text, "tokens": new.tolist(), "stats": stats}))
    else:
        print(text)
        print(f"\n[{stats['new_tokens']} tokens; first after {stats['time_to_first_token_s']} s; "
              f"decode {stats['decode_tokens_per_s']} tok/s; {model.moedeploy.family}, "
              f"{stats['moe']['moe_layers']} MoE layers, {stats['moe']['gating']} gating]", file=sys.stderr)
    return 0


def cmd_eval_ppl(args) -> int:
    from pathlib import Path

    from transformers import AutoTokenizer

    from .api import load
    from .evaluate import ExpertLoad, perplexity

    text_file = Path(args.text)
    text = read_text(args.text, "--text")
    model = load(args.model, **load_options(args))
    tokenizer = AutoTokenizer.from_pretrained(model.moedeploy.path)
    model.moedeploy.reset_stats()
    _same_on_every_rank(model, tokenizer(text, return_tensors="pt")["input_ids"], "texts")
    start = time.perf_counter()
    with _recording(model, args.trace) as recorder:
        result = perplexity(model, tokenizer, text, context=args.context, decode=args.decode, progress=not args.json)
    if recorder is not None:
        recorder.write(args.trace)
    load_per_layer = {name: ExpertLoad.of(layer.expert_counts).__dict__ for name, layer in model.moedeploy.layers.items()}
    out = {"model": str(model.moedeploy.path), "text": str(text_file), **result.as_dict(),
           "seconds": round(time.perf_counter() - start, 2), "expert_load": load_per_layer,
           "parallel": model.moedeploy.parallel_stats(), "routing": model.moedeploy.routing_stats(),
           "cache": _cache_summary(model)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"perplexity {result.perplexity:.2f}, {result.bits_per_byte:.3f} bits per byte "
              f"over {result.tokens:,} tokens ({result.bytes:,} bytes) of {text_file.name}")
        routing = out["routing"]
        if routing["routing"] != "exact":
            print(f"routing {routing['routing']}: {routing['departed_fraction']:.2%} of the router's pairs departed "
                  f"(router weight {routing['departed_weight_per_token']:.4f} per token)")
        if out["cache"]:
            print(f"expert cache: {out['cache']['misses_per_token']:.3f} demand misses per token, "
                  f"{out['cache']['prefetched']:,} prefetched ({out['cache']['prefetch_hits']:,} used)")
        for name, load_ in load_per_layer.items():
            print(f"  {name}: top-quarter share {load_['top_quarter_share']:.3f}, "
                  f"normalized entropy {load_['normalized_entropy']:.3f}")
    return 0


def _cache_summary(model) -> dict | None:
    stats = model.moedeploy.cache_stats()
    if stats is None:
        return None
    steps = sum(layer.routed_pairs for layer in model.moedeploy.layers.values()) / (
        len(model.moedeploy.layers) * next(iter(model.moedeploy.layers.values())).router.top_k)
    keep = ("misses", "hits", "prefetched", "prefetch_hits", "bytes_moved", "stall_s", "miss_rate")
    return {k: stats[k] for k in keep} | {"misses_per_token": stats["misses"] / max(steps, 1)}


def _same_on_every_rank(model, ids, what: str) -> None:
    """In an expert-parallel run, every rank must compute the same tokens: compare a checksum."""
    import zlib

    if model.moedeploy.group is not None:
        model.moedeploy.group.check_same(zlib.crc32(ids.cpu().numpy().tobytes()), what)


def cmd_train_demo(args) -> int:
    from dataclasses import replace
    from pathlib import Path

    from .demo.data import load_corpus
    from .demo.train import TrainConfig, train

    given = {k: v for k, v in dict(steps=args.steps, threads=args.threads, dropout=args.dropout).items() if v is not None}
    cfg = replace(TrainConfig(), seed=args.seed, **given)
    report = train(Path(args.out), load_corpus(Path(args.cache)), cfg, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps({k: v for k, v in report.items() if k != "history"}))
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import FAMILIES, save_tiny

    if args.family not in FAMILIES:
        raise MoeDeployError(f"unknown family {args.family!r}; choose one of: {', '.join(FAMILIES)}")
    overrides = {}
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise MoeDeployError(f"--set takes KEY=VALUE (a config field), got {item!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    path = save_tiny(args.family, args.out, seed=args.seed, **overrides)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .bench import cache as bench_cache
    from .bench import decode as bench_decode
    from .bench import predict as bench_predict
    from .bench import layer as bench_layer
    from .bench import offload as bench_offload
    from .bench import parallel as bench_parallel
    from .bench import quant as bench_quant
    from .bench import serve as bench_serve
    from .placement.cli import add_commands as add_place_commands
    from .predict.cli import add_commands as add_predict_commands
    from .server.cli import add_commands as add_server_commands
    from .sim.cli import add_commands as add_sim_commands
    from .trace.cli import add_commands as add_trace_commands

    parser = argparse.ArgumentParser(prog="moedeploy", description="Run Mixture-of-Experts models cheaply and fast.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="greedy generation from a local checkpoint")
    g.add_argument("--model", default=None, help="checkpoint directory (config.json, *.safetensors, tokenizer); "
                   "default: the embedded demo model")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--json", action="store_true", help="print one JSON object: text, tokens, stats")
    g.add_argument("--trace", help="record the routing of this run to a Parquet file (docs/traces.md)")
    add_load_options(g)
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    for name, module, summary in (
            ("layer", bench_layer, "one MoE layer: dynamic vs static gating vs transformers' experts"),
            ("cache", bench_cache, "decoding under expert-memory budgets vs every expert resident"),
            ("offload", bench_offload, "decoding and peak memory under budgets vs resident vs transformers+accelerate"),
            ("serve", bench_serve, "the server under concurrent load vs transformers (serve) and llama-server"),
            ("quant", bench_quant, "quantized experts: held-out perplexity, bytes, decode speed, greedy agreement"),
            ("decode", bench_decode, "CPU decode speed vs the memory-bandwidth bound and vs llama.cpp (llama-bench)"),
            ("predict", bench_predict, "SiDA at run time: predictor cost, prefetch under budgets, routing modes' quality"),
            ("parallel", bench_parallel, "expert-parallel throughput with 1, 2, 4 ranks per placement (torchrun)")):
        bp = bsub.add_parser(name, help=summary)
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)

    e = sub.add_parser("eval-ppl", help="perplexity and bits per byte of a model on a text file")
    e.add_argument("--model", default=None, help="checkpoint directory; default: the embedded demo model")
    e.add_argument("--text", required=True, help="a UTF-8 text file")
    e.add_argument("--context", type=int, default=256, help="tokens per scored window (default 256)")
    e.add_argument("--json", action="store_true")
    e.add_argument("--trace", help="record the routing of this run to a Parquet file (docs/traces.md)")
    e.add_argument("--decode", action="store_true", help="score one token per step with a KV cache, as generation "
                   "runs (what budgets, prefetchers and --routing resident|predicted see then); slower")
    add_load_options(e)
    e.set_defaults(func=cmd_eval_ppl)

    tr = sub.add_parser("train-demo", help="train the demo model from scratch (about 50 minutes on 2 cores)")
    tr.add_argument("--out", required=True)
    tr.add_argument("--cache", default=os.path.expanduser("~/.cache/moedeploy"), help="where the text is downloaded")
    tr.add_argument("--steps", type=int, help="default: TrainConfig.steps (3600)")
    tr.add_argument("--threads", type=int, help="default: TrainConfig.threads (2)")
    tr.add_argument("--dropout", type=float, help="residual dropout in training (default: TrainConfig.dropout, 0.1)")
    tr.add_argument("--seed", type=int, default=0)
    tr.set_defaults(func=cmd_train_demo)

    t = sub.add_parser("make-tiny", help="write a tiny random checkpoint of a family (for trying things out)")
    t.add_argument("--family", default="mixtral")
    t.add_argument("--out", required=True)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set hidden_size=1024 (repeatable; for larger test models)")
    t.set_defaults(func=cmd_make_tiny)
    add_trace_commands(sub)
    add_sim_commands(sub)
    add_predict_commands(sub)
    add_place_commands(sub)
    add_server_commands(sub)
    return parser


PARALLEL_COMMANDS = ("generate", "eval-ppl", "serve")  # the commands that run expert-parallel under torchrun


def _join_torchrun(args) -> int:
    """Under torchrun (WORLD_SIZE > 1): join the group, give each rank its own CUDA device, and leave
    stdout to rank 0 (with --json it prints the one JSON object). Returns this rank."""
    from .parallel import init
    from .options import parse_device

    if args.command not in PARALLEL_COMMANDS:
        raise MoeDeployError(f"`moedeploy {args.command}` runs in one process; under torchrun only "
                             f"{', '.join(PARALLEL_COMMANDS)} run expert-parallel")
    device = parse_device(args.device)
    if device.type == "cuda":
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        device = parse_device(args.device)
    rank = init(device, timeout_s=args.dist_timeout).rank
    if rank:
        sys.stdout = open(os.devnull, "w")
        os.environ["TQDM_DISABLE"] = "1"
    return rank


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    parallel = int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = 0
    try:
        if parallel:
            rank = _join_torchrun(args)
        code = args.func(args)
    except MoeDeployError as ex:
        where = f" (rank {rank})" if parallel else ""
        print(f"moedeploy: error{where}: {ex}", file=sys.stderr)
        return 2  # without leaving the group: its peers may be gone, and torchrun stops the rest
    if parallel:
        from .parallel import close

        close()
    return code


if __name__ == "__main__":
    sys.exit(main())
