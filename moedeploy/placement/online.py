"""Online rebalancing: walk the evaluation batches in order, re-plan from the recent past, move gradually.

    batch  0    1    2   ...   R   R+1  ...                (B tokens each, processing order)
           │    │    │         │
           │    │    │         └─ re-plan: policies.migrate(placement in force, load of the last W batches)
           │    │    │            ─► target; the layers that differ are queued, most imbalanced first
           ▼    ▼    ▼              (imbalance of the window under the placement in force, fixed split)
    slots in force [T, L, S]   after each batch, up to M queued layers switch to their target
                               (vLLM's EPLB moves one layer per step): the batch after sees them;
                               M = B / move_tokens, a copy budget that scales with the batch's work

A re-plan sees only batches already served (and the planning tokens before them), never the batch it is
scored on; the moves it starts take effect one batch later at the earliest. Moved bytes = (layer, slot)
pairs whose expert changed when a layer switched x one expert's bytes. R and W are given in tokens and
rounded to whole batches (at least one), so one setting means the same history at every batch size.

This module decides when to re-plan and what is in force; planning is policies.py, scoring evaluate.py.

Legend: T = evaluation batches, B = tokens per batch, L = MoE layers, E = experts, S = slots, N = devices.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from ..errors import PlacementError
from .load import batch_counts
from .plan import Placement
from .policies import _placement, migrate


@dataclass(frozen=True)
class OnlineConfig:
    """Chosen on ESFT intent / translation only (docs/benchmarks.md, "Expert placement")."""

    every: int = 256  # tokens between re-plans (R = every // B batches, at least 1)
    window: int = 1024  # tokens of recent history a re-plan counts (W = window // B batches, at least 1)
    penalty: float = 0.1  # cost of moving an expert, in mean device loads (lambda = penalty / expert bytes)
    move_tokens: int = 32  # tokens served per layer moved: M = B // move_tokens layers per batch (at least 1):
    # a copy budget that grows with the step's compute time (2 layers per 64-token step; vLLM moves 1)

    def __post_init__(self):
        for name in ("every", "window", "move_tokens"):
            if getattr(self, name) < 1:
                raise PlacementError(f"online {name} must be at least 1, got {getattr(self, name)}")
        if self.penalty < 0:
            raise PlacementError(f"the migration penalty must be >= 0, got {self.penalty}")


@dataclass(frozen=True)
class OnlineRun:
    slots: np.ndarray  # [T, L, S] the placement in force while each batch ran
    share: np.ndarray  # [T, L, S]
    final: Placement  # in force after the last batch (queued moves that never finished not applied)
    replans: int
    moved_slots: int  # (layer, slot) changes applied over the run
    layer_moves: int  # layer switches applied
    batch: int  # B
    config: OnlineConfig

    def bytes_moved(self, expert_bytes: int) -> int:
        return self.moved_slots * int(expert_bytes)


def _imbalance(load: np.ndarray, slots: np.ndarray, share: np.ndarray, devices: int) -> np.ndarray:
    """load [L, E], slots / share [L, S] -> [L] busiest / mean device under the fixed split."""
    L, S = slots.shape
    per_slot = np.take_along_axis(load, slots, 1) * share  # [L, S]
    dev = per_slot.reshape(L, devices, S // devices).sum(2)  # [L, N]
    mean = dev.mean(1)
    return np.divide(dev.max(1), mean, out=np.ones(L), where=mean > 0)


def run_online(initial: Placement, past: np.ndarray, experts: np.ndarray, batch: int,
               config: OnlineConfig = OnlineConfig()) -> OnlineRun:
    """initial: the placement at the start, planned on `past` [H, L, K] (the tokens before the evaluation);
    experts [N, L, K] the evaluation tokens, served in batches of `batch`."""
    E = initial.model.num_experts
    N = initial.devices
    hist = batch_counts(past, E, batch) if past.shape[0] else np.zeros((0,) + (initial.model.num_layers, E), np.int64)
    counts = batch_counts(experts, E, batch)  # [T, L, E]
    T = counts.shape[0]
    if T == 0:
        raise PlacementError(f"the evaluation trace has {experts.shape[0]} tokens, fewer than one batch of {batch}")
    seen = np.concatenate([hist, counts])  # [H + T, L, E]; batch i of the evaluation is seen[H + i]
    H = hist.shape[0]
    R = max(1, config.every // batch)
    W = max(1, config.window // batch)
    M = max(1, batch // config.move_tokens)

    slots = initial.slots.copy()  # [L, S] in force
    share = initial.share.copy()
    target: Placement | None = None
    queue: list[int] = []  # layers waiting to switch to target, first = next
    out_slots = np.empty((T,) + slots.shape, dtype=np.int64)
    out_share = np.empty((T,) + slots.shape)
    replans = moved = layer_moves = 0
    for i in range(T):
        if i > 0 and i % R == 0:
            window = seen[max(0, H + i - W):H + i].sum(0).astype(np.float64)  # [L, E] the past only
            current = replace(initial, slots=slots.copy(), share=share.copy())
            target = migrate(current, window, config.penalty)
            replans += 1
            differ = np.flatnonzero((target.slots != slots).any(1))
            gain = _imbalance(window, slots, share, N) - _imbalance(window, target.slots, target.share, N)
            queue = [int(l) for l in differ[np.argsort(-gain[differ], kind="stable")]]
        out_slots[i], out_share[i] = slots, share
        for layer in queue[:M]:  # moved while batch i ran: in force from batch i + 1
            moved += int((target.slots[layer] != slots[layer]).sum())
            slots[layer], share[layer] = target.slots[layer], target.share[layer]
            layer_moves += 1
        queue = queue[M:]
    final = _placement(initial.model, N, slots, "online", {**config.__dict__, "batch": batch, "replans": replans})
    return OnlineRun(slots=out_slots, share=out_share, final=final, replans=replans, moved_slots=moved,
                     layer_moves=layer_moves, batch=batch, config=config)
