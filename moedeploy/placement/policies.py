"""Placement policies: from load statistics to a `Placement` (slots [L, S], share [L, S]).

    load [L, E] ─┬─ contiguous (plan.py) / round_robin ───────────────── ignore the load (baselines)
                 ├─ greedy ──────── hottest first, to the least-loaded device with a free slot
    series       ├─ anticorrelation  ... cost = device load + 0.5 x corr(expert's series, device's series)
    [T, L, E] ───┤
                 ├─ replicate ───── replica_counts (S - E extra slots, DeepSeek EPLB's rule) ─► pack
                 └─ migrate ─────── replicate, but a slot that changes expert costs `penalty`

Huang et al. 2023 ("Towards MoE Deployment", expert placement) give greedy and anti-correlation with
one slot per expert; replicate and migrate add hot-expert replicas (share = 1 / replicas, the fixed
split; evaluate.py also scores the per-batch choice of balance.py) and re-planning that keeps weights
where they are. Every policy is vectorised over layers: one Python step per slot, each an [L, N] array
operation, so a DeepSeek-V3-sized problem (58 layers, 256 experts, 288 slots, 32 devices) plans in
milliseconds (docs/benchmarks.md, "Expert placement").

Device loads inside the policies are normalised by the mean device load of the layer (1.0 = a device
carrying exactly its share), so the correlation weight and the migration penalty are in the same unit
whatever the trace's size. This module does not read traces (load.py), score placements (evaluate.py)
or decide when to re-plan (online.py).

Legend: L = MoE layers, E = experts per layer, S = physical slots per layer, N = devices,
P = S / N slots per device, T = batches of the planning series.
"""

from __future__ import annotations

import numpy as np

from ..errors import PlacementError
from .load import LoadStats
from .plan import ModelShape, Placement, contiguous, validate

__all__ = ["ALGORITHMS", "ONE_REPLICA", "anticorrelation", "bytes_moved", "changed_slots", "contiguous", "greedy",
           "migrate", "replica_counts", "replicate", "round_robin"]

ONE_REPLICA = ("contiguous", "round_robin", "greedy", "anticorrelation")  # S == E
ALGORITHMS = ONE_REPLICA + ("replicate", "online")
CORRELATION_WEIGHT = 0.5  # the paper's weight of the correlation term


def _check(model: ModelShape, devices: int, slots: int) -> None:
    """The shape rules (validate's) before any work: a clear error instead of an impossible packing."""
    validate(np.zeros((0, slots), dtype=np.int64), np.zeros((0, slots)), devices, model.num_experts)
    if slots > model.num_experts * devices:
        raise PlacementError(f"{slots} slots over {devices} devices would need more than one replica of an expert "
                             f"per device; use at most {model.num_experts * devices} slots")


def _load(load: np.ndarray, model: ModelShape) -> np.ndarray:
    load = np.asarray(load, dtype=np.float64)
    if load.shape != (model.num_layers, model.num_experts):
        raise PlacementError(f"load statistics {load.shape} do not match the model "
                             f"({model.num_layers} layers x {model.num_experts} experts)")
    if np.any(load < 0) or not np.all(np.isfinite(load)):
        raise PlacementError("expert loads must be finite and >= 0")
    return load


