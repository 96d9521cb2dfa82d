"""`moedeploy predict train | eval | fit`: expert predictors, trained and scored offline.

    moedeploy predict train [--model DIR] --text FILE [--text FILE ...] --out P.safetensors   SiDA (sida.py)
    moedeploy predict train --trace T [--trace T2 ...] --out P.safetensors                   trace history (routenet.py)
    moedeploy predict eval  [--model DIR] [--predictor P] --text FILE [--k 4,8] [--json]      + lookahead, frequency
    moedeploy predict eval  --trace T --predictor P [--k 6,12] [--json]                       + co-occurrence, frequency
    moedeploy predict fit   --trace T --out P.npz      the co-occurrence table of `simulate --prefetch history`

For the demo model `--predictor` defaults to the shipped one (moedeploy/data/predictor/). Train only on
tuning text or traces (the demo's training corpus; ESFT intent, translation); evaluate on held-out ones.
docs/prediction.md has the file format and the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cliargs import add_load_options, int_list, load_options, read_text
from ..errors import MoeDeployError


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def _text_chunks(model, texts: list[str], context: int, max_tokens: int | None, seed: int) -> list:
    """Tokenized text files -> chunks of `context` tokens; with max_tokens, an evenly spread seeded sample."""
    import random

    from transformers import AutoTokenizer

    from .record import chunk

    try:
        tokenizer = AutoTokenizer.from_pretrained(model.moedeploy.path)
    except (OSError, ValueError) as ex:
        raise MoeDeployError(f"{model.moedeploy.path} has no usable tokenizer ({ex})") from ex
    chunks = []
    for text in texts:
        chunks += chunk(tokenizer(text, add_special_tokens=False)["input_ids"], context)
    if max_tokens is not None and sum(map(len, chunks)) > max_tokens:
        random.Random(seed).shuffle(chunks)
        keep, n = [], 0
        for c in chunks:
            if n >= max_tokens:
                break
            keep.append(c)
            n += len(c)
        chunks = keep
    if not chunks:
        raise MoeDeployError("the --text files hold fewer than 2 tokens")
    return chunks


def _load_model(args):
    from ..api import load

    if args.routing != "exact":
        raise MoeDeployError(f"--routing {args.routing}: predictors are trained and scored on the router's own "
                             "choices; leave --routing out")
    return load(args.model, **(load_options(args) | {"predictor": None}))  # --predictor is the evaluated one


def _check_k(text: str | None, K: int) -> tuple[int, ...]:
    """--k, or the model's top-k and twice it."""
    ks = tuple(int_list(text, "--k")) if text else (K, 2 * K)
    if not ks or min(ks) < 1:
        raise MoeDeployError(f"--k takes positive integers, got {text!r}")
    return ks


def _check_context(context: int) -> None:
    if context < 2:
        raise MoeDeployError(f"--context must be at least 2 tokens, got {context}")


def _refuse_others(args, mode: str) -> None:
    """Options of the other mode (--text or --trace) given with this one: an error, not silently ignored."""
    other = args.trace_only if mode == "--text" else args.text_only
    given = ["--" + dest.replace("_", "-") for dest, default in other.items() if getattr(args, dest) != default]
    if given:
        other_mode = "--trace" if mode == "--text" else "--text"
        raise MoeDeployError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply with {mode}; "
                             f"{'they are' if len(given) > 1 else 'it is'} for {other_mode}")


