"""A trace-history predictor that learns how to combine routing evidence: no hidden states, no tokens.

Layer m of token t is predicted `lookahead` (d) layers before it runs, from what is known then: this
token's experts at layers <= m-d, and every earlier token's routing (the tokens served so far). Per
expert j of layer m, four pieces of evidence, each in [0, 1]:

    neighbours  earlier tokens whose routing at layers <= m-d overlaps this token's, weighted by
                softmax(beta * sum_i decay^i * |experts(t, m-d-i) ∩ experts(s, m-d-i)|); their vote for j
                at layer m. The memory is the last `memory` tokens: the training traces, then the
                tokens served (routing repeats for repeated words and templates: this finds them online)
    cooccur     P(j at m | this token's experts at m-d): history.py's table fitted on the training
                traces (a prior worth `prior` tokens) plus the counts of the tokens served
    previous    the previous token of the same sequence chose j at layer m
    recent      an EMA over earlier tokens of [j at layer m]

and a small ranker, one MLP shared by every expert and layer (its input: the evidence, its logs, and
the layer one-hot) turns them into a logit. Sharing it across experts keeps it from learning which
expert ids a training domain likes, which transfers badly (docs/characterization.md).

Design notes (tuned on ESFT intent -> translation only; docs/prediction.md has the runs): an MLP over
the multi-hot routing of the token's earlier layers and the previous token (2 x 512 hidden, per-layer
heads) reached 38% recall@6 on translation; online co-occurrence alone 51%; the neighbour vote alone
77%; the ranker over all four is what `train` fits.

Legend: N tokens in a stream, M memory tokens, L MoE layers, K experts per token, E experts, F features.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import files
from .base import Known, PredictorError, frequency
from .history import HistoryPredictor, ScoreConfig, onehot
from .history import fit as fit_cooccurrence
from .history import scores as cooccurrence_scores

KIND = "routenet"
EVIDENCE = ("neighbours", "sharp", "match", "cooccur", "previous", "recent")


@dataclass(frozen=True)
class RouteConfig:
    lookahead: int = 1  # d: layers between knowing and needing
    beta: float = 1.0  # neighbour softmax sharpness, per shared expert
    decay: float = 0.8  # weight of the overlap i layers further back: decay**i
    memory: int = 16384  # tokens the neighbour vote remembers (newest kept)
    prior_memory: bool = True  # the memory starts with the training traces' tokens
    prior: float = 50.0  # weight of the fitted co-occurrence table, in tokens (history.ScoreConfig.prior)
    recent: float = 0.9  # EMA decay of the `recent` evidence, per token
    hidden: int = 32  # ranker width

    @classmethod
    def from_dict(cls, d: dict) -> RouteConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = 3.0
    steps: int | None = None  # overrides epochs
    batch: int = 256  # (token, layer) rows per step
    lr: float = 3e-3
    seed: int = 0


class Ranker(nn.Module):
    """evidence [B, E, F] + layer [B] -> logits [B, E]: one small MLP for every expert and layer."""

    def __init__(self, num_layers: int, hidden: int):
        super().__init__()
        self.num_layers = num_layers
        self.mlp = nn.Sequential(nn.Linear(2 * len(EVIDENCE) + num_layers, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                 nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, evidence: Tensor, layer: Tensor) -> Tensor:
        B, E, _ = evidence.shape
        lay = F.one_hot(layer, self.num_layers).float()[:, None].expand(B, E, -1)  # [B, E, L]
        x = torch.cat([evidence, (evidence + 1e-3).log(), lay], -1)  # [B, E, F]
        return self.mlp(x)[..., 0]


def neighbour_votes(X: Tensor, memory: Tensor, cfg: RouteConfig, block: int = 512) -> tuple[Tensor, Tensor, Tensor]:
    """X [N, L, E] the stream's multi-hot routing; memory [M, L, E] tokens known before it ->
    (votes, sharp votes [N, L, E], match [N, L]): for each token and layer, the vote of earlier tokens
    weighted by routing overlap at the layers known d earlier (module docstring), the same with a
    4x sharper softmax, and how well the best earlier token matches (its overlap over the most
    possible, 0..1). Causal: token t reads memory and stream tokens < t."""
    N, L, E = X.shape
    d, W = cfg.lookahead, cfg.memory
    keys = torch.cat([memory, X])  # [M+N, L, E]
    M = len(memory)
    K = X[0, 0].sum().clamp_min(1)
    out, sharp, match = torch.zeros(N, L, E), torch.zeros(N, L, E), torch.zeros(N, L)
    for b0 in range(0, N, block):
        b1 = min(b0 + block, N)
        lo = max(0, M + b0 - W)
        k = keys[lo:M + b1]  # [Kb, L, E]
        pos = torch.arange(lo, M + b1)[None, :]  # key positions
        q = torch.arange(M + b0, M + b1)[:, None]  # query positions
        allowed = (pos < q) & (pos >= q - W)  # [B, Kb]
        any_allowed = allowed.any(-1, keepdim=True)
        S = torch.zeros(b1 - b0, len(k))
        most = 0.0
        for m in range(L):
            if m - d >= 0:
                S = cfg.decay * S + X[b0:b1, m - d] @ k[:, m - d].T  # overlaps at layer m-d
                most = cfg.decay * most + float(K)
            masked = S.masked_fill(~allowed, float("-inf"))
            for dst, beta in ((out, cfg.beta), (sharp, 4 * cfg.beta)):
                w = torch.softmax(beta * masked, -1)
                w = torch.where(any_allowed, w, torch.zeros_like(w))  # the very first token: no vote
                dst[b0:b1, m] = w @ k[:, m]
            if most:
                match[b0:b1, m] = masked.max(-1).values.clamp_min(0) / most
    return out, sharp, match


def previous_token(X: Tensor, first: np.ndarray) -> Tensor:
    """[N, L, E]: the previous token's routing within its sequence (zeros at a sequence's first token)."""
    prev = torch.zeros_like(X)
    prev[1:] = X[:-1]
    prev[torch.as_tensor(first)] = 0
    return prev


def recency(X: Tensor, decay: float) -> Tensor:
    """[N, L, E]: EMA over earlier tokens of the stream (not including the token itself)."""
    out = torch.zeros_like(X)
    r = torch.zeros(X.shape[1:])
    for t in range(len(X)):
        out[t] = r
        r = decay * r + (1 - decay) * X[t]
    return out


def evidence(experts: np.ndarray, first: np.ndarray, num_experts: int, cfg: RouteConfig,
             memory: Tensor | None = None, table: HistoryPredictor | None = None) -> Tensor:
    """experts [N, L, K] one stream (sequences in order, `first` [N] marks each one's first token) ->
    [N, L, E, F] evidence (EVIDENCE order)."""
    E = num_experts
    X = torch.from_numpy(onehot(experts, E))  # [N, L, E]
    mem = memory if memory is not None else torch.zeros(0, *X.shape[1:])
    nb, sharp, match = neighbour_votes(X, mem, cfg)
    co = torch.from_numpy(cooccurrence_scores(table, experts, E, ScoreConfig(lookahead=cfg.lookahead, prior=cfg.prior)))
    return torch.stack([nb, sharp, match[..., None].expand_as(nb), co, previous_token(X, first), recency(X, cfg.recent)],
                       -1)


class RouteNet:
    """A trained trace predictor: the ranker, the training traces' memory and co-occurrence table.
    `scores(known)` with `known.experts` [N, L, K] (and `known.first`, or one sequence)."""

    def __init__(self, ranker: Ranker, cfg: RouteConfig, model: dict, memory: Tensor, table: HistoryPredictor,
                 freq: Tensor, training: dict | None = None):
        self.ranker = ranker.eval()
        self.cfg = cfg
        self.model = model  # num_layers, num_experts, top_k, source
        self.memory = memory  # [M, L, K] int16: the training traces' last tokens
        self.table = table
        self.frequency = freq  # [L, E]
        self.training = training or {}
        self.num_layers, self.num_experts = model["num_layers"], model["num_experts"]

    def check(self, num_layers: int, num_experts: int, top_k: int) -> None:
        """Refuse a trace of another model shape."""
        files.check_model(self.training.get("path", "file"), self.model,
                          {"num_layers": num_layers, "num_experts": num_experts, "top_k": top_k},
                          "moedeploy predict train --trace T")

    def evidence(self, known: Known) -> Tensor:
        if known.experts is None:
            raise PredictorError("the trace predictor needs the routed experts of earlier tokens and layers")
        first = known.first if known.first is not None else np.eye(1, known.length, dtype=bool)[0]
        mem = torch.from_numpy(onehot(self.memory.numpy(), self.num_experts)) if self.cfg.prior_memory else None
        return evidence(known.experts, first, self.num_experts, self.cfg, mem, self.table)

    @torch.inference_mode()
    def scores(self, known: Known) -> Tensor:
        ev = self.evidence(known)  # [N, L, E, F]
        N, L, E, _ = ev.shape
        layer = torch.arange(L).repeat(N)
        return self.ranker(ev.reshape(N * L, E, -1), layer).view(N, L, E)

    def save(self, path):
        t = self.table
        tensors = {f"ranker.{k}": v for k, v in self.ranker.state_dict().items()}
        tensors |= {"memory": self.memory.to(torch.int16), "frequency": self.frequency.float(),
                    "cooccur.counts": torch.from_numpy(t.counts).float(),  # [d, L, E, E]
                    "cooccur.sources": torch.from_numpy(t.sources).float()}  # [d, L, E]
        return files.save(path, KIND, self.model, asdict(self.cfg), self.training | {"table_tokens": t.tokens}, tensors)

    @classmethod
    def load(cls, path) -> RouteNet:
        pf = files.read(path, KIND)
        files.require(pf, ["memory", "frequency", "cooccur.counts", "cooccur.sources"])
        try:
            cfg = RouteConfig.from_dict(pf.config)
            m = pf.model
            L, E, K = m["num_layers"], m["num_experts"], m["top_k"]
            ranker = Ranker(L, cfg.hidden)
            ranker.load_state_dict({k[len("ranker."):]: v.float() for k, v in pf.tensors.items() if k.startswith("ranker.")})
            counts = pf.tensors["cooccur.counts"].double().numpy()
            sources = pf.tensors["cooccur.sources"].double().numpy()
            D = cfg.lookahead
            if counts.shape != (D, L, E, E) or sources.shape != (D, L, E) or pf.tensors["memory"].shape[1:] != (L, K):
                raise PredictorError(f"tensor shapes {tuple(counts.shape)}, {tuple(sources.shape)} do not fit "
                                     f"{L} layers x {E} experts")
        except (KeyError, TypeError, RuntimeError, PredictorError) as ex:
            raise PredictorError(f"predictor file {pf.path} does not hold a trace predictor of its header's shape "
                                 f"({str(ex).splitlines()[0]})") from ex
        table = HistoryPredictor(counts, sources, K, int(pf.training.get("table_tokens", 0)))
        return cls(ranker, cfg, m, pf.tensors["memory"], table, pf.tensors["frequency"].float(),
                   pf.training | {"path": pf.path})


def train(streams: list[tuple[np.ndarray, np.ndarray]], model: dict, cfg: RouteConfig = RouteConfig(),
          tc: TrainConfig = TrainConfig(), progress: bool = True) -> tuple[RouteNet, dict]:
    """streams: (experts [N, L, K], first [N]) per training trace (a domain). The ranker learns from each
    stream's evidence as a new domain would produce it: the memory and co-occurrence table come from the
    *other* training streams (none when there is one), then the stream's own tokens online (never its own
    future). The saved predictor's memory and table come from all of them."""
    torch.manual_seed(tc.seed)
    L, E, _K = model["num_layers"], model["num_experts"], model["top_k"]
    if not streams:
        raise PredictorError("no traces to train on")
    if not 1 <= cfg.lookahead < L:
        raise PredictorError(f"lookahead must be between 1 and {L - 1} layers, got {cfg.lookahead}")
    start = time.perf_counter()
    evs, targets = [], []
    for i, (experts, first) in enumerate(tqdm(streams, desc="moedeploy: evidence", unit="trace",
                                              disable=not progress or None, leave=False)):
        others = [s[0] for j, s in enumerate(streams) if j != i]
        memory = table = None
        if others:
            table = fit_cooccurrence(others, E, cfg.lookahead)
            if cfg.prior_memory:
                memory = torch.from_numpy(onehot(np.concatenate(others)[-cfg.memory:], E))
        evs.append(evidence(experts, first, E, cfg, memory, table))  # [N, L, E, F]
        targets.append(torch.from_numpy(onehot(experts, E)))
    ev, y = torch.cat(evs).flatten(0, 1), torch.cat(targets).flatten(0, 1)  # [N*L, E, F], [N*L, E]
    layer = torch.arange(L).repeat(len(ev) // L)
    rows = len(ev)
    steps = tc.steps if tc.steps is not None else max(1, math.ceil(tc.epochs * rows / tc.batch))
    ranker = Ranker(L, cfg.hidden)
    opt = torch.optim.AdamW(ranker.parameters(), lr=tc.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, tc.lr, total_steps=steps)
    gen = torch.Generator().manual_seed(tc.seed)
    with tqdm(range(steps), desc="moedeploy: training the trace predictor", unit="step",
              disable=not progress or None, leave=False) as bar:
        for step in bar:
            b = torch.randint(rows, (tc.batch,), generator=gen)
            logits = ranker(ev[b], layer[b])
            target = y[b] / y[b].sum(-1, keepdim=True).clamp_min(1)
            loss = -(target * logits.log_softmax(-1)).sum(-1).mean()  # listwise: the K routed experts share the mass
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                bar.set_postfix(loss=round(loss.item(), 4))
    all_experts = np.concatenate([s[0] for s in streams])
    memory = torch.from_numpy(all_experts[-cfg.memory if cfg.prior_memory else len(all_experts):].astype(np.int16))
    table = fit_cooccurrence([s[0] for s in streams], E, cfg.lookahead)  # lookaheads 1..d; scores read d's
    report = {"tokens": len(all_experts), "steps": steps, "final_loss": round(loss.item(), 4),
              "train_seconds": round(time.perf_counter() - start, 1), "train_config": asdict(tc)}
    freq = torch.from_numpy(frequency(all_experts, E))
    return RouteNet(ranker, cfg, model, memory, table, freq, report), report
