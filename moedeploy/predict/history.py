"""A trace-history expert predictor: which experts will an upcoming MoE layer use?

At decode time a prefetch for layer m of token t is issued `lookahead` layers earlier, at layer m-d of
the same token (or, for m < d, near the end of token t-1). What is known then: this token's experts at
layers 0..m-d, and every earlier token's experts at every layer. The score of expert j at layer m
mixes two estimates of P(j is among layer m's top-k):

    cross    = mean over i in experts(t, m-d) of P(j at m | i at m-d)     (same token, d layers back)
    recency  = EMA over earlier tokens of [j was used at layer m], decay `decay` per token
    score    = mix * cross + (1 - mix) * recency          (recency alone where m < d)

P(j at m | i at m-d) is a posterior: counts fitted offline on tuning traces (`fit`) act as a prior
worth `prior` tokens, and counts of the tokens served so far are added online, so the table adapts
to the served workload (characterization.md: the offline table transfers poorly across domains).
Both terms are causal: scores for token t use only what is known when the prefetch is issued.

The fitted counts are saved as .npz (`save` / `load`). Legend: N tokens, L layers, K top-k,
E experts per layer, D the largest lookahead fitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import replaced
from .base import PredictorError

FORMAT = 1


@dataclass(frozen=True)
class ScoreConfig:
    lookahead: int = 1  # d: layers between issuing a prefetch and needing its experts
    decay: float = 0.8  # recency EMA decay per token
    prior: float = 50.0  # weight of the offline table, in tokens
    mix: float = 1.0  # weight of the cross-layer term (1.0 best on intent/translation: recency adds nothing)


@dataclass(frozen=True)
class HistoryPredictor:
    counts: np.ndarray  # [D, L, E, E] float64: counts[d-1, m, i, j] = tokens with i at m-d and j at m
    sources: np.ndarray  # [D, L, E] float64: sources[d-1, m, i] = tokens with i at m-d
    top_k: int
    tokens: int  # tokens fitted on

    @property
    def shape(self) -> tuple[int, int, int]:
        """(D, L, E)"""
        D, L, E, _ = self.counts.shape
        return D, L, E

    def check(self, num_layers: int, num_experts: int, top_k: int, lookahead: int) -> None:
        D, L, E = self.shape
        if (L, E, self.top_k) != (num_layers, num_experts, top_k):
            raise PredictorError(f"the predictor was fitted for {L} layers x {E} experts, top-{self.top_k}; this trace "
                                 f"has {num_layers} x {num_experts}, top-{top_k}: fit one on traces of this model")
        if not 1 <= lookahead <= D:
            raise PredictorError(f"lookahead {lookahead} is outside the predictor's fitted 1..{D}; refit with "
                                 f"`moedeploy predict fit --max-lookahead {lookahead}`")

    def offline(self, d: int) -> np.ndarray:
        """[L, E, E] P(j at m | i at m-d) from the fitted counts (uniform K/E where i was never seen)."""
        E = self.shape[2]
        src = self.sources[d - 1][:, :, None]
        return np.where(src > 0, self.counts[d - 1] / np.maximum(src, 1), self.top_k / E)

    def save(self, path: str | Path) -> Path:
        with replaced(path) as f:  # a file object: numpy would otherwise append .npz to other names
            np.savez_compressed(f, format=FORMAT, counts=self.counts.astype(np.float32),
                                sources=self.sources.astype(np.float32), top_k=self.top_k, tokens=self.tokens)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> HistoryPredictor:
        path = Path(path)
        if not path.is_file():
            raise PredictorError(f"predictor file {path} does not exist; make one with `moedeploy predict fit`")
        try:
            with np.load(path) as z:
                if int(z["format"]) != FORMAT:
                    raise PredictorError(f"{path} is predictor format {int(z['format'])}; this moedeploy reads {FORMAT}")
                p = cls(counts=z["counts"].astype(np.float64), sources=z["sources"].astype(np.float64),
                        top_k=int(z["top_k"]), tokens=int(z["tokens"]))
        except PredictorError:
            raise
        except Exception as ex:  # numpy's and zipfile's errors for a truncated or corrupt file are many
            raise PredictorError(f"{path} is not a moedeploy predictor file, or is truncated or corrupt "
                                 f"({type(ex).__name__}: {ex})") from ex
        if p.counts.ndim != 4 or p.sources.shape != p.counts.shape[:3]:
            raise PredictorError(f"{path} holds arrays of shapes {p.counts.shape}, {p.sources.shape}; not a predictor")
        return p


def fit(traces: list[np.ndarray], num_experts: int, max_lookahead: int = 4) -> HistoryPredictor:
    """Count co-occurrences (i at layer m-d, j at m) of the same token for d = 1..max_lookahead.
    traces: [N, L, K] expert ids, one array per trace (ids >= E, dropped pairs, are ignored)."""
    if not traces:
        raise PredictorError("no traces to fit the predictor on")
    L, K = traces[0].shape[1:]
    if any(t.shape[1:] != (L, K) for t in traces):
        raise PredictorError("the traces to fit on have different numbers of layers or top-k")
    D, E = max_lookahead, num_experts
    if not 1 <= D < L:
        raise PredictorError(f"--max-lookahead must be between 1 and {L - 1}, got {D}")
    counts, sources = np.zeros((D, L, E, E)), np.zeros((D, L, E))
    for experts in traces:
        X = onehot(experts, E)  # [N, L, E]
        for d in range(1, D + 1):
            counts[d - 1, d:] += np.einsum("nli,nlj->lij", X[:, :-d], X[:, d:])
            sources[d - 1, d:] += X[:, :-d].sum(0)
    return HistoryPredictor(counts, sources, int(K), int(sum(len(t) for t in traces)))


def onehot(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, L, K] ids -> [N, L, E] float32 indicators (ids >= E ignored)."""
    N, L, _K = experts.shape
    X = np.zeros((N, L, num_experts + 1), np.float32)
    ids = np.minimum(experts.astype(np.int64), num_experts)
    np.put_along_axis(X, ids, 1.0, axis=2)
    return X[:, :, :num_experts]


