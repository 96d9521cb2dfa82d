"""`moedeploy predict fit`: fit the trace-history predictor on routing traces, save it as .npz.

    moedeploy predict fit --trace DIR_OR_PARQUET [--trace ...] [--domain NAME ...] --out FILE.npz

Fit only on tuning traces (ESFT: intent, translation); evaluate on others with `moedeploy simulate
--prefetch history --predictor FILE`.
"""

from __future__ import annotations

import json

from ..errors import MoeDeployError


def cmd_fit(args) -> int:
    from ..trace import load_trace
    from .history import fit

    traces = []
    for path in args.trace:
        trace = load_trace(path)
        domains = trace.by_domain()
        for name in args.domain or []:
            if name not in domains:
                raise MoeDeployError(f"--domain {name!r} is not in {path} (it has: {', '.join(domains)})")
        traces += [t for name, t in domains.items() if not args.domain or name in args.domain]
    shapes = {(t.meta.num_layers, t.meta.num_experts, t.meta.top_k) for t in traces}
    if len(shapes) > 1:
        raise MoeDeployError(f"the traces have different model shapes {sorted(shapes)}: fit one model at a time")
    predictor = fit([t.experts for t in traces], traces[0].meta.num_experts, args.max_lookahead)
    path = predictor.save(args.out)
    D, L, E = predictor.shape
    out = {"predictor": str(path), "tokens": predictor.tokens, "layers": L, "experts": E, "top_k": predictor.top_k,
           "max_lookahead": D, "bytes": path.stat().st_size}
    print(json.dumps(out) if args.json else f"{path}: fitted on {predictor.tokens:,} tokens, {L} layers x {E} "
          f"experts, lookahead 1..{D} ({out['bytes'] / 1e6:.1f} MB)")
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("predict", help="expert predictors for prefetching")
    psub = p.add_subparsers(dest="predict", required=True)
    f = psub.add_parser("fit", help="fit the trace-history predictor (cross-layer co-occurrence) on routing traces")
    f.add_argument("--trace", required=True, action="append", help="a Parquet trace or ESFT directory (repeatable)")
    f.add_argument("--domain", action="append", help="only these domains of the traces (repeatable)")
    f.add_argument("--max-lookahead", type=int, default=4, help="fit lookaheads 1..this many layers (default 4)")
    f.add_argument("--out", required=True, help="the predictor file (.npz)")
    f.add_argument("--json", action="store_true")
    f.set_defaults(func=cmd_fit)
