"""The MoE layer moedeploy puts in place of every family's sparse MoE block.

    x [T, D] ─► router ─► Routing (ids, weights [T, K])
                   │
        dynamic:   plan ─► gather ─► expert kernel (loop | grouped_mm) ─► combine ─┐
        static:    dispatch/combine one-hot [G, S, E, C] ─► padded expert bmm ─────┤
                                                                                    ▼
                                               y [T, D] (+ shared experts, if any)

Shared experts keep the family's own modules and attribute names, so their checkpoint tensors load
by name. Family-specific calling conventions (NLLB's padding mask, GPT-OSS's tuple output) live in
the family files under `models/`.
"""

from __future__ import annotations

import functools
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.autograd.profiler as _profiler
from torch import Tensor, nn
from torch.profiler import record_function

from . import kernels
from .dispatch import combine, count, gather, plan, weighted_sum
from .errors import OptionError
from .experts import ExpertBank
from .routing import NllbTop2, Router, Routing, SwitchTop1
from .static_gating import Capacity, static_moe

GATING_MODES = ("dynamic", "static")
_NO_LABEL = nullcontext()


def _label(name: str):
    """A profiler range (read by trace/profile.py) while a profiler runs; otherwise nothing: an unguarded
    record_function costs ~7 us per range on CPU, the guard ~0.15 us."""
    return record_function(name) if _profiler._is_profiler_enabled else _NO_LABEL


@dataclass(frozen=True)
class Gating:
    mode: str = "dynamic"  # "dynamic": sort by expert, no capacity (exact); "static": capacity buffers (baseline)
    capacity: Capacity | None = None  # static only; None = the model's own capacity, else room for every token
    backend: str = "auto"  # expert kernel for dynamic gating: "auto", "loop" or "grouped_mm"

    def __post_init__(self):
        if self.mode not in GATING_MODES:
            raise OptionError(f"unknown gating {self.mode!r}; choose one of: {', '.join(GATING_MODES)}")
        if self.capacity is not None and self.mode != "static":
            raise OptionError("a capacity applies only to gating='static'; dynamic gating has no capacity")