def scores(predictor: HistoryPredictor | None, experts: np.ndarray, num_experts: int, cfg: ScoreConfig) -> np.ndarray:
    """[N, L, E] float32: score of expert j for layer m of token t, from what is known `cfg.lookahead`
    layers before it is needed. experts [N, L, K]. Without a predictor the cross term counts only the
    tokens served so far (no offline prior)."""
    N, L, _K = experts.shape
    E, d = num_experts, cfg.lookahead
    if not 1 <= d < L:
        raise PredictorError(f"lookahead must be between 1 and {L - 1} layers, got {d}")
    X = onehot(experts, E)  # [N, L, E]
    prior = np.zeros((L, E, E)) if predictor is None else cfg.prior * predictor.offline(d)  # [L, E, E]
    weight = 0.0 if predictor is None else cfg.prior
    seen, seen_src = np.zeros((L, E, E)), np.zeros((L, E))  # online counts of tokens already served
    out = np.empty((N, L, E), np.float32)
    recency = np.zeros((L, E))
    for t in range(N):
        x = X[t]  # [L, E]
        src = x[:-d]  # [L-d, E]: this token's experts at m-d, known when layer m's prefetch is issued
        num = np.einsum("li,lij->lj", src, seen[d:] + prior[d:])  # [L-d, E]
        den = np.einsum("li,li->l", src, seen_src[d:] + weight)[:, None]  # [L-d, 1]
        cross = np.where(den > 0, num / np.maximum(den, 1e-9), 0.0)
        out[t] = recency
        out[t, d:] = cfg.mix * cross + (1 - cfg.mix) * recency[d:]
        seen[d:] += src[:, :, None] * x[d:, None, :]
        seen_src[d:] += src
        recency = cfg.decay * recency + (1 - cfg.decay) * x
    return out
