"""Where the simulator's prefetch scores come from: every predictor judged on the same cache and cost model.

    --prefetch history  + P.npz           the co-occurrence table (predict/history.py; online without a file)
    --prefetch history  + P.safetensors   a trained trace-history predictor (predict/routenet.py)
    --prefetch sida     + P (+ --model)   SiDA's predictor over the trace's token ids (a trace recorded from the
                                          model, e.g. `eval-ppl --trace`; ESFT traces carry no token ids)
    --prefetch lookahead                  refused: a trace carries no hidden states (it runs in the model:
                                          `generate --expert-memory ... --prefetch lookahead`)
    --prefetch oracle                     a perfect predictor (the trace's own routing): the bound every
                                          predictor meets at this cache, eviction and lookahead

Each gives S [N, L, E] in the trace's row order, S[t, m] known when the prefetch for layer m of token t is
issued, on the history table's scale: the chance that expert j is among the token's K (a learned
predictor's softmax over experts times K, at most 1), so one `--prefetch-threshold` means the same for all.

Legend: N tokens, L MoE layers, E experts, K experts per token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import MoeDeployError
from ..predict.history import HistoryPredictor, ScoreConfig, onehot, scores
from ..trace.schema import Trace

SOURCES = ("history", "sida", "oracle", "lookahead")


def chosen(logits: torch.Tensor, k: int) -> np.ndarray:
    """[..., E] logits of a predictor trained on a softmax over experts -> P(expert among the K) estimates."""
    return (k * logits.float().softmax(-1)).clamp(max=1).numpy()


def of(trace: Trace, source: str, predictor: str | None, cfg: ScoreConfig, model: str | None = None) -> np.ndarray:
    """S [N, L, E] for `trace` from `source` and the predictor file (see the module docstring)."""
    meta = trace.meta
    if source == "lookahead":
        raise MoeDeployError("--prefetch lookahead needs the model's hidden states, which a routing trace does not "
                             "carry: measure it in the model (moedeploy generate/bench offload --expert-memory ... "
                             "--prefetch lookahead), or simulate --prefetch history|sida")
    if source == "sida":
        return _sida(trace, predictor, model)
    if source == "oracle":
        return onehot(trace.experts.astype(np.int64), meta.num_experts)  # [N, L, E]: exactly the chosen experts
    if source != "history":
        raise MoeDeployError(f"unknown --prefetch {source!r}; choose none, {', '.join(SOURCES)}")
    experts = trace.experts.astype(np.int64)  # [N, L, K]
    if predictor is not None and Path(predictor).suffix != ".npz":
        return _routenet(trace, predictor, cfg)
    table = HistoryPredictor.load(predictor) if predictor else None
    if table is not None:
        table.check(meta.num_layers, meta.num_experts, meta.top_k, cfg.lookahead)
    return scores(table, experts, meta.num_experts, cfg)


def _routenet(trace: Trace, path: str, cfg: ScoreConfig) -> np.ndarray:
    from ..predict.base import Known
    from ..predict.routenet import RouteNet

    net = RouteNet.load(path)
    meta = trace.meta
    net.check(meta.num_layers, meta.num_experts, meta.top_k)
    if net.cfg.lookahead != cfg.lookahead:
        raise MoeDeployError(f"{path} predicts {net.cfg.lookahead} layer(s) ahead; --lookahead is {cfg.lookahead}: "
                             f"give --lookahead {net.cfg.lookahead} or train one with `moedeploy predict train --trace "
                             f"T --lookahead {cfg.lookahead}`")
    first = np.ones(trace.num_tokens, bool)
    first[1:] = trace.request[1:] != trace.request[:-1]  # a new sequence starts where the request changes
    return chosen(net.scores(Known(experts=trace.experts.astype(np.int64), first=first)), meta.top_k)


def _sida(trace: Trace, path: str | None, model_dir: str | None) -> np.ndarray:
    from ..api import load
    from ..predict.sida import load_for

    if (trace.token < 0).any():
        raise MoeDeployError("--prefetch sida predicts from token ids, and this trace has none (ESFT traces do not "
                             "say them): record one from the model (moedeploy eval-ppl --trace FILE), or use "
                             "--prefetch history")
    model = load(model_dir)
    predictor = load_for(model, path)
    meta = trace.meta
    if (predictor.num_layers, predictor.num_experts) != (meta.num_layers, meta.num_experts):
        raise MoeDeployError(f"the trace has {meta.num_layers} MoE layers x {meta.num_experts} experts, the predictor "
                             f"{predictor.num_layers} x {predictor.num_experts}: record the trace from its model")
    S = np.zeros((trace.num_tokens, meta.num_layers, meta.num_experts), np.float32)
    for request in np.unique(trace.request):
        rows = np.flatnonzero(trace.request == request)
        rows = rows[np.argsort(trace.position[rows], kind="stable")]  # the request's tokens in order
        logits, _ = predictor.forward(torch.from_numpy(trace.token[rows].astype(np.int64))[None])  # [1, n, L, E]
        S[rows] = chosen(logits[0], meta.top_k)
    return S
