"""`moedeploy trace` (run a model over a text file, recording its routing) and `moedeploy analyze`
(characterise one or more traces: report.md, PNGs, analysis.json).

    moedeploy trace --model DIR --input TEXT --out TRACE.parquet [--context 256] [--batch 8]
    moedeploy analyze TRACE [TRACE ...] --out DIR [--json]

TRACE is a Parquet trace, an ESFT domain directory (or the directory of several), or OLMoE counts;
the format is detected. Several per-token traces are analysed together, each input one domain.
With --json a command prints exactly one JSON object on stdout; progress goes to stderr.

This module parses arguments and calls the library; it holds no logic the library lacks.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..cliargs import add_load_options, int_list, load_options, read_text
from ..errors import MoeDeployError, TraceError


def cmd_trace(args) -> int:
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..api import load
    from .memory import model_memory
    from .profile import profile_run
    from .record import record

    text_file = Path(args.input)
    text = read_text(args.input, "--input")
    if args.context < 2 or args.batch < 1:
        raise MoeDeployError("--context must be at least 2 and --batch at least 1")
    model = load(args.model, **load_options(args))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.moedeploy.path)
    except (OSError, ValueError) as ex:
        raise MoeDeployError(f"{model.moedeploy.path} has no usable tokenizer ({ex})") from ex
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    n = ids.numel() // args.context * args.context
    windows = list(ids[:n].view(-1, args.context).split(args.batch))  # [B, C] each: one request per row
    if ids.numel() - n >= 2:
        windows.append(ids[n:].unsqueeze(0))  # the ragged tail, one shorter request
    if not windows:
        raise MoeDeployError(f"--input {text_file} has fewer than 2 tokens")
    device = model.device
    start = time.perf_counter()
    with torch.inference_mode():
        profile = None
        if args.profile_steps:
            model(input_ids=windows[0].to(device))  # warm-up, not recorded or profiled
            steps = windows[: args.profile_steps]
            profile = profile_run(model, lambda: [model(input_ids=w.to(device)) for w in steps], len(steps))
        with record(model, domain=args.domain or text_file.stem) as rec:
            for w in tqdm(windows, desc="moedeploy: tracing", unit="batch", disable=None, leave=False):
                model(input_ids=w.to(device))
    seconds = time.perf_counter() - start
    trace = rec.trace()
    extra = {"memory": model_memory(model).as_dict(), "input": str(text_file), "context": args.context}
    if profile is not None:
        extra["profile"] = profile.as_dict()
    trace = replace(trace, meta=replace(trace.meta, extra={**trace.meta.extra, **extra}))
    from .io import write_trace

    path = write_trace(trace, args.out)
    out = {"trace": str(path), "tokens": trace.num_tokens, "requests": int(trace.request.max()) + 1,
           "moe_layers": trace.meta.num_layers, "num_experts": trace.meta.num_experts, "top_k": trace.meta.top_k,
           "seconds": round(seconds, 3)}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{path}: {out['tokens']:,} tokens in {out['requests']} requests, {out['moe_layers']} MoE layers "
              f"({seconds:.1f} s)", file=sys.stderr)
    return 0


def _open_all(paths: list[str]):
    """One Trace (per-token inputs concatenated, each single-domain input its own domain) or one AggregateLoad."""
    from .io import open_trace
    from .schema import Trace, concat

    opened = [open_trace(p) for p in paths]
    if not all(isinstance(t, Trace) for t in opened):
        if len(opened) > 1:
            raise TraceError("aggregate counts (OLMoE) are analysed one model directory at a time, without other traces")
        return opened[0]
    used: set[str] = set()
    named = []
    for i, (t, p) in enumerate(zip(opened, paths)):
        if len(t.domains) == 1:  # label it by its domain, else its file name, so inputs stay apart
            name = next(n for n in (t.domains[0], Path(p).stem, f"{Path(p).stem}-{i}") if n and n not in used)
            t = replace(t, domains=(name,))
        used.update(t.domains)
        named.append(t)
    return named[0] if len(named) == 1 else concat(named)


def cmd_analyze(args) -> int:
    from .report import analyze_aggregate, analyze_trace, write_report
    from .schema import Trace

    start = time.perf_counter()
    trace = _open_all(args.traces)
    read = time.perf_counter() - start
    if isinstance(trace, Trace):
        cache_sizes = int_list(args.cache_sizes, "--cache-sizes") if args.cache_sizes else None
        batch_sizes = int_list(args.batch_sizes, "--batch-sizes") if args.batch_sizes else None
        try:
            train = tuple(d for d in (args.train_domains or "").split(",") if d)
            analysis = analyze_trace(trace, cache_sizes, batch_sizes, train_domains=train)
        except ValueError as ex:  # e.g. cache sizes below top-k
            raise MoeDeployError(str(ex)) from ex
    else:
        analysis = analyze_aggregate(trace)
    analysis = replace(analysis, seconds={"read": round(read, 3), **analysis.seconds})
    data = write_report(analysis, args.out)
    data["seconds_total"] = round(time.perf_counter() - start, 3)
    (Path(args.out) / "analysis.json").write_text(json.dumps(data))
    if args.json:
        print(json.dumps(data))
    else:
        print(f"{Path(args.out) / 'report.md'} ({data['seconds_total']:.1f} s)", file=sys.stderr)
    return 0


def add_commands(sub) -> None:
    """Register `trace` and `analyze` on the CLI's subparsers."""
    t = sub.add_parser("trace", help="run a model over a text file and record its routing as Parquet")
    t.add_argument("--model", default=None, help="checkpoint directory; default: the embedded demo model")
    t.add_argument("--input", required=True, help="a UTF-8 text file")
    t.add_argument("--out", required=True, help="the Parquet trace to write")
    t.add_argument("--context", type=int, default=256, help="tokens per request (window) (default 256)")
    t.add_argument("--batch", type=int, default=8, help="requests per forward step (default 8)")
    t.add_argument("--max-tokens", type=int, default=0, help="use only the first N tokens of the text (0: all)")
    t.add_argument("--domain", default=None, help="domain label (default: the input file's name)")
    t.add_argument("--profile-steps", type=int, default=4,
                   help="profile this many steps first for per-layer time shares (0: none; default 4)")
    t.add_argument("--json", action="store_true", help="print one JSON object")
    add_load_options(t)
    t.set_defaults(func=cmd_trace)

    a = sub.add_parser("analyze", help="characterise routing traces: Markdown report, PNG plots, JSON")
    a.add_argument("traces", nargs="+", help="Parquet trace(s), ESFT domain directory(ies) or OLMoE counts")
    a.add_argument("--out", required=True, help="directory for report.md, *.png and analysis.json")
    a.add_argument("--cache-sizes", default=None, help="experts per layer to simulate caches for, e.g. 6,16,32")
    a.add_argument("--batch-sizes", default=None, help="batch sizes for the distinct-experts curve, e.g. 1,8,64")
    a.add_argument("--train-domains", default=None,
                   help="fit the co-activation predictor on these domains (comma-separated), score it on the rest; "
                        "default: even vs odd requests")
    a.add_argument("--json", action="store_true", help="also print analysis.json on stdout")
    a.set_defaults(func=cmd_analyze)
