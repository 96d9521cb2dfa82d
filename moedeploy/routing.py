"""Routers: hidden states -> (expert ids, gate weights), with each model family's exact semantics.

A router is two things: learned parameters that turn hidden states into logits (`Router`, an
`nn.Module`), and a *rule* that turns logits into a `Routing` (small frozen dataclasses below, pure
functions of their inputs). The rules reproduce `transformers`' own routers operation for operation,
including their dtype casts, so outputs match exactly.

Capacity routers (Switch Transformers, NLLB-MoE) drop (token, expert) pairs that overflow an expert's
capacity. A dropped pair keeps its slot in the `[T, K]` layout with the id `num_experts` (a sentinel
that sorts after every real expert) so that shapes stay static and dispatch skips it.

This module does not move tokens or run experts: see `dispatch.py` and `static_gating.py`.

Legend: T = tokens, E = experts, K = experts per token, G = capacity groups, S = tokens per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Routing:
    """Which experts each token goes to, and with what weight."""

    ids: Tensor  # [T, K] int64; `num_experts` marks a pair dropped by capacity
    weights: Tensor  # [T, K] gate weight of each pair


def _grouped_topk_mask(scores: Tensor, n_group: int, topk_group: int, group_score: Tensor) -> Tensor:
    """Mask [T, E] of experts whose group is among the `topk_group` best groups (DeepSeek)."""
    T, E = scores.shape
    group_idx = torch.topk(group_score, k=topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    group_mask = torch.zeros_like(group_score).scatter_(1, group_idx, 1)  # [T, n_group]
    return group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E).bool()


@dataclass(frozen=True)
class SoftmaxTopK:
    """Softmax over all experts, then top-k, optionally renormalised (Qwen2/3-MoE, OLMoE, Mixtral)."""

    top_k: int
    renormalize: bool
    keep_float32: bool = False  # Mixtral keeps fp32 weights; Qwen/OLMoE cast back to the logits' dtype

    def __call__(self, logits: Tensor) -> Routing:  # logits [T, E]
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)  # [T, K]
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.keep_float32:
            weights = weights.to(logits.dtype)
        return Routing(ids, weights)


@dataclass(frozen=True)
class TopKSoftmax:
    """Top-k on the logits, then softmax over the k chosen (GPT-OSS, GraniteMoE)."""

    top_k: int
    float32_logits: bool = False  # GraniteMoE takes top-k on fp32 logits and casts the weights back

    def __call__(self, logits: Tensor) -> Routing:  # logits [T, E]
        dtype = logits.dtype
        if self.float32_logits:
            logits = logits.float()
        top, ids = torch.topk(logits, self.top_k, dim=-1)  # [T, K]
        weights = F.softmax(top, dim=-1, dtype=top.dtype)
        return Routing(ids, weights.to(dtype))


@dataclass(frozen=True)
class DeepseekV2Rule:
    """Softmax, greedy or group-limited greedy top-k, times the routed scaling factor."""

    top_k: int
    method: str  # "greedy" | "group_limited_greedy"
    n_group: int
    topk_group: int
    scaling: float

    def __call__(self, logits: Tensor) -> Routing:  # logits [T, E] float32
        scores = logits.softmax(dim=-1, dtype=torch.float32)
        if self.method == "group_limited_greedy":
            T, E = scores.shape
            group_score = scores.view(T, self.n_group, E // self.n_group).max(dim=-1).values
            scores = scores.masked_fill(~_grouped_topk_mask(scores, self.n_group, self.topk_group, group_score), 0.0)
        weights, ids = torch.topk(scores, k=self.top_k, dim=-1, sorted=False)
        return Routing(ids, weights * self.scaling)


@dataclass(frozen=True)
class DeepseekV3Rule:
    """Sigmoid scores; choice by score + correction bias within the best groups; weights from raw scores."""

    top_k: int
    n_group: int
    topk_group: int
    renormalize: bool
    scaling: float

    def __call__(self, logits: Tensor, correction_bias: Tensor) -> Routing:  # logits [T, E] float32
        T, E = logits.shape
        scores = logits.sigmoid()
        choice = scores + correction_bias  # [T, E]
        group_score = choice.view(T, self.n_group, E // self.n_group).topk(2, dim=-1)[0].sum(dim=-1)
        choice = choice.masked_fill(~_grouped_topk_mask(scores, self.n_group, self.topk_group, group_score), float("-inf"))
        ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if self.renormalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(ids, weights * self.scaling)


@dataclass(frozen=True)
class SparseMixer:
    """PhiMoE's sparsemixer at inference: top-1, then top-2 among the rest, each weighted by a masked softmax.

    A logit only competes if it is within `2 * jitter_eps` (relative) of the current best one.
    PhiMoE always routes to exactly two experts, whatever `num_experts_per_tok` says.
    """

    jitter_eps: float

    def _pick(self, scores: Tensor, candidates: Tensor) -> tuple[Tensor, Tensor]:
        best, best_id = candidates.max(dim=-1, keepdim=True)  # [T, 1]
        factor = scores.abs().clamp(min=best)
        too_far = ((best - scores) / factor) > (2 * self.jitter_eps)
        gates = torch.softmax(candidates.masked_fill(too_far, float("-inf")), dim=-1)
        return best_id, gates.gather(-1, best_id)

    def __call__(self, logits: Tensor) -> Routing:  # logits [T, E]
        id1, w1 = self._pick(logits, logits)
        id2, w2 = self._pick(logits, torch.scatter(logits, -1, id1, float("-inf")))
        return Routing(torch.cat([id1, id2], dim=-1), torch.cat([w1, w2], dim=-1))


@dataclass(frozen=True)
class SwitchTop1:
    """Switch Transformers: argmax expert, weight = its probability; each expert takes at most
    `capacity` tokens of each sequence, in token order, and drops the rest."""

    num_experts: int
    capacity: int

    def __call__(self, logits: Tensor, out_dtype: torch.dtype) -> Routing:  # logits [G, S, E], G = sequences
        probs = F.softmax(logits, dim=-1, dtype=logits.dtype).to(out_dtype)
        weight, ids = probs.max(dim=-1)  # [G, S]
        onehot = F.one_hot(ids, self.num_experts)  # [G, S, E]
        position = (torch.cumsum(onehot, dim=-2) * onehot).sum(-1)  # [G, S] 1-based rank within its expert
        ids = ids.masked_fill(position > self.capacity, self.num_experts)
        return Routing(ids.reshape(-1, 1), weight.reshape(-1, 1))


@dataclass(frozen=True)
class NllbTop2:
    """NLLB-MoE (fairseq) top-2 gating with capacity over the whole batch.

    Every first choice is placed before any second choice; with `batch_prioritized` the tokens with the
    most confident first choice go first. At inference the capacity is `ceil(eval_fraction * T)` when
    `eval_fraction > 0`, else `capacity` (or `2 * ceil(T / E)` when unset). The two weights are
    renormalised to sum to 1, before or after dropping. Expert outputs are scaled by `output_scale`
    (`1 - moe_token_dropout`, which fairseq applies at inference), folded into the weights here.
    """

    num_experts: int
    eval_fraction: float
    capacity: int | None
    normalize_before_dropping: bool
    batch_prioritized: bool
    output_scale: float

    def capacity_for(self, num_tokens: int) -> int:
        if self.eval_fraction > 0:
            return math.ceil(self.eval_fraction * num_tokens)
        return self.capacity if self.capacity is not None else 2 * math.ceil(num_tokens / self.num_experts)

    def __call__(self, logits: Tensor, out_dtype: torch.dtype, keep: Tensor | None = None) -> Routing:
        # logits [T, E]; keep [T] bool, False for padding tokens (they take no capacity)
        T, E = logits.shape
        probs = F.softmax(logits, dim=-1, dtype=logits.dtype).to(out_dtype)
        mask1 = F.one_hot(probs.argmax(dim=-1), E)  # [T, E]
        mask2 = F.one_hot(logits.masked_fill(mask1.bool(), float("-inf")).argmax(dim=-1), E)
        if self.normalize_before_dropping:
            w1, w2 = self._normalize(probs, mask1, mask2)
        if keep is not None:
            mask1, mask2 = mask1 * keep.unsqueeze(-1), mask2 * keep.unsqueeze(-1)
        if self.batch_prioritized:
            order = (-probs.max(dim=1)[0]).argsort(dim=0)
            rank = order.argsort(dim=0)
            loc1 = ((torch.cumsum(mask1[order], dim=0) - 1) * mask1[order])[rank]
            loc2 = ((torch.cumsum(mask2[order], dim=0) - 1) * mask2[order])[rank]
        else:
            loc1 = torch.cumsum(mask1, dim=0) - 1
            loc2 = torch.cumsum(mask2, dim=0) - 1
        loc2 = loc2 + mask1.sum(dim=0, keepdim=True)  # second choices queue behind all first choices
        C = self.capacity_for(T)
        mask1 = mask1 * (loc1 < C)
        mask2 = mask2 * (loc2 < C)
        if not self.normalize_before_dropping:
            w1, w2 = self._normalize(probs, mask1, mask2)
        kept1, kept2 = mask1.sum(-1).bool(), mask2.sum(-1).bool()  # [T]
        ids = torch.stack([mask1.argmax(-1).masked_fill(~kept1, E), mask2.argmax(-1).masked_fill(~kept2, E)], dim=-1)
        weights = torch.stack([w1 * kept1, w2 * kept2], dim=-1) * self.output_scale
        return Routing(ids, weights)

    @staticmethod
    def _normalize(probs: Tensor, mask1: Tensor, mask2: Tensor) -> tuple[Tensor, Tensor]:
        p1, p2 = (probs * mask1).sum(dim=1), (probs * mask2).sum(dim=1)
        denom = torch.clamp(p1 + p2, min=torch.finfo(probs.dtype).eps)
        return p1 / denom, p2 / denom


class Router(nn.Module):
    """The router's parameters and its rule. `forward(x [T, D]) -> Routing`.

    `logits_dtype` is the dtype the family computes its logits in (fp32 for DeepSeek, Switch and NLLB),
    or None for the hidden states' own dtype.
    """

    def __init__(self, rule, weight: Tensor, bias: Tensor | None = None, correction_bias: Tensor | None = None,
                 logits_dtype: torch.dtype | None = None):
        super().__init__()
        self.rule = rule
        self.weight = nn.Parameter(weight, requires_grad=False)  # [E, D]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)  # [E]
        self.register_buffer("correction_bias", correction_bias)  # [E] DeepSeek-V3 only
        self.logits_dtype = logits_dtype
        self.linear = F.linear  # the logits' projection (kernels/dense.py `install` gives it decode steps' kernel)

    @property
    def num_experts(self) -> int:
        return self.weight.shape[0]

    @property
    def top_k(self) -> int:
        """Experts per token (2 for PhiMoE's sparsemixer, 1 for Switch, 2 for NLLB-MoE)."""
        rule = self.rule
        if isinstance(rule, SparseMixer | NllbTop2):
            return 2
        return 1 if isinstance(rule, SwitchTop1) else rule.top_k

    def logits(self, x: Tensor) -> Tensor:
        if self.logits_dtype is None:
            return self.linear(x, self.weight, self.bias)
        dt = self.logits_dtype
        return F.linear(x.to(dt), self.weight.to(dt), None if self.bias is None else self.bias.to(dt))

    @property
    def restrictable(self) -> bool:
        """Whether `restrict` applies: rules that rank experts by their logits alone (not capacity
        routers, not DeepSeek-V3's bias-corrected choice)."""
        return isinstance(self.rule, SoftmaxTopK | TopKSoftmax | DeepseekV2Rule | SparseMixer)

    def restrict(self, x: Tensor, allowed: Tensor) -> tuple[Routing, Routing]:
        """The router's choice (exact) and its choice among `allowed` experts only (allowed [T, E] or [E]
        bool): the rule applied to the logits with every other expert pushed to the bottom, so the
        weights are the rule's own over what is left. A token with fewer than K allowed experts keeps
        the allowed ones; its other pairs are dropped (id E, weight 0)."""
        logits = self.logits(x)  # [T, E]
        E = logits.shape[-1]
        exact = self.rule(logits)
        chosen = self.rule(logits.masked_fill(~allowed, torch.finfo(logits.dtype).min))
        kept = allowed.expand_as(logits).gather(1, chosen.ids)  # [T, K]
        return exact, Routing(torch.where(kept, chosen.ids, E), torch.where(kept, chosen.weights, 0))

    def forward(self, x: Tensor, groups: int = 1, keep: Tensor | None = None) -> Routing:
        """x [T, D]; `groups` splits T into equal capacity groups (Switch: one per sequence)."""
        logits = self.logits(x)  # [T, E]
        rule = self.rule
        if isinstance(rule, DeepseekV3Rule):
            return rule(logits, self.correction_bias)
        if isinstance(rule, SwitchTop1):
            return rule(logits.view(groups, -1, logits.shape[-1]), x.dtype)
        if isinstance(rule, NllbTop2):
            return rule(logits, x.dtype, keep)
        return rule(logits)