class MoELayer(nn.Module):
    def __init__(self, router: Router, experts: ExpertBank, gating: Gating,
                 shared: tuple[str, nn.Module] | None = None, shared_gate: tuple[str, nn.Module] | None = None,
                 parallel=None):
        super().__init__()
        if parallel is None and router.num_experts != experts.num_experts:
            raise ValueError(f"router has {router.num_experts} experts, the expert bank {experts.num_experts}")
        self.router = router
        self.experts = experts
        self.gating = gating
        self.backend = kernels.select(gating.backend, experts)
        self.may_drop = isinstance(router.rule, (SwitchTop1, NllbTop2))  # capacity routers drop pairs
        self._shared = shared[0] if shared else None
        self._shared_gate = shared_gate[0] if shared_gate else None
        for named in (shared, shared_gate):
            if named:
                self.add_module(*named)
        # Statistics, accumulated on the device without host syncs.
        self.register_buffer("expert_counts", torch.zeros(router.num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("dropped_pairs", torch.zeros((), dtype=torch.long), persistent=False)
        self.routed_pairs = 0
        # Routing-trace tap (moedeploy.trace.record): a callable taking the Routing, or None (costs one `if`).
        self.recorder = None
        # Expert buffering (moedeploy.cache): the slot pool holding this layer's resident experts, and
        # this layer's index in the pool's keys; None when every expert is resident.
        self.pool = None
        self.pool_index = 0
        # Where this layer's experts wait for the pool (store.HostStore or store.DiskStore); set by the loader.
        self.store = None
        # Every expert of the layer as the checkpoint has them (store.DiskStore; set by the loader): read when
        # the bank is not the full float one (quantized, on disk, a rank's share) to verify or to rebalance.
        self.source = None
        # Prefetcher for the next MoE layer (predict/lookahead.py): its guess comes to the host with this
        # layer's counts; its prefetch is sent once this layer's experts are queued.
        self.lookahead = None
        # SiDA's runtime (predict/ahead.py): the step's prediction, its prefetches, and for routing="predicted"
        # each token's predicted experts; None without a predictor.
        self.ahead = None
        # "exact" (the router decides), "resident" (the router's choice among the experts resident now) or
        # "predicted" (among the predictor's top-K): the last two depart from the router, counted below.
        self.routing_mode = "exact"
        self.register_buffer("departed_pairs", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("departed_weight", torch.zeros((), dtype=torch.float64), persistent=False)
        # Expert parallelism (parallel/layer.py): `experts` holds this rank's slots only, and pairs travel
        # to the rank of their slot and back; None when this process holds every expert.
        self.parallel = parallel

    @property
    def capacity_per_sequence(self) -> bool:
        return isinstance(self.router.rule, SwitchTop1)

    def forward(self, hidden_states: Tensor) -> Tensor:
        shape = hidden_states.shape  # [B, S, D]
        groups = shape[0] if self.capacity_per_sequence else 1
        y = self.moe(hidden_states.reshape(-1, shape[-1]), groups)
        return y.view(shape)

    def moe(self, x: Tensor, groups: int = 1, keep: Tensor | None = None) -> Tensor:
        """x [T, D] -> y [T, D]. `groups` splits T for per-sequence capacity; `keep` [T] masks padding."""
        with _label("moe.route"):
            routing, departs = self._route(x, groups, keep)
        if self.recorder is not None:
            self.recorder(routing)
        E = self.router.num_experts
        self.routed_pairs += routing.ids.numel()
        if self.gating.mode == "dynamic":
            kernel = kernels.for_step(self.backend, x, routing.ids.numel(), self.experts)  # the whole step's
            if self.parallel is not None:
                y = self.parallel(x, routing, functools.partial(self._experts, kernel=kernel))
                self.expert_counts.add_(count(routing.ids, E))
            else:
                y, counts = self._experts(x, routing, kernel, departs)
                self.expert_counts.add_(counts)  # in place: `+=` on a buffer goes through Module.__setattr__
            if self.may_drop:
                self.dropped_pairs.add_((routing.ids == E).sum())
        else:
            with _label("moe.static"):
                result = static_moe(x, routing, self.experts, groups,
                                    self._static_capacity(x.shape[0] // groups, routing))
            y = result.y
            self.expert_counts.add_(count(routing.ids, E))
            self.dropped_pairs.add_(result.dropped + (routing.ids == E).sum())
        if self._shared is not None:
            with _label("moe.shared"):
                s = getattr(self, self._shared)(x)
                if self._shared_gate is not None:
                    s = torch.sigmoid(getattr(self, self._shared_gate)(x)) * s
            y = y + s
        return y.to(x.dtype)

    def _route(self, x: Tensor, groups: int, keep: Tensor | None) -> tuple[Routing, bool]:
        """This step's routing, and whether it may hold dropped pairs beyond the router's own (a
        departure with too few allowed experts)."""
        if self.ahead is not None:
            self.ahead.arrive(self)  # sends the step's prefetches once the prediction is ready
        allowed = self._allowed(x.shape[0])
        if allowed is None:
            return self.router(x, groups=groups, keep=keep), False
        exact, chosen = self.router.restrict(x, allowed)
        kept = (exact.ids[:, :, None] == chosen.ids[:, None, :]).any(-1)  # [T, K] the router's pairs still chosen
        self.departed_pairs.add_((~kept).sum())
        self.departed_weight.add_(exact.weights.double().masked_fill(kept, 0).sum())
        return chosen, True

    def _allowed(self, tokens: int) -> Tensor | None:
        """The experts this step may choose from ([T, E] or [E] bool), or None for the router's choice."""
        if self.routing_mode == "predicted":
            return self.ahead.allowed(self, tokens)
        if self.routing_mode == "resident" and self.pool is not None:
            allowed = torch.zeros(self.router.num_experts, dtype=torch.bool)
            allowed[self.pool.resident(self.pool_index)] = True
            return allowed.to(self.router.weight.device, non_blocking=True)
        return None

    def _experts(self, x: Tensor, routing: Routing, kernel: str, departs: bool = False) -> tuple[Tensor, Tensor]:
        """Dynamic gating over this layer's expert bank: y [T, D] and the pairs per expert [E'] (E' = the
        bank's experts: every expert, or this rank's slots under expert parallelism). `kernel`: the step's
        backend (`kernels.for_step`). `departs`: the routing may hold dropped pairs though the router does not
        drop (a restricted choice)."""
        if self.pool is not None:
            return self._moe_buffered(x, routing, kernel)
        may_drop = self.may_drop or departs
        pairs_kernel = None if may_drop else kernels.direct(kernel, routing.ids)
        if pairs_kernel is not None:  # a decode step: no plan
            with _label("moe.experts"):
                pairs = pairs_kernel(x, routing.ids, self.experts)  # [T*K, D]
            with _label("moe.combine"):
                return weighted_sum(pairs, routing.weights), count(routing.ids, self.experts.num_experts)
        with _label("moe.dispatch"):
            p = plan(routing, self.experts.num_experts, may_drop=may_drop)
            x_sorted = gather(x, p)  # [P, D]
        with _label("moe.experts"):
            y_sorted = kernels.BACKENDS[kernel](x_sorted, p, self.experts)  # [P, D]
        with _label("moe.combine"):
            return combine(y_sorted, p), p.counts

    def _moe_buffered(self, x: Tensor, routing: Routing, kernel: str) -> tuple[Tensor, Tensor]:
        """Dynamic gating with only some experts resident: the needed experts pass through the pool's
        slots in chunks that fit; every pair's row lands in one buffer in token order, and one weighted
        sum at the end makes the output bit-identical to the fully resident layer."""
        E, S = self.experts.num_experts, self.pool.num_slots
        counts = count(routing.ids, E)  # [E]
        guess = None if self.lookahead is None else self.lookahead.counts(x)  # [E'] the next layer's picks
        # The one host sync of the layer: the cache decides on the host what to fetch.
        host = (counts if guess is None else torch.cat([counts, guess])).tolist()
        per_expert, next_counts = host[:E], host[E:]
        needed = [e for e, n in enumerate(per_expert) if n]
        pairs = torch.zeros(routing.ids.numel(), x.shape[-1], dtype=x.dtype, device=x.device)  # [T*K, D]
        chunks = self.pool.chunks([(self.pool_index, e) for e in needed])
        if len(chunks) > 1:
            self.pool.note_streaming(len(needed))
        for keys in chunks:
            chunk = [e for _, e in keys]
            with _label("moe.transfer"):
                slots = self.pool.acquire(keys)
            sizes = [0] * S  # pairs per slot, known here: the loop kernel needs no sync
            for e, s in zip(chunk, slots):
                sizes[s] = per_expert[e]
            with _label("moe.dispatch"):
                p = plan(Routing(_remap(chunk, slots, E, S, x.device)[routing.ids], routing.weights), S,
                         may_drop=True, sizes=sizes)
                x_sorted = gather(x, p)
            with _label("moe.experts"):
                y_sorted = kernels.BACKENDS[kernel](x_sorted, p, self.pool.slots)  # [P, D]
            n = sum(sizes)  # this chunk's rows come first in the plan
            pairs.index_copy_(0, p.order[:n], y_sorted[:n])
        if self.lookahead is not None:  # after this layer's experts are queued: their slots may be reused
            with _label("moe.prefetch"):
                self.lookahead.prefetch(next_counts)
        with _label("moe.combine"):
            return weighted_sum(pairs, routing.weights), counts

    def _static_capacity(self, tokens_per_group: int, routing) -> int:
        K, E = routing.ids.shape[-1], self.experts.num_experts
        if self.gating.capacity is not None:
            return self.gating.capacity.slots(tokens_per_group, K, E)
        rule = self.router.rule
        if isinstance(rule, SwitchTop1):
            return rule.capacity
        if isinstance(rule, NllbTop2):
            return rule.capacity_for(tokens_per_group)
        return tokens_per_group  # room for every token: no drops, exact

    def reset_stats(self) -> None:
        self.expert_counts.zero_()
        self.dropped_pairs.zero_()
        self.departed_pairs.zero_()
        self.departed_weight.zero_()
        self.routed_pairs = 0


def _remap(chunk: list[int], slots: list[int], E: int, S: int, device) -> Tensor:
    """[E + 1] expert id -> slot for the chunk's experts, S (dropped) for every other id. Built on the
    host and sent without a sync (a pageable non-blocking copy is staged at once)."""
    remap = torch.full((E + 1,), S, dtype=torch.long)
    remap[chunk] = torch.tensor(slots, dtype=torch.long)
    return remap.to(device, non_blocking=True)
