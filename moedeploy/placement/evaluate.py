"""Score a placement on future batches: how evenly the devices are loaded, how many pairs cross devices.

    experts [N, L, K] ──batch_counts(B)──► counts [T, L, E]
    counts + slots [L, S] (or [T, L, S], a placement per batch: online.py)
        ── balance.balanced (per-batch replica choice) ─┐
        ── balance.by_share (the fixed split) ──────────┴► tokens per slot [T, L, S] ─► device loads [T, L, N]
    device loads ─► Metrics: max/mean (mean over layers and batches; worst batch), balancedness (vLLM),
                    max load and average max load (Huang et al. 2023), pairs crossing devices

Loads count (token, expert) pairs. A batch is B consecutive tokens of the evaluation trace (a last,
shorter batch is dropped). Token t of a batch lives on device t * N // B (tokens spread evenly, in
order); a pair crosses devices unless its expert's slot on the token's own device serves it, counted
optimistically: a slot serves up to its share of the batch from its own device's tokens first.

Evaluate only on tokens the placement was not planned on; this module does not plan (policies.py)
and does not know where the trace came from.

Legend: N = devices, L = MoE layers, K = experts per token, E = experts per layer, S = slots per layer,
P = S / N, T = batches, B = tokens per batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import PlacementError
from .balance import balanced, by_share
from .load import batch_counts
from .plan import Placement

SPLITS = ("balanced", "by_share")


@dataclass(frozen=True)
class Metrics:
    """One placement, one batch size, one replica split. Loads are (token, expert) pairs."""

    max_mean_load: float  # busiest device / mean device, mean over layers and batches
    max_mean_load_worst: float  # the worst batch's (mean over layers) max/mean
    balancedness: float  # vLLM's: mean / max tokens per device (summed over layers), mean over batches
    max_load: float  # the busiest device's pairs, worst over layers and batches (the paper's "max load")
    avg_max_load: float  # the busiest device's pairs, mean over layers and batches ("avg max load")
    cross_device_fraction: float  # pairs whose expert is served on another device than the token's
    batches: int  # T

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Evaluation:
    batch: int  # B
    balanced: Metrics  # per-batch replica choice (balance.balanced), what the runtime does
    by_share: Metrics  # fixed split by the planned shares (the baseline)
    per_batch: np.ndarray  # [T] mean over layers of max/mean, balanced split (for plots and checks)


def slot_tokens(counts: np.ndarray, slots: np.ndarray, share: np.ndarray, devices: int,
                split: str = "balanced") -> np.ndarray:
    """counts [T, L, E], slots and share [L, S] or [T, L, S] -> tokens per slot [T, L, S] int64."""
    if split not in SPLITS:
        raise PlacementError(f"unknown replica split {split!r}; choose one of {', '.join(SPLITS)}")
    T, L, E = counts.shape
    slots = np.broadcast_to(slots, (T,) + slots.shape[-2:])
    share = np.broadcast_to(share, slots.shape)
    out = np.take_along_axis(counts, slots, 2).astype(np.int64)  # [T, L, S] right where one replica each
    if slots.shape[2] == E:  # S == E: every expert has exactly one slot, nothing to split
        return out
    for t, l in np.ndindex(T, L):
        out[t, l] = (balanced(counts[t, l], slots[t, l], devices) if split == "balanced"
                     else by_share(counts[t, l], slots[t, l], share[t, l]))
    return out


def local_counts(experts: np.ndarray, num_experts: int, batch: int, devices: int) -> np.ndarray:
    """experts [N, L, K] -> [T, L, devices, E]: per batch, the pairs of each expert from each device's tokens."""
    N, L, K = experts.shape
    T = N // batch
    E1 = num_experts + 1
    home = np.arange(batch) * devices // batch  # [B] the device token t of a batch lives on
    ids = experts[:T * batch].reshape(T, batch, L, K).astype(np.int64)
    key = ((np.arange(T)[:, None, None, None] * L + np.arange(L)[None, None, :, None]) * devices
           + home[None, :, None, None]) * E1 + ids
    return np.bincount(key.ravel(), minlength=T * L * devices * E1).reshape(T, L, devices, E1)[..., :num_experts]


def metrics(loads: np.ndarray, crossing: float) -> Metrics:
    """loads [T, L, N] device loads -> Metrics (crossing: the fraction of pairs crossing devices)."""
    mean = loads.mean(2)  # [T, L]
    mx = loads.max(2)  # [T, L]
    ratio = np.divide(mx, mean, out=np.ones_like(mean, dtype=np.float64), where=mean > 0)  # [T, L]
    per_batch = ratio.mean(1)  # [T]
    bal = np.divide(mean.sum(1), mx.sum(1), out=np.ones(mean.shape[0]), where=mx.sum(1) > 0)  # [T]
    return Metrics(max_mean_load=float(ratio.mean()), max_mean_load_worst=float(per_batch.max()),
                   balancedness=float(bal.mean()), max_load=float(mx.max()), avg_max_load=float(mx.mean()),
                   cross_device_fraction=float(crossing), batches=int(loads.shape[0]))


def evaluate_slots(experts: np.ndarray, num_experts: int, batch: int, devices: int, slots: np.ndarray,
                   share: np.ndarray) -> Evaluation:
    """experts [N, L, K] scored against slots, share [L, S] (or [T, L, S], one placement per batch)."""
    counts = batch_counts(experts, num_experts, batch)  # [T, L, E]
    T, L, E = counts.shape
    if T == 0:
        raise PlacementError(f"the evaluation trace has {experts.shape[0]} tokens, fewer than one batch of "
                             f"{batch}; give a longer trace, a smaller --batch or a smaller --plan-on")
    if slots.shape[-2] != L:
        raise PlacementError(f"the placement has {slots.shape[-2]} layers, the trace {L}")
    S = slots.shape[-1]
    P = S // devices
    slots_t = np.broadcast_to(slots, (T, L, S))
    local = local_counts(experts, num_experts, batch, devices)  # [T, L, N, E]
    slot_dev = np.broadcast_to(np.arange(S) // P, (T, L, S))
    mine = local[np.arange(T)[:, None, None], np.arange(L)[None, :, None], slot_dev, slots_t]  # [T, L, S]
    total = counts.sum()
    out = {}
    per_batch = None
    for split in SPLITS:
        tokens = slot_tokens(counts, slots, share, devices, split)  # [T, L, S]
        loads = tokens.reshape(T, L, devices, P).sum(3)  # [T, L, N]
        served_here = np.minimum(mine, tokens).sum()
        out[split] = metrics(loads.astype(np.float64), 1.0 - served_here / total if total else 0.0)
        if split == "balanced":
            ratio = np.divide(loads.max(2), loads.mean(2), out=np.ones((T, L)), where=loads.mean(2) > 0)
            per_batch = ratio.mean(1)
    return Evaluation(batch=batch, balanced=out["balanced"], by_share=out["by_share"], per_batch=per_batch)


def evaluate(placement: Placement, experts: np.ndarray, batch: int) -> Evaluation:
    """One fixed placement on experts [N, L, K] (tokens it was not planned on), batches of `batch` tokens."""
    if experts.shape[1] != placement.model.num_layers:
        raise PlacementError(f"the trace has {experts.shape[1]} MoE layers, the placement "
                             f"{placement.model.num_layers}")
    return evaluate_slots(experts, placement.model.num_experts, batch, placement.devices, placement.slots,
                          placement.share)