# -- text: SiDA -----------------------------------------------------------------------------------------------
def _train_text(args) -> int:
    import torch

    from . import files
    from .record import concat, run
    from .sida import SidaConfig, TrainConfig, train

    _check_context(args.context)
    texts = [read_text(p, "--text") for p in args.text]
    model = _load_model(args)
    chunks = [c for c in _text_chunks(model, texts, args.context, args.max_tokens, args.seed) if len(c) == args.context]
    if len(chunks) < 2:
        raise MoeDeployError(f"--text holds fewer than 2 chunks of --context {args.context} tokens: give more text "
                             f"or a smaller --context")
    data = concat(list(run(model, chunks)))
    cfg = SidaConfig(width=args.width, window=args.context, attention=args.attention, distill=args.distill,
                     distill_weight=args.distill_weight)
    tc = TrainConfig(steps=args.steps, seed=args.seed, **({} if args.epochs is None else {"epochs": args.epochs}))
    info = files.model_info(model) | {"path": Path(model.moedeploy.path).name}  # names, not this machine's paths
    predictor, report = train(data, model.get_input_embeddings().weight.detach(), info, cfg, tc)
    report["text"] = [Path(p).name for p in args.text]
    path = predictor.save(args.out, torch.bfloat16 if args.save_dtype == "bfloat16" else torch.float32)
    out = {"predictor": str(path), "bytes": path.stat().st_size, "parameters": predictor.parameter_count(),
           "model": info, **report}
    if args.json:
        print(json.dumps(out))
    else:
        v = report.get("validation", {})
        print(f"{path}: SiDA predictor, {out['parameters']:,} parameters ({out['bytes'] / 1e6:.2f} MB), trained on "
              f"{report['tokens']:,} tokens, {report['steps']} steps in {report['train_seconds']:.0f} s; validation "
              f"recall {v.get('mean_recall')}, hit rate {v.get('mean_hit_rate')}")
    return 0


def _eval_text(args) -> int:
    from .base import FrequencyPredictor, Known
    from .lookahead import LookaheadPredictor
    from .metrics import Tally
    from .record import run
    from .sida import DEMO_PREDICTOR, load_for

    _check_context(args.context)
    texts = [read_text(p, "--text") for p in args.text]
    model = _load_model(args)
    sida = load_for(model, args.predictor)
    layers = list(model.moedeploy.layers.values())
    K, L = layers[0].router.top_k, len(layers)
    ks = _check_k(args.k, K)
    predictors = {"sida": sida, "lookahead": LookaheadPredictor([layer.router for layer in layers]),
                  "frequency": FrequencyPredictor(sida.frequency)}
    tallies = {name: Tally(ks, L, K) for name in predictors}
    chunks = _text_chunks(model, texts, args.context, args.max_tokens, args.seed)
    for batch in run(model, chunks, with_hidden=True, desc="scoring predictors"):
        for c in range(len(batch)):
            known = Known(tokens=batch.tokens[c], hidden=batch.hidden[c])
            truth = batch.ids[c].long()  # [S, L, K]
            for name, p in predictors.items():
                tallies[name].add(p.scores(known), truth, truth[..., 0])
    main = tallies["sida"].summary()
    out = {"predictor": str(args.predictor or DEMO_PREDICTOR), "text": [str(p) for p in args.text], "context": args.context, "k": list(ks),
           "parameters": sida.parameter_count(), **main,
           "baselines": {name: {k: v for k, v in t.summary().items() if k != "tokens"}
                         for name, t in tallies.items() if name != "sida"}}
    if args.json:
        print(json.dumps(out))
    else:
        _print_table(out, ks, {"sida": main} | out["baselines"])
    return 0


def _print_table(out: dict, ks, results: dict) -> None:
    cols = [f"recall@{k}" for k in ks] + [f"hit@{k}" for k in ks]
    print(f"{out['tokens']:,} tokens; predictor {out['predictor']}")
    print(f"{'':14}{'layer':>6}  " + "  ".join(f"{c:>9}" for c in cols))
    for name, r in results.items():
        for row in r["layers"]:
            vals = [row["recall"][str(k)] for k in ks] + [row["hit_rate"][str(k)] for k in ks]
            print(f"{name:14}{row['layer']:>6}  " + "  ".join(f"{v:>9.3f}" for v in vals))
        vals = [r["mean_recall"][str(k)] for k in ks] + [r["mean_hit_rate"][str(k)] for k in ks]
        print(f"{name:14}{'mean':>6}  " + "  ".join(f"{v:>9.3f}" for v in vals))


