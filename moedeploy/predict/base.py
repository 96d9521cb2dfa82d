"""One interface for every expert predictor, and the two baselines every evaluation reports.

A predictor looks at one sequence of T tokens and what is known about it, and scores the experts of
every MoE layer for every token: `scores(known) -> [T, L, E]`, higher = more likely routed there.
Scores are causal: row t depends only on what is known before token t's layer l runs, which each
predictor defines (SiDA: tokens <= t; lookahead: the hidden state one MoE layer earlier; trace
history: this token's earlier layers and earlier tokens' routing).

    Known (tokens | hidden states | routed experts) ─► Predictor.scores ─► [T, L, E] ─► metrics.py

This module does not evaluate (metrics.py) or train anything (sida.py, routenet.py).

Legend: T tokens, L MoE layers, E experts per layer, K experts per token, D hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ..errors import MoeDeployError


class PredictorError(MoeDeployError, ValueError):
    """A predictor file is missing, truncated or corrupt, or was trained for a different model."""


@dataclass(frozen=True)
class Known:
    """What a predictor may look at for one sequence; a field is None where the source lacks it
    (routing traces carry no tokens or hidden states; a model run carries everything)."""

    tokens: Tensor | None = None  # [T] int64 token ids
    hidden: Tensor | None = None  # [T, L, D]: hidden[:, 0] the token embeddings, hidden[:, l] MoE layer l-1's input
    experts: np.ndarray | None = None  # [T, L, K] the router's choices (trace predictors read earlier ones only)
    first: np.ndarray | None = None  # [T] bool: the token starts a sequence (a trace is many sequences in a row)

    @property
    def length(self) -> int:
        for x in (self.tokens, self.hidden, self.experts):
            if x is not None:
                return len(x)
        return 0


class Predictor(Protocol):
    """Anything that scores every MoE layer's experts for a sequence."""

    num_layers: int
    num_experts: int

    def scores(self, known: Known) -> Tensor:
        """[T, L, E] float scores, causal (see the module docstring)."""
        ...


class FrequencyPredictor:
    """The static baseline: each layer's experts ranked by how often the router chose them in the
    predictor's training text (the same ranking for every token)."""

    def __init__(self, frequency: Tensor):
        self.frequency = torch.as_tensor(frequency, dtype=torch.float32)  # [L, E]
        self.num_layers, self.num_experts = self.frequency.shape

    def scores(self, known: Known) -> Tensor:
        return self.frequency.expand(known.length, -1, -1)  # [T, L, E]


def frequency(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """[N, L, K] routed ids -> [L, E] float32 share of tokens that chose each expert (ids >= E ignored)."""
    N, L, _K = experts.shape
    counts = np.zeros((L, num_experts + 1), np.float64)
    ids = np.minimum(experts.astype(np.int64), num_experts)  # [N, L, K]
    np.add.at(counts, (np.broadcast_to(np.arange(L)[None, :, None], ids.shape), ids), 1.0)
    return (counts[:, :num_experts] / max(N, 1)).astype(np.float32)