def round_robin(model: ModelShape, devices: int) -> Placement:
    """Expert e on device e % N (one slot per expert): device d holds d, d + N, d + 2N, ..."""
    E = model.num_experts
    _check(model, devices, E)
    row = np.arange(E).reshape(E // devices, devices).T.ravel()  # [S] device-major
    slots = np.tile(row, (model.num_layers, 1))
    return Placement(model=model, devices=devices, slots=slots, share=np.ones(slots.shape), algorithm="round_robin")


def replica_counts(load: np.ndarray, slots: int, devices: int) -> np.ndarray:
    """load [L, E] -> replicas [L, E] >= 1 summing to `slots` per layer: each extra slot goes to the
    expert with the largest load / replicas (DeepSeek EPLB's rule), never more replicas than devices."""
    L, E = load.shape
    reps = np.ones((L, E), dtype=np.int64)
    rows = np.arange(L)
    for _ in range(slots - E):
        ratio = np.where(reps < devices, load / reps, -1.0)  # [L, E]
        reps[rows, ratio.argmax(1)] += 1
    return reps


def _pack(load: np.ndarray, reps: np.ndarray, devices: int, current: Placement | None = None,
          penalty: float = 0.0) -> np.ndarray:
    """Replicas to devices, all layers at once -> slots [L, S].

    Replicas (each carrying load / replicas) are taken heaviest first; each goes to the device with the
    lowest cost among those with a free slot and no copy of its expert; cost = the device's load so far
    (in mean device loads) + `penalty` if `current` does not already hold the expert there.
    """
    L, E = load.shape
    S = int(reps[0].sum())
    P = S // devices
    rows = np.arange(L)
    expert = np.stack([np.repeat(np.arange(E), reps[l]) for l in range(L)])  # [L, S] one row per replica
    weight = np.take_along_axis(load / reps, expert, 1)  # [L, S]
    order = np.argsort(-weight, axis=1, kind="stable")
    expert = np.take_along_axis(expert, order, 1)
    weight = np.take_along_axis(weight, order, 1) / _mean_device(load, devices)[:, None]
    held = _held(current, devices) if current is not None else None  # [L, N, E]

    dev_load = np.zeros((L, devices))
    free = np.full((L, devices), P)
    has = np.zeros((L, devices, E), dtype=bool)
    device = np.empty((L, S), dtype=np.int64)
    for i in range(S):
        e = expert[:, i]  # [L]
        legal = (free > 0) & ~has[rows, :, e]  # [L, N]
        cost = dev_load if held is None else dev_load + penalty * ~held[rows, :, e]
        stuck = ~legal.any(1)
        if stuck.any():  # only devices that already hold e have room: place anyway, _repair swaps it out
            legal[stuck] = free[stuck] > 0
        d = np.where(legal, cost, np.inf).argmin(1)  # [L]
        device[:, i] = d
        dev_load[rows, d] += weight[:, i]
        free[rows, d] -= 1
        has[rows, d, e] = True
    return _repair(_arrange(expert, device, devices, E, current), load, devices)


def _mean_device(load: np.ndarray, devices: int) -> np.ndarray:
    """[L] the mean device load of each layer (1 where the layer has no load)."""
    m = load.sum(1) / devices
    return np.where(m > 0, m, 1.0)


def _held(placement: Placement, devices: int) -> np.ndarray:
    """[L, N, E] bool: does `placement` hold expert e on device d."""
    if placement.devices != devices:
        raise PlacementError(f"the current placement is for {placement.devices} devices, not {devices}")
    L, S = placement.slots.shape
    held = np.zeros((L, devices, placement.model.num_experts), dtype=bool)
    held[np.arange(L)[:, None], placement.device_of_slot()[None, :], placement.slots] = True
    return held


def _arrange(expert: np.ndarray, device: np.ndarray, devices: int, num_experts: int,
             current: Placement | None) -> np.ndarray:
    """Items (expert [L, S] on device [L, S]) -> slots [L, S]. Without `current`, a device's experts in
    item order; with it, an expert that stays on its device stays in its slot, and the others fill the
    device's freed slots, so only slots whose expert really changes count as moved."""
    L, S = expert.shape
    P = S // devices
    rows = np.arange(L)[:, None]
    if current is None:
        key = device * S + np.arange(S)  # [L, S] device-major, item order within a device
        return np.take_along_axis(expert, np.argsort(key, 1, kind="stable"), 1)
    old = current.slots  # [L, S]
    slot_dev = np.arange(S) // P  # [S]
    # kept: the old occupant of slot s is placed on the same device again.
    new_has = np.zeros((L, devices, num_experts), dtype=bool)
    new_has[rows, device, expert] = True
    kept_slot = new_has[rows, slot_dev[None, :], old]  # [L, S]
    old_has = np.zeros((L, devices, num_experts), dtype=bool)
    old_has[rows, slot_dev[None, :], old] = True
    kept_item = old_has[rows, device, expert]  # [L, S]
    big = devices * S
    slot_key = np.where(kept_slot, big, slot_dev[None, :] * S + np.arange(S))
    item_key = np.where(kept_item, big, device * S + np.arange(S))
    slot_order = np.argsort(slot_key, 1, kind="stable")  # freed slots first, device-major
    item_order = np.argsort(item_key, 1, kind="stable")  # newcomers first, device-major
    n = (~kept_slot).sum(1)  # [L]; equals (~kept_item).sum(1), per device too
    out = old.copy()
    take = np.arange(S)[None, :] < n[:, None]  # [L, S]
    r = np.broadcast_to(rows, (L, S))
    out[r[take], slot_order[take]] = np.take_along_axis(expert, item_order, 1)[take]
    return out


def _repair(slots: np.ndarray, load: np.ndarray, devices: int) -> np.ndarray:
    """Resolve the rare packings where a device got two replicas of one expert: swap one of them with
    the lightest expert of another device that holds neither. Python, touched only when needed."""
    L, S = slots.shape
    P = S // devices
    grid = slots.reshape(L, devices, P)
    srt = np.sort(grid, 2)
    for l in np.flatnonzero((srt[:, :, 1:] == srt[:, :, :-1]).any((1, 2))):
        g = grid[l]  # a view into slots
        for d in range(devices):
            while len(set(g[d].tolist())) < P:
                vals, cnt = np.unique(g[d], return_counts=True)
                e = int(vals[cnt > 1][0])
                i = int(np.flatnonzero(g[d] == e)[-1])
                best = None
                for d2 in range(devices):
                    if d2 == d or e in g[d2]:
                        continue
                    for j in range(P):
                        f = int(g[d2, j])
                        if f not in g[d] and (best is None or load[l, f] < best[0]):
                            best = (load[l, f], d2, j)
                if best is None:
                    raise PlacementError(f"layer {l}: cannot place the replicas of expert {e} on distinct devices")
                _, d2, j = best
                g[d, i], g[d2, j] = g[d2, j], e
    return slots


def _placement(model: ModelShape, devices: int, slots: np.ndarray, algorithm: str, notes: dict) -> Placement:
    reps = np.stack([np.bincount(r, minlength=model.num_experts) for r in slots])  # [L, E]
    share = 1.0 / np.take_along_axis(reps, slots, 1)
    return Placement(model=model, devices=devices, slots=slots, share=share, algorithm=algorithm, notes=notes)


def greedy(load: np.ndarray, model: ModelShape, devices: int) -> Placement:
    """load [L, E] -> one slot per expert: hottest expert first, to the least-loaded device that still has
    a free slot (E / N experts per device). Huang et al. 2023's greedy placement."""
    E = model.num_experts
    _check(model, devices, E)
    load = _load(load, model)
    slots = _pack(load, np.ones(load.shape, dtype=np.int64), devices)
    return _placement(model, devices, slots, "greedy", {})


def anticorrelation(stats: LoadStats, model: ModelShape, devices: int,
                    weight: float = CORRELATION_WEIGHT) -> Placement:
    """series [T, L, E] -> one slot per expert, hottest first, each to the device (with a free slot) of
    lowest cost = its load so far (in mean device loads) + weight x Pearson correlation between the
    expert's per-batch load and the device's (the sum of its experts' series; 0 for an empty device)."""
    E = model.num_experts
    _check(model, devices, E)
    series = stats.series  # [T, L, E]
    load = _load(series.sum(0), model)
    L = model.num_layers
    P = E // devices
    rows = np.arange(L)
    x = (series - series.mean(0)).transpose(1, 2, 0)  # [L, E, T] centred
    xx = (x * x).sum(2)  # [L, E]
    order = np.argsort(-load, axis=1, kind="stable")  # [L, E]
    unit = _mean_device(load, devices)  # [L]
    Y = np.zeros((L, devices, x.shape[2]))  # [L, N, T] centred sums of each device's experts
    YY = np.zeros((L, devices))  # [L, N] their squared norms
    dev_load = np.zeros((L, devices))
    free = np.full((L, devices), P)
    device = np.empty((L, E), dtype=np.int64)
    for i in range(E):
        e = order[:, i]  # [L]
        xe = x[rows, e]  # [L, T]
        dot = np.einsum("lnt,lt->ln", Y, xe)  # [L, N]
        denom = np.sqrt(YY * xx[rows, e][:, None])
        corr = np.divide(dot, denom, out=np.zeros_like(dot), where=denom > 1e-12)
        cost = np.where(free > 0, dev_load + weight * corr, np.inf)
        d = cost.argmin(1)
        device[:, i] = d
        Y[rows, d] += xe
        YY[rows, d] += 2 * dot[rows, d] + xx[rows, e]
        dev_load[rows, d] += load[rows, e] / unit
        free[rows, d] -= 1
    slots = _arrange(order, device, devices, E, None)
    return _placement(model, devices, slots, "anticorrelation", {"correlation_weight": weight,
                                                                 "series_batch": stats.batch})


def replicate(load: np.ndarray, model: ModelShape, devices: int, slots: int) -> Placement:
    """load [L, E] -> S >= E slots: extra replicas by load / replicas, then replicas (each with load /
    replicas) heaviest first to the least-loaded device with a free slot and no copy of that expert."""
    _check(model, devices, slots)
    load = _load(load, model)
    reps = replica_counts(load, slots, devices)
    return _placement(model, devices, _pack(load, reps, devices), "replicate", {})


def migrate(current: Placement, load: np.ndarray, penalty: float, algorithm: str = "online") -> Placement:
    """Re-plan `current` for new loads [L, E], like `replicate` with the same slot count, but a replica
    placed on a device that does not hold its expert now costs `penalty` more (in mean device loads:
    lambda x bytes moved, lambda = penalty / expert bytes). Experts that stay keep their slots."""
    model = current.model
    load = _load(load, model)
    reps = replica_counts(load, current.num_slots, current.devices)
    slots = _pack(load, reps, current.devices, current=current, penalty=penalty)
    return _placement(model, current.devices, slots, algorithm, {"penalty": penalty})


def changed_slots(a: Placement, b: Placement) -> np.ndarray:
    """[L] slots whose expert differs between two placements of the same shape (weights to copy)."""
    if a.slots.shape != b.slots.shape or a.devices != b.devices:
        raise PlacementError(f"cannot compare placements of different shapes ({a.slots.shape} on {a.devices} "
                             f"devices vs {b.slots.shape} on {b.devices})")
    return (a.slots != b.slots).sum(1)


def bytes_moved(a: Placement, b: Placement, expert_bytes: int) -> int:
    """Bytes copied to turn `a` into `b`: changed (layer, slot)s x one expert's bytes."""
    return int(changed_slots(a, b).sum()) * int(expert_bytes)