# -- traces: routenet -----------------------------------------------------------------------------------------
def _read_traces(paths: list[str], domains: list[str] | None) -> list:
    """[(domain name, Trace)] of every domain of the traces (only `domains` when given)."""
    from ..trace import load_trace

    traces, seen = [], []
    for path in paths:
        found = load_trace(path).by_domain()
        seen += found
        traces += [(name, t) for name, t in found.items() if not domains or name in domains]
    missing = [name for name in domains or [] if name not in seen]
    if missing:
        raise MoeDeployError(f"--domain {', '.join(map(repr, missing))}: not in the traces given (they have: "
                             f"{', '.join(dict.fromkeys(seen))})")
    shapes = {(t.meta.num_layers, t.meta.num_experts, t.meta.top_k) for _, t in traces}
    if len(shapes) > 1:
        raise MoeDeployError(f"the traces have different model shapes {sorted(shapes)}: use one model's traces")
    return traces


def _stream(trace):
    """A trace as one stream, request after request, each in position order, so a row's previous row is the
    same request's previous token (in a trace of batched decoding, serving order interleaves the requests):
    (experts [N, L, K], first [N] bool: a request's first row, top1 [N, L])."""
    import numpy as np

    order = np.lexsort((trace.position, trace.request))
    request = trace.request[order]
    first = np.ones(len(order), bool)
    first[1:] = request[1:] != request[:-1]
    experts = trace.experts[order]
    best = np.argmax(trace.weights[order], axis=-1)  # [N, L]
    top1 = np.take_along_axis(experts, best[..., None], -1)[..., 0]
    return experts, first, top1


def _train_trace(args) -> int:
    from .routenet import RouteConfig, TrainConfig, train

    traces = _read_traces(args.trace, args.domain)
    meta = traces[0][1].meta
    model = {"num_layers": meta.num_layers, "num_experts": meta.num_experts, "top_k": meta.top_k,
             "source": meta.source}
    streams = [_stream(t)[:2] for _, t in traces]
    cfg = RouteConfig(lookahead=args.lookahead)
    tc = TrainConfig(steps=args.steps, seed=args.seed, **({} if args.epochs is None else {"epochs": args.epochs}))
    predictor, report = train(streams, model, cfg, tc)
    report["traces"] = [Path(p).name for p in args.trace] + [f"domain {d}" for d in args.domain or []]
    report["domains"] = [name for name, _ in traces]
    predictor.training.update(report)
    path = predictor.save(args.out)
    out = {"predictor": str(path), "bytes": path.stat().st_size, "model": model, **report}
    print(json.dumps(out) if args.json else f"{path}: trace predictor for {meta.num_layers} layers x "
          f"{meta.num_experts} experts, top-{meta.top_k}, lookahead {cfg.lookahead}; trained on {report['tokens']:,} "
          f"tokens ({', '.join(report['domains'])}), {report['steps']} steps in {report['train_seconds']:.0f} s")
    return 0


def _eval_trace(args) -> int:
    import torch

    from .base import FrequencyPredictor, Known
    from .history import HistoryPredictor, ScoreConfig, scores
    from .metrics import Tally
    from .routenet import RouteNet

    if args.predictor is None:
        raise MoeDeployError("--predictor is required with --trace (make one with `moedeploy predict train --trace`)")
    traces = _read_traces(args.trace, args.domain)
    meta = traces[0][1].meta
    L, E, K = meta.num_layers, meta.num_experts, meta.top_k
    ks = _check_k(args.k, K)
    if Path(args.predictor).suffix == ".npz":  # the co-occurrence table of `predict fit`
        table = HistoryPredictor.load(args.predictor)
        table.check(L, E, K, 1)
        main, extra = None, {}
    else:
        net = RouteNet.load(args.predictor)
        net.check(L, E, K)
        table, main = net.table, net
        extra = {"frequency": FrequencyPredictor(net.frequency)}
    results = {}
    for domain, trace in traces:
        experts, first, top1 = _stream(trace)
        known = Known(experts=experts, first=first)
        cfg = ScoreConfig(lookahead=main.cfg.lookahead if main else 1, prior=main.cfg.prior if main else 50.0)
        scored = {"cooccurrence": torch.from_numpy(scores(table, experts, E, cfg))}
        if main is not None:
            scored["routenet"] = main.scores(known)
        scored |= {name: p.scores(known) for name, p in extra.items()}
        for name, s in scored.items():
            t = Tally(ks, L, K)
            t.add(s, torch.from_numpy(experts.astype("int64")), torch.from_numpy(top1.astype("int64")))
            results.setdefault(name, {})[domain] = t
    name = "routenet" if main is not None else "cooccurrence"
    out = {"predictor": str(args.predictor), "k": list(ks), "domains": {}}
    for domain, tally in results[name].items():
        out["domains"][domain] = tally.summary() | {
            "baselines": {n: {k: v for k, v in r[domain].summary().items() if k not in ("tokens", "layers")}
                          for n, r in results.items() if n != name}}
    if len(out["domains"]) == 1:  # one trace: its numbers at the top level too
        out |= next(iter(out["domains"].values()))
    if args.json:
        print(json.dumps(out))
    else:
        for domain, r in out["domains"].items():
            rows = {name: r} | {n: r["baselines"][n] | {"layers": []} for n in r["baselines"]}
            print(f"== {domain}")
            _print_table({"tokens": r["tokens"], "predictor": out["predictor"]}, ks, rows)
    return 0


def cmd_train(args) -> int:
    if bool(args.text) == bool(args.trace):
        raise MoeDeployError("give --text (a SiDA predictor from a model's routing) or --trace (a trace-history "
                             "predictor), not both")
    _refuse_others(args, "--text" if args.text else "--trace")
    if args.steps is not None and args.steps < 1:
        raise MoeDeployError(f"--steps must be at least 1, got {args.steps}")
    if args.epochs is not None and not args.epochs > 0:
        raise MoeDeployError(f"--epochs must be above 0, got {args.epochs}")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise MoeDeployError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    return _train_text(args) if args.text else _train_trace(args)


def cmd_eval(args) -> int:
    if bool(args.text) == bool(args.trace):
        raise MoeDeployError("give --text (score on a model's routing of text) or --trace (score on a routing "
                             "trace), not both")
    _refuse_others(args, "--text" if args.text else "--trace")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise MoeDeployError(f"--max-tokens must be at least 2, got {args.max_tokens}")
    return _eval_text(args) if args.text else _eval_trace(args)


def _load_option_dests() -> tuple[str, ...]:
    probe = argparse.ArgumentParser(add_help=False)
    add_load_options(probe, predictor=False)
    return tuple(vars(probe.parse_args([])))


def _modes(p: argparse.ArgumentParser, text_only: tuple[str, ...], trace_only: tuple[str, ...]) -> None:
    """Remember which options belong to one mode, with their defaults, for `_refuse_others`."""
    p.set_defaults(text_only={d: p.get_default(d) for d in text_only + _load_option_dests()},
                   trace_only={d: p.get_default(d) for d in trace_only})


def cmd_fit(args) -> int:
    from .history import fit

    traces = _read_traces(args.trace, args.domain)
    predictor = fit([t.experts for _, t in traces], traces[0][1].meta.num_experts, args.max_lookahead)
    path = predictor.save(args.out)
    D, L, E = predictor.shape
    out = {"predictor": str(path), "tokens": predictor.tokens, "layers": L, "experts": E, "top_k": predictor.top_k,
           "max_lookahead": D, "bytes": path.stat().st_size}
    print(json.dumps(out) if args.json else f"{path}: fitted on {predictor.tokens:,} tokens, {L} layers x {E} "
          f"experts, lookahead 1..{D} ({out['bytes'] / 1e6:.1f} MB)")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("predict", help="expert predictors: train and evaluate (SiDA, trace history)")
    psub = p.add_subparsers(dest="predict", required=True)

    t = psub.add_parser("train", help="train a SiDA predictor on a model's routing of text (--text), or a "
                        "trace-history predictor on routing traces (--trace)")
    t.add_argument("--model", default=None, help="with --text: checkpoint directory; default the demo model")
    t.add_argument("--text", action="append", help="a UTF-8 training text (repeatable); never a held-out text")
    t.add_argument("--trace", action="append", help="a Parquet trace or ESFT directory (repeatable)")
    t.add_argument("--domain", action="append", help="with --trace: only these domains (repeatable)")
    t.add_argument("--out", required=True, help="the predictor file (.safetensors)")
    t.add_argument("--epochs", type=float, help="passes over the training data (--text: chunks, default 5; "
                   "--trace: (token, layer) rows, default 3)")
    t.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--context", type=int, default=256, help="--text: tokens per training sequence and the "
                   "attention window (default 256)")
    t.add_argument("--max-tokens", type=int, help="--text: train on a seeded sample of this many tokens")
    t.add_argument("--width", type=int, default=192, help="--text: LSTM and attention width (default 192)")
    t.add_argument("--attention", default="softmax", choices=("softmax", "sparsemax"))
    t.add_argument("--distill", default="kl", choices=("kl", "l1"), help="truncated distillation loss (default kl)")
    t.add_argument("--distill-weight", type=float, default=3.0, help="--text: weight of the distillation term "
                   "next to the top-1 cross-entropy (default 3)")
    t.add_argument("--save-dtype", default="float32", choices=("float32", "bfloat16"))
    t.add_argument("--lookahead", type=int, default=1, help="--trace: layers between knowing and needing (default 1)")
    t.add_argument("--json", action="store_true")
    add_load_options(t, predictor=False)
    t.set_defaults(func=cmd_train)
    _modes(t, ("model", "context", "max_tokens", "width", "attention", "distill", "distill_weight", "save_dtype"),
           ("lookahead", "domain"))

    e = psub.add_parser("eval", help="recall@k and hit rate of a predictor, per layer, with baselines")
    e.add_argument("--model", default=None, help="with --text: checkpoint directory; default the demo model")
    e.add_argument("--predictor", help="the predictor file; for the demo model default the shipped one")
    e.add_argument("--text", action="append", help="a UTF-8 text to score on (repeatable)")
    e.add_argument("--trace", action="append", help="a Parquet trace or ESFT directory to score on (repeatable)")
    e.add_argument("--domain", action="append", help="with --trace: only these domains (repeatable)")
    e.add_argument("--k", help="comma-separated k (default: the model's top-k and twice it)")
    e.add_argument("--context", type=int, default=256, help="--text: tokens per scored sequence (default 256)")
    e.add_argument("--max-tokens", type=int, help="--text: score a seeded sample of this many tokens")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true")
    add_load_options(e, predictor=False)
    e.set_defaults(func=cmd_eval)
    _modes(e, ("model", "context", "max_tokens"), ("domain",))

    f = psub.add_parser("fit", help="fit the co-occurrence table of `simulate --prefetch history` on routing traces")
    f.add_argument("--trace", required=True, action="append", help="a Parquet trace or ESFT directory (repeatable)")
    f.add_argument("--domain", action="append", help="only these domains of the traces (repeatable)")
    f.add_argument("--max-lookahead", type=int, default=4, help="fit lookaheads 1..this many layers (default 4)")
    f.add_argument("--out", required=True, help="the predictor file (.npz)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_fit)
